"""Multi-process start-up: `jax.distributed.initialize` when this is one of several processes.

TPU VMs and Slurm are detected by JAX itself. Elsewhere set
SPARSE_VIT_COORDINATOR=host:port, SPARSE_VIT_NUM_PROCESSES and
SPARSE_VIT_PROCESS_ID (e.g. from a launch script). On CPU the collectives use gloo.

A process that fails exits at once (`cli`), without waiting at JAX's shutdown
barrier, and the others stop too, with one line: in an exchange (`multihost`), for
orbax's checkpoint writes, which end in barriers in background threads, through a
`FailFastBarrier`, and anywhere else (a bug or a device error inside a step, on one host)
through a `FailureWatch`, which also ends them, with one line, when a process dies without a
word (SIGKILL, the OOM killer, a lost host): its silence is noticed after a quarter of
SPARSE_VIT_HEARTBEAT_TIMEOUT seconds (JAX's default timeout: 100), before JAX's
coordination service aborts them with a C++ stack (between half and all of the timeout
after the death, as measured).
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
from typing import NoReturn

import jax

HEARTBEAT_ENV, HEARTBEAT_DEFAULT_S = 'SPARSE_VIT_HEARTBEAT_TIMEOUT', 100  # JAX's default


def heartbeat_timeout_s() -> int:
    """Seconds after which JAX's coordination service declares a silent process dead."""
    value = os.environ.get(HEARTBEAT_ENV) or str(HEARTBEAT_DEFAULT_S)
    if not value.isdigit() or int(value) < 3:
        from sparse_vit_jax.errors import UserError
        raise UserError(f'{HEARTBEAT_ENV}={value} is not a whole number of seconds >= 3; '
                        f'unset it for JAX\'s default ({HEARTBEAT_DEFAULT_S})')
    return int(value)


def maybe_initialize() -> None:
    coordinator = os.environ.get('SPARSE_VIT_COORDINATOR')
    extra = {'heartbeat_timeout_seconds': heartbeat_timeout_s()}
    if coordinator:
        # Only affects CPU devices; must be set before any backend starts.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ['SPARSE_VIT_NUM_PROCESSES']),
            process_id=int(os.environ['SPARSE_VIT_PROCESS_ID']), **extra)
    elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('SLURM_NTASKS', '1') != '1':
        jax.distributed.initialize(**extra)


_ACTIVE: FailureWatch | None = None  # this process's watch, while it runs


