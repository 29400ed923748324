"""Multi-process start-up: `jax.distributed.initialize` when this is one of several processes.

TPU VMs and Slurm are detected by JAX itself. Elsewhere set
SPARSE_VIT_COORDINATOR=host:port, SPARSE_VIT_NUM_PROCESSES and
SPARSE_VIT_PROCESS_ID (e.g. from a launch script). On CPU the collectives use gloo.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> None:
    coordinator = os.environ.get('SPARSE_VIT_COORDINATOR')
    if coordinator:
        # Only affects CPU devices; must be set before any backend starts.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ['SPARSE_VIT_NUM_PROCESSES']),
            process_id=int(os.environ['SPARSE_VIT_PROCESS_ID']))
    elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('SLURM_NTASKS', '1') != '1':
        jax.distributed.initialize()
