"""One stop policy for every stage: SIGTERM and SIGINT ask the job to stop at a safe point.

`install()` (the commands call it) records the first signal instead of dying; the
training loop, evaluation and the sweep call `check(where)` at their safe points,
which raises `Stopped` once a signal has arrived: training saves a checkpoint
first, and every stage's work up to there is either saved or redone on re-run.
A second Ctrl-C interrupts at once. Exit codes: 0 done, 1 a bug (traceback),
2 bad input, 3 stopped by a signal (re-run the same command to resume).

With several processes, SIGTERM is left to JAX's preemption notifier, which
agrees on one step across hosts (`Checkpointer.reached_preemption`); only SIGINT
is handled here.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from sparse_vit_jax.errors import Stopped

_received: list[str] = []


def install(sigterm: bool = True) -> Callable[[], None]:
    """Installs the handlers (main thread); returns a function that restores the old ones."""
    signals = [signal.SIGINT] + ([signal.SIGTERM] if sigterm else [])
    old = {}
    _received.clear()

    def handler(signum: int, _: Any) -> None:
        name = signal.Signals(signum).name
        if name == 'SIGINT' and 'SIGINT' in _received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        _received.append(name)

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


def received() -> str | None:
    """The first stop signal received, if any."""
    return _received[0] if _received else None


def check(where: str) -> None:
    """Raises Stopped if a stop signal has arrived (call at safe points)."""
    if _received:
        raise Stopped(f'stopped by {_received[0]} {where}; re-run the same command to resume')
