"""Multi-process start-up: `jax.distributed.initialize` when this is one of several processes.

TPU VMs and Slurm are detected by JAX itself. Elsewhere set
SPARSE_VIT_COORDINATOR=host:port, SPARSE_VIT_NUM_PROCESSES and
SPARSE_VIT_PROCESS_ID (e.g. from a launch script). On CPU the collectives use gloo.

A process that fails exits at once (`cli`), without waiting at JAX's shutdown
barrier. Where the others can learn of it they stop too, with one line: in an exchange
(`multihost`), or, for orbax's checkpoint writes, which end in barriers in background
threads, through a `FailFastBarrier`. Anywhere else (a crash inside a step, a killed
process) they learn it from the coordination service within
SPARSE_VIT_HEARTBEAT_TIMEOUT seconds (JAX's default: 100) and end too.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import time

import jax


def maybe_initialize() -> None:
    coordinator = os.environ.get('SPARSE_VIT_COORDINATOR')
    timeout = os.environ.get('SPARSE_VIT_HEARTBEAT_TIMEOUT')
    extra = {'heartbeat_timeout_seconds': int(timeout)} if timeout else {}
    if coordinator:
        # Only affects CPU devices; must be set before any backend starts.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ['SPARSE_VIT_NUM_PROCESSES']),
            process_id=int(os.environ['SPARSE_VIT_PROCESS_ID']), **extra)
    elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('SLURM_NTASKS', '1') != '1':
        jax.distributed.initialize(**extra)


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
        from jax._src import distributed  # the client that JAX's own barriers use
        self._client = distributed.global_state.client
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
        failed = [(int(k.rsplit('/', 1)[1]), v)
                  for k, v in self._client.key_value_dir_get(f'{self._root}/failed/')]
        if failed:
            raise ProcessFailed(*min(failed))

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
                raise TimeoutError(f'processes did not all reach barrier {key} within '
                                   f'{timeout_ms / 1000:.0f} s')
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
        if self._previous is not None and jax.process_index() == 0:
            # every process reached this barrier, so none still reads the previous one
            self._client.key_value_delete(self._previous)
        self._previous = counter
