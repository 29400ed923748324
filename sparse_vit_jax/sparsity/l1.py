"""L1 weight penalties as optax GradientTransformations.

Two forms, both restricted to a selection of parameters (default: the pruning
pool, `sparse_vit_jax.selection.PAPER_POOL`):

* `add_l1_penalty(strength)`: adds strength * sign(w) to the gradient, as
  `optax.add_decayed_weights` adds w. Place it *before* the optimizer
  (momentum/Adam then see the penalised gradient, like torch's coupled weight
  decay). Weights oscillate around zero but never become exactly zero.
* `l1_proximal(strength, learning_rate)`: soft-thresholds the weights after the
  optimizer step, w <- sign(w') max(|w'| - lr * strength, 0) with w' = w + u.
  Place it *last* in the chain. Weights reach exact zeros, so it is the one to
  use before magnitude pruning or to measure sparsity; with Adam the threshold
  is in weight units per step (lr * strength), not scaled by Adam's moments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_vit_jax.selection import select

Mask = Any | Callable[[Any], Any] | None


class L1State(NamedTuple):
    count: jax.Array  # steps taken, for schedules


def _value(x: float | optax.Schedule, count: jax.Array) -> jax.Array:
    return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def _mask(mask: Mask, params: Any) -> Any:
    if mask is None:
        return select(params)
    return mask(params) if callable(mask) else mask


def _check_strength(strength: float | optax.Schedule) -> None:
    if not callable(strength) and strength < 0:
        raise ValueError(f'L1 strength must be >= 0, got {strength}')


def _per_leaf(name: str, leaf_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
              amount: Callable[[jax.Array], jax.Array], mask: Mask
              ) -> optax.GradientTransformation:
    """A transform applying leaf_fn(update, w, amount(count)) to selected leaves."""

    def init_fn(params: Any) -> L1State:
        del params
        return L1State(count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: L1State, params: Any = None) -> tuple[Any, L1State]:
        if params is None:
            raise ValueError(f'{name} needs params; call tx.update(grads, state, params)')
        t = amount(state.count)
        updates = jax.tree.map(lambda u, w, m: leaf_fn(u, w, t) if m else u,
                               updates, params, _mask(mask, params))
        return updates, L1State(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def add_l1_penalty(strength: float | optax.Schedule, mask: Mask = None
                   ) -> optax.GradientTransformation:
    """g <- g + strength * sign(w) on selected leaves (mask: bools, callable, or None=pool)."""
    _check_strength(strength)
    return _per_leaf('add_l1_penalty',
                     lambda g, w, s: g + (s * jnp.sign(w)).astype(g.dtype),
                     lambda count: _value(strength, count), mask)


def soft_threshold(w: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - threshold, 0).astype(w.dtype)


def l1_proximal(strength: float | optax.Schedule, learning_rate: float | optax.Schedule,
                mask: Mask = None) -> optax.GradientTransformation:
    """Proximal L1 step on selected leaves; chain it after the optimizer (updates are deltas)."""
    _check_strength(strength)
    # w + (new - w) == new exactly when new == 0, so zeros stay exact.
    return _per_leaf('l1_proximal',
                     lambda u, w, t: soft_threshold(w + u, t.astype(w.dtype)) - w,
                     lambda count: _value(strength, count) * _value(learning_rate, count), mask)
