"""Step builders: a jitted train step and eval step from a loss, an optimizer and metrics.

The loss is `loss_fn(params, batch, rng, train) -> (loss, outputs)`; `outputs`
(per-example arrays or scalars) feed a `clu.metrics.Collection`, whose
`single_from_model_output` also receives `loss`, `grad_norm` (training) and the
batch's `mask` (evaluation: padded examples have mask 0 and are not counted).
Metrics stay on the device; nothing here waits for the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh

from sparse_vit_jax.train.memory import check_step_fits
from sparse_vit_jax.train.sharding import batch_sharding, replicated, to_host
from sparse_vit_jax.train.state import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array | None, bool], tuple[jax.Array, dict[str, jax.Array]]]
Metrics = type[clu_metrics.Collection]


def global_norm(tree: Any) -> jax.Array:
    """optax.tree.norm's value (in float32), summed in an order that costs no kernels of its own.

    XLA reduces each large leaf in two stages and fuses the first into the optimizer's update
    of that leaf; summed as optax does, each leaf's second stage (a sum of a few hundred
    partials) is a kernel of its own. Here large leaves are summed over their last axis (their
    own axes: a sharded leaf needs no resharding), which the update's kernel writes, and all of
    it is finished in one reduction (the barrier keeps XLA from splitting that back into one
    per leaf): a ViT-B/16 step compiled for an H200 has 85 kernels fewer (1,125 -> 1,040).
    """
    parts = []
    for x in jax.tree.leaves(tree):
        axis = -1 if x.size >= 65536 else None
        parts.append(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis).reshape(-1))
    if not parts:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(parts))))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, metrics: Metrics,
                    shardings: TrainState, mesh: Mesh
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Any]]:
    """step(state, batch) -> (state, metrics); the input state's buffers are donated."""
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Any]:
        rng, drop = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, out), grads = grad_fn(state.params, batch, drop, True)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = metrics.single_from_model_output(loss=loss, grad_norm=global_norm(grads), **out)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             rng=rng), m

    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


@dataclass(frozen=True)
class EvalStep:
    """`step(params, batch, total) -> total` merged with the batch's real (mask 1) examples'
    metrics, and `empty()`, the total to start from; both jitted, the totals replicated.

    Each step takes the one before's total, so the steps run one after another: independent
    steps may run at the same time, and two programs whose collectives interleave in other
    orders on two processes deadlock (seen with CPU processes over gloo).
    """

    step: Callable[[Any, Batch, Any], Any]
    empty: Callable[[], Any]


def make_eval_step(loss_fn: LossFn, metrics: Metrics, mesh: Mesh) -> EvalStep:
    def step(params: Any, batch: Batch, total: Any) -> Any:
        loss, out = loss_fn(params, batch, None, False)
        return total.merge(metrics.single_from_model_output(loss=loss, mask=batch['mask'],
                                                            **out))

    return EvalStep(jax.jit(step, out_shardings=replicated(mesh)),
                    jax.jit(metrics.empty, out_shardings=replicated(mesh)))


def evaluate(eval_step: EvalStep, params: Any, batches: Iterable[Batch],
             memory_advice: str = 'lower the eval batch size') -> Any:
    """The metrics merged over every batch, on the host (numpy leaves); whether the step fits
    the devices is checked on the first batch (`train.memory`)."""
    total, n = eval_step.empty(), 0
    for batch in batches:
        if not n:
            check_step_fits(eval_step.step, params, batch, total, advice=memory_advice,
                            what='the eval step')
        total, n = eval_step.step(params, batch, total), n + 1
    if not n:
        raise ValueError('evaluate() got no batches')
    return to_host(total)