def exit_with_others(code: int, line: str) -> NoReturn:
    """Exits this process with `code` at once, from any thread, after telling the run's other
    processes that it failed with `line` (through this process's `FailureWatch`, if it has
    one: they then end too, each with one line naming it). The caller has said why."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _ACTIVE is not None:
        try:
            _ACTIVE.fail(code, line)
        except Exception:  # noqa: BLE001 - the service is gone: the others learn it from JAX
            pass
    os._exit(code)


def _client():
    from jax._src import distributed  # the client that JAX's own barriers use
    return distributed.global_state.client


# The key JAX's preemption notifier (TSL's) writes in the coordination service on a SIGTERM.
PREEMPTION_NOTICE = 'RECEIVED_PREEMPTION_NOTICE'


def preemption_noticed() -> bool:
    """Whether a process of the run has received JAX's preemption notice (a SIGTERM), as this
    process reads the coordination service now (False without jax.distributed)."""
    client = _client()
    if client is None:
        return False
    try:
        client.key_value_try_get(PREEMPTION_NOTICE)
    except Exception:  # noqa: BLE001 - not found (or no service): no notice to act on
        return False
    return True


def _by_process(client, directory: str) -> dict[int, str]:
    """{process: value} of the keys `directory/<process>` in the coordination service."""
    return {int(k.rsplit('/', 1)[1]): v for k, v in client.key_value_dir_get(directory)}


class FailureWatch:
    """Ends this process, with one line, soon after another process of the run fails or dies.

    A process that fails alone (a bug or a device error inside a step) leaves the others in
    their next collective until the coordination service misses its heartbeat, and JAX then
    aborts them with a C++ stack, not a word of why. Here the failing process posts its exit
    code and line (`fail`) in the coordination service's key-value store; a thread in every
    process polls it every `poll_s` and, unless this process is failing too within `grace_s`
    (an agreed failure, which says why itself), prints that line and exits with that code,
    like a SIGKILL at that moment (checkpoints and results are written atomically; a re-run
    resumes). A process that dies without a word (SIGKILL, the OOM killer, a lost host) stops
    ticking a counter that its thread posts every `poll_s`; after `silent_s` without a tick
    process 0 posts its failure for it (exit code 1), before JAX's coordination service
    declares it dead (half to all of its heartbeat timeout after the death).
    Process 0 hosts the service, so it leaves last: after every other process has failed,
    left, or gone silent for `silent_s` (a watch keeps ticking while it waits out its grace).
    A process that found the service gone would end in JAX's abort instead of its line, so
    process 0 waits for a slow one (a loaded host) as long as it ticks, up to the heartbeat
    timeout.
    """

    _ROOT = 'sparse_vit_jax/run/'

    def __init__(self, poll_s: float = 1.0, grace_s: float = 5.0,
                 silent_s: float | None = None) -> None:
        self._client = _client()
        if self._client is None:
            raise ValueError('FailureWatch needs jax.distributed.initialize()')
        self.poll_s, self.grace_s = poll_s, grace_s
        self.silent_s = heartbeat_timeout_s() / 4 if silent_s is None else silent_s
        self._me = jax.process_index()
        self._failing, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name='FailureWatch', daemon=True)
        self._thread.start()
        global _ACTIVE
        _ACTIVE = self

    def stop(self) -> None:
        """Ends the watch (before JAX's shutdown: the thread must not call a closed client);
        the process's silence from then on is no failure."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 10)
        try:
            self._client.key_value_set(f'{self._ROOT}left/{self._me}', '', allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service is gone; nobody is watching any more
            pass

    def fail(self, code: int, line: str) -> None:
        """Tells every process that this one ends with `code` and `line`; returns when
        process 0 may leave (at once on the other processes)."""
        self._failing.set()
        self._stop.set()
        self._post_failure(self._me, code, line)
        self._leave_last()

    def _post_failure(self, process: int, code: int, line: str) -> None:
        self._client.key_value_set(f'{self._ROOT}failed/{process}', f'{code} {line[:2000]}',
                                   allow_overwrite=True)

    def _posted(self, kind: str) -> dict[int, str]:
        return _by_process(self._client, f'{self._ROOT}{kind}/')

    def _leave_last(self) -> None:
        """On process 0: returns once every other process has failed, left or gone silent
        (or after the heartbeat timeout, by which JAX has declared a silent one dead)."""
        if self._me != 0:
            return
        deadline = time.monotonic() + heartbeat_timeout_s()
        others, ticks = set(range(1, jax.process_count())), {}
        while time.monotonic() < deadline:
            done = set(self._posted('failed')) | set(self._posted('left'))
            if others <= done | self._silent(ticks):
                return
            time.sleep(0.05)

    def _silent(self, ticks: dict[int, tuple[str, float]]) -> set[int]:
        """On process 0: the processes whose tick has not moved for `silent_s` (and that have
        not left), after noting each one's latest tick in `ticks` {process: (tick, since)}."""
        now, left = time.monotonic(), set(self._posted('left'))
        for p, tick in self._posted('alive').items():
            if ticks.get(p, ('', 0.0))[0] != tick:
                ticks[p] = (tick, now)
        return {p for p in range(1, jax.process_count())
                if p not in left and now - ticks.setdefault(p, ('', now))[1] > self.silent_s}

    def _watch(self) -> None:
        ticks: dict[int, tuple[str, float]] = {}
        failed: dict[int, str] = {}
        grace_ends = 0.0
        for tick in itertools.count():
            wait = self.poll_s if not failed else min(self.poll_s, grace_ends - time.monotonic())
            if self._stop.wait(max(wait, 0.0)):
                return  # this process ends, or fails too and says so itself
            if failed and time.monotonic() >= grace_ends:
                break
            try:  # the tick goes on during the grace: process 0 waits for this one's word
                self._client.key_value_set(f'{self._ROOT}alive/{self._me}', str(tick),
                                           allow_overwrite=True)
                if self._me == 0 and not failed and (silent := self._silent(ticks)):
                    self._post_failure(min(silent), 1, f'it stopped answering for '
                                       f'{self.silent_s:.0f} s: killed, out of memory or its '
                                       'host lost? see its log')
                if not failed:
                    failed = {p: v for p, v in self._posted('failed').items() if p != self._me}
                    grace_ends = time.monotonic() + self.grace_s
            except Exception:  # noqa: BLE001 - the service is gone; JAX ends this process
                return
        process, value = min(failed.items())
        code, line = value.split(' ', 1)
        print(f'error: process {process} failed ({line}); this process stops with it: fix '
              'that and re-run the same command to resume', file=sys.stderr, flush=True)
        sys.stdout.flush()
        try:
            self._client.key_value_set(f'{self._ROOT}left/{self._me}', '', allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service is gone: its line is said; exit anyway
            pass
        self._leave_last()
        os._exit(int(code))


class ProcessFailed(RuntimeError):
    """Process `process` failed with `error` (its type and first line)."""

    def __init__(self, process: int, error: str) -> None:
        super().__init__(f'process {process}: {error}')
        self.process, self.error = process, error


class FailFastBarrier:
    """A barrier (orbax's `AsyncOptions.barrier_sync_fn`) that ends on every process once
    any process fails.

    Orbax's background checkpoint write ends in barriers. A process whose write fails (its
    disk, its quota) skips the first one and closes the save in a later one, so with JAX's
    barrier every process would wait out orbax's timeout (20 minutes) and the failure would
    surface nowhere meanwhile. Here each barrier is a counter in JAX's coordination service.
    A process that reaches one while an exception propagates (orbax closes a failed save in
    a `finally`), or that calls `fail`, posts its error; every process then raises
    `ProcessFailed` from any barrier of the same name, at once and ever after.

    All processes must create their barriers in the same order and call them in the same
    order (the keys may repeat: the n-th use of a key is its own barrier).
    """

    _created = itertools.count()

    def __init__(self, name: str) -> None:
        self._client = _client()
        if self._client is None:
            raise ValueError('FailFastBarrier needs jax.distributed.initialize()')
        self._root = f'sparse_vit_jax/{name}/{next(self._created)}'
        self._uses: collections.Counter[str] = collections.Counter()
        self._previous: str | None = None

    def fail(self, error: BaseException) -> None:
        """Tells every process that this one failed with `error`."""
        if isinstance(error, ProcessFailed):
            return  # already told, by the process that failed
        text = str(error).splitlines()[0][:2000] if str(error) else ''
        self._client.key_value_set(f'{self._root}/failed/{jax.process_index()}',
                                   f'{type(error).__name__}: {text}', allow_overwrite=True)

    def check(self) -> None:
        """Raises ProcessFailed if any process failed (the lowest-numbered one's error)."""
        failed = _by_process(self._client, f'{self._root}/failed/')
        if failed:
            raise ProcessFailed(*min(failed.items()))

    def __call__(self, *, key: str, timeout_ms: int) -> None:
        in_flight = sys.exc_info()[1]
        if in_flight is not None:
            self.fail(in_flight)
        self._uses[key] += 1
        counter = f'{self._root}/at/{key}/{self._uses[key]}'
        self._client.key_value_increment(counter, 1)
        deadline, delay = time.monotonic() + timeout_ms / 1000, 0.002
        while True:
            self.check()
            if int(self._client.key_value_try_get(counter)) >= jax.process_count():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f'not every process reached {key} within '
                                   f'{timeout_ms / 1000:.0f} s (storage that hangs or is slow?)')
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
        if self._previous is not None and jax.process_index() == 0:
            # every process reached this barrier, so none still reads the previous one
            self._client.key_value_delete(self._previous)
        self._previous = counter
