"""One stop policy for every stage: SIGTERM and SIGINT ask the job to stop at a safe point.

`install()` (the commands call it) records the first signal instead of dying; the
training loop, evaluation and the sweep call `check(where)` at their safe points,
which raises `Stopped` once a signal has arrived: training saves a checkpoint
first, and every stage's work up to there is either saved or redone on re-run.
A second Ctrl-C interrupts at once. Exit codes: 0 done, 1 a bug (traceback),
2 bad input, 3 stopped by a signal (re-run the same command to resume).

With several processes, SIGTERM is left to JAX's preemption notifier, which
agrees on one step across hosts (`Checkpointer.reached_preemption`); SIGINT is
recorded here and passed on to that notifier as a SIGTERM, so that Ctrl-C on any host
stops every process at one step too. `check` is agreed as well: every process stops
at the same safe point once any of them has received a signal (its own SIGINT, or the
preemption notice that a SIGTERM to any process leaves in JAX's coordination service).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from sparse_vit_jax.errors import Stopped
from sparse_vit_jax.multihost import processes_where
from sparse_vit_jax.train.distributed import preemption_noticed

_received: list[str] = []
ELSEWHERE = 'a stop signal to one of the processes'  # what the others know of it


def install(sigterm: bool = True) -> Callable[[], None]:
    """Installs the handlers (main thread); returns a function that restores the old ones.

    `sigterm=False` (several processes) leaves SIGTERM to the handler that JAX's preemption
    notifier installed, and passes SIGINT on to it (where JAX runs no such notifier, SIGINT
    is only recorded).
    """
    signals = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
    forward = not sigterm and _jax_notifier_holds_sigterm()
    old = {}
    _received.clear()

    def handler(signum: int, _: Any) -> None:
        name = signal.Signals(signum).name
        if name == 'SIGINT' and 'SIGINT' in _received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        _received.append(name)
        if forward and name == 'SIGINT':
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier

    for s in signals:
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread
            pass

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)
        _received.clear()

    return restore


def _jax_notifier_holds_sigterm() -> bool:
    """Whether `jax.distributed` runs its preemption sync manager, whose notifier handles
    SIGTERM (from C++: Python's `signal.getsignal` does not see it)."""
    from jax._src import distributed
    return getattr(distributed.global_state, 'preemption_sync_manager', None) is not None


def received() -> str | None:
    """The first stop signal received, if any."""
    return _received[0] if _received else None


def requested() -> bool:
    """Whether a stop signal has arrived; with several processes, on every process once any
    of them has received one (an exchange: every process must ask at the same points)."""
    return bool(processes_where(bool(_received) or preemption_noticed()))


def check(where: str) -> None:
    """Raises Stopped if a stop signal has arrived (call at safe points, every process at
    the same ones: `requested`)."""
    if requested():
        by = _received[0] if _received else ELSEWHERE
        raise Stopped(f'stopped by {by} {where}; re-run the same command to resume')
