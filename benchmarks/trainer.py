"""The trainer's own train step for a config, lowered from abstract shapes (no data, no device
memory): what `python -m sparse_vit_jax.main --config=...` runs. benchmarks/gpu_check.py
times it on a GPU; benchmarks/tpu_compile.py compiles it for a TPU it does not have."""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp

from sparse_vit_jax.configs import copy
from sparse_vit_jax.experiment import TrainParts, build_model, train_parts, use_rng_impl
from sparse_vit_jax.models import abstract_params
from sparse_vit_jax.optimizer import build_optimizer
from sparse_vit_jax.pruning import magnitude_masks
from sparse_vit_jax.train.state import with_shardings

NUM_CLASSES = 100  # ImageNet-100's head


def load_config(path: str, tiny: bool) -> Any:
    """The config file's config; `tiny`: the testing ViT at 32 px (CI's smoke runs)."""
    spec = importlib.util.spec_from_file_location('config', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if tiny:
        c.model.name, c.model.image_size = 'testing', 32
    return c


def with_overrides(c: Any, overrides: dict[str, Any], batch: int) -> Any:
    """A copy of `c` with `batch` and dotted keys set ('model.remat': 'dots')."""
    c = copy(c)
    c.batch_size = batch
    for key, value in overrides.items():
        *groups, leaf = key.split('.')
        holder = c
        for g in groups:
            holder = holder[g]
        holder[leaf] = value  # a locked ConfigDict: a misspelt key raises
    return c


def lower_train_step(c: Any, mesh: Any, masks: bool = False) -> tuple[TrainParts, Any]:
    """The step's parts and the step lowered for batches of c.batch_size on `mesh`; `masks`:
    the mask-keeping optimizer (50% global masks)."""
    use_rng_impl(c.rng_impl)  # the key's shape and the dropout bits follow it
    model = build_model(c, NUM_CLASSES, 'jax', mesh)
    tx = None
    if masks:
        ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                            abstract_params(model, c.model.image_size))
        tx = build_optimizer(c, 1000, magnitude_masks(ones, 0.5))
    parts = train_parts(c, model, mesh, 1000, tx)
    size = c.model.image_size
    batch = {'image': jax.ShapeDtypeStruct((c.batch_size, size, size, 3), jnp.float32),
             'label': jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)}
    return parts, parts.step.lower(with_shardings(parts.abstract, parts.shardings), batch)
