"""The paper's objective: cross-entropy plus the optional attention penalty, and its metrics.

`loss_fn(params, batch, rng, train) -> (loss, outputs)` is the engine's loss
contract (`train.steps`). The penalty reads the attention probabilities sown by
the same forward pass that produces the logits. With weight 0 nothing is sown
or computed, so the compiled step is the same as a plain cross-entropy step.
`outputs` are per-example `ce` and `correct` (so that evaluation can leave out
padded examples), in evaluation also `correct5` (the label among the 5 highest
logits: top-5 accuracy, ImageNet's second figure), and the scalar `attention_penalty`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from sparse_vit_jax.models import VisionTransformer
from sparse_vit_jax.sparsity import attention_penalty, penalty_from_intermediates, resolve_layers

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array | None, bool],
                  tuple[jax.Array, dict[str, jax.Array]]]


def make_loss_fn(model: VisionTransformer, attention_weight: float = 0.0,
                 attention_layers: str | Sequence[int] = 'last') -> LossFn:
    """loss_fn(params, batch, rng, train) -> (loss, outputs); batch: image, label[, mask].

    With a `mask` (B,) (0 for padding) the loss is the masked mean.
    """
    if attention_weight < 0:
        raise ValueError(f'attention penalty weight must be >= 0, got {attention_weight}')
    layers = resolve_layers(attention_layers, model.num_layers) if attention_weight > 0 else ()

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None, train: bool
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        images, labels = batch['image'], batch['label']
        rngs = {'dropout': rng} if train and rng is not None else {}
        if layers:
            logits, state = model.apply({'params': params}, images, train=train, rngs=rngs,
                                        capture_attention=layers,
                                        reduce_attention=attention_penalty,
                                        mutable=['intermediates'])
            penalty = penalty_from_intermediates(state['intermediates'], layers)
        else:
            logits = model.apply({'params': params}, images, train=train, rngs=rngs)
            penalty = jnp.zeros([], jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if 'mask' in batch:
            mask = batch['mask'].astype(jnp.float32)
            mean_ce = jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1.0)
        else:
            mean_ce = jnp.mean(ce)
        loss = mean_ce + attention_weight * penalty if layers else mean_ce
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        out = {'ce': ce, 'correct': correct, 'attention_penalty': penalty}
        if not train:
            out['correct5'] = top_k_correct(logits, labels, 5)
        return loss, out

    return loss_fn


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label's logit is among the k highest (all of them with fewer classes).

    Counted as fewer than k logits above the label's, so a tie at the k-th place counts.
    """
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    return (jnp.sum(logits > own, axis=-1) < k).astype(jnp.float32)


# (No `from __future__ import annotations` here: clu reads these annotations as classes.)
@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output('ce')
    accuracy: metrics.Average.from_output('correct')
    attention_penalty: metrics.Average.from_output('attention_penalty')
    grad_norm: metrics.Average.from_output('grad_norm')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output('ce')          # padded examples (mask 0) not counted
    accuracy: metrics.Average.from_output('correct')
    top5_accuracy: metrics.Average.from_output('correct5')
