"""Multi-process start-up: `jax.distributed.initialize` when this is one of several processes.

TPU VMs and Slurm are detected by JAX itself. Elsewhere set
SPARSE_VIT_COORDINATOR=host:port, SPARSE_VIT_NUM_PROCESSES and
SPARSE_VIT_PROCESS_ID (e.g. from a launch script). On CPU the collectives use gloo.

A process that fails exits at once (`cli`), without waiting at JAX's shutdown
barrier; the others learn it from the coordination service within
SPARSE_VIT_HEARTBEAT_TIMEOUT seconds (JAX's default: 100) and end too.
"""

from __future__ import annotations

import os

import jax
import numpy as np


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


def from_process0(value: int) -> int:
    """Process 0's `value` (an int or bool), on every process: a choice read from files (is
    this finished? which run holds the workdir?) must be one choice, or the processes would
    run different programs and hang in their collectives. With one process, `value` itself."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes whose `flag` is true, on every process."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils
    return [int(i) for i in np.flatnonzero(multihost_utils.process_allgather(np.int32(flag)))]
