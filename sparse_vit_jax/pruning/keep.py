"""Keeping pruned weights at exactly zero while fine-tuning, and gradual pruning.

`keep_masks(inner, masks)` wraps any optax optimizer. Its state holds the masks,
so they are checkpointed and sharded with the optimizer state. `keep_zeros(inner)`
takes its masks from the weights it starts from (their exact zeros). Gradients of
pruned weights are zeroed before `inner` (no momentum builds up on them) and the
final update of a pruned weight is -w, so w + update == 0 exactly even if the
weight was not zero yet (this is the re-application of the masks).

`gradual_pruning(inner, ...)` recomputes global magnitude masks every
`frequency` steps from `start_step`, and at `end_step`, on the cubic schedule of
Zhu & Gupta (2017): s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3). The update at
`end_step` is always made, so the final sparsity is reached even where `t1 - t0` is not
a multiple of `frequency` (TF Model Optimization's schedule then stops short of it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.pruning.masks import _is_none, check_masks, magnitude_masks, zero_masks


class KeepMasksState(NamedTuple):
    masks: Any       # bool per selected leaf, None elsewhere
    inner: Any


class GradualPruningState(NamedTuple):
    count: jax.Array
    masks: Any
    inner: Any


def _mask_grads(masks: Any, tree: Any) -> Any:
    return jax.tree.map(lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros_like(g)),
                        masks, tree, is_leaf=_is_none)


def _final_updates(masks: Any, updates: Any, params: Any) -> Any:
    return jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p),
                        masks, updates, params, is_leaf=_is_none)


def keep_masks(inner: optax.GradientTransformation, masks: Any
               ) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that weights where mask is False stay exactly zero."""
    def masks_of(params: Any) -> Any:
        check_masks(params, masks)
        return masks

    return _kept(inner, masks_of)


def keep_zeros(inner: optax.GradientTransformation, select: Any = None
               ) -> optax.GradientTransformationExtraArgs:
    """`keep_masks` with the masks read from the parameters `init` is given: the selected
    weights that are exactly zero then (a pruned model being fine-tuned) stay zero.
    A selected tensor that is zero throughout is left free (`zero_masks`)."""
    return _kept(inner, lambda params: zero_masks(params, select=select))


def _kept(inner: optax.GradientTransformation, masks_of: Any
          ) -> optax.GradientTransformationExtraArgs:
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> KeepMasksState:
        return KeepMasksState(masks=masks_of(params), inner=inner.init(params))

    def update_fn(updates: Any, state: KeepMasksState, params: Any = None, **extra: Any
                  ) -> tuple[Any, KeepMasksState]:
        if params is None:
            raise ValueError('keep_masks needs params; call tx.update(grads, state, params)')
        grads = _mask_grads(state.masks, updates)
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        return (_final_updates(state.masks, updates, params),
                KeepMasksState(masks=state.masks, inner=inner_state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def polynomial_sparsity(step: jax.Array | int, final_sparsity: float, start_step: int,
                        end_step: int, initial_sparsity: float = 0.0) -> jax.Array:
    """s_t = s_f + (s_i - s_f) * (1 - p)^3, p = clip((t - t0) / (t1 - t0), 0, 1); where
    t0 == t1, p jumps from 0 to 1 at t0 (one-shot pruning at that step)."""
    t = jnp.asarray(step, jnp.float32)
    if end_step == start_step:
        p = (t >= start_step).astype(jnp.float32)
    else:
        p = jnp.clip((t - start_step) / (end_step - start_step), 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - p) ** 3


def gradual_pruning(inner: optax.GradientTransformation, final_sparsity: float, *,
                    start_step: int, end_step: int, frequency: int = 100,
                    select: Any = None) -> optax.GradientTransformationExtraArgs:
    """Global magnitude pruning on the cubic schedule, masks kept in the optimizer state."""
    if not 0.0 <= final_sparsity < 1.0:
        raise UserError(f'final sparsity must be in [0, 1), got {final_sparsity}')
    if not 0 <= start_step <= end_step or frequency < 1:
        raise UserError('gradual pruning needs 0 <= start_step <= end_step and frequency >= 1')
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> GradualPruningState:
        masks = magnitude_masks(params, 0.0, select=select)
        return GradualPruningState(jnp.zeros([], jnp.int32), masks, inner.init(params))

    def update_fn(updates: Any, state: GradualPruningState, params: Any = None, **extra: Any
                  ) -> tuple[Any, GradualPruningState]:
        if params is None:
            raise ValueError('gradual_pruning needs params')
        t = state.count
        due = (t >= start_step) & (t <= end_step) & (
            ((t - start_step) % frequency == 0) | (t == end_step))
        sparsity = polynomial_sparsity(t, final_sparsity, start_step, end_step)
        masks = jax.lax.cond(
            due, lambda: magnitude_masks(params, sparsity, select=select), lambda: state.masks)
        grads = _mask_grads(masks, updates)
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        return (_final_updates(masks, updates, params),
                GradualPruningState(optax.safe_increment(t), masks, inner_state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
