"""Device mesh and shardings: batch over 'data'; params replicated, or FSDP-sharded.

FSDP here shards every array along its largest axis that the device count
divides (the same 'data' axis that splits the batch, as in big_vision), so
parameters and optimizer state take 1/N of the memory per device; XLA inserts
the all-gathers. Leaves with no divisible axis stay replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
    """A 1-D mesh named 'data' over every device of every process."""
    return Mesh(np.array(jax.devices()), ('data',))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for a in axes:
        if shape[a] % n == 0 and shape[a] >= n:
            return P(*[('data' if i == a else None) for i in range(len(shape))])
    return P()


def state_shardings(abstract: Any, mesh: Mesh, fsdp: bool) -> Any:
    n = mesh.shape['data']
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n) if fsdp else P()), abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (an all-gather when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
