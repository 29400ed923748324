"""The training objective: cross-entropy plus the optional attention penalty.

The penalty reads the attention probabilities sown by the same forward pass
that produces the logits. With weight 0 nothing is sown or computed, so the
compiled step is the same as a plain cross-entropy step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparse_vit_jax.models import VisionTransformer
from sparse_vit_jax.sparsity import penalty_from_intermediates, resolve_layers

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_loss_fn(model: VisionTransformer, attention_weight: float = 0.0,
                 attention_layers: str | Sequence[int] = 'last') -> LossFn:
    """loss_fn(params, images, labels, mask, rng, train) -> (loss, metrics).

    `mask` (B,) weights examples (0 for padding); the loss is the masked mean.
    """
    if attention_weight < 0:
        raise ValueError(f'attention penalty weight must be >= 0, got {attention_weight}')
    layers = resolve_layers(attention_layers, model.num_layers) if attention_weight > 0 else ()

    def loss_fn(params: Any, images: jax.Array, labels: jax.Array, mask: jax.Array,
                rng: jax.Array | None, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        rngs = {'dropout': rng} if train and rng is not None else {}
        if layers:
            logits, state = model.apply({'params': params}, images, train=train, rngs=rngs,
                                        capture_attention=layers, mutable=['intermediates'])
            penalty = penalty_from_intermediates(state['intermediates'], layers)
        else:
            logits = model.apply({'params': params}, images, train=train, rngs=rngs)
            penalty = jnp.zeros([], jnp.float32)
        mask = mask.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        n = jnp.maximum(mask.sum(), 1.0)
        ce = jnp.sum(ce * mask) / n
        loss = ce + attention_weight * penalty if layers else ce
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
        return loss, dict(loss=loss, ce=ce, attention_penalty=penalty, correct=correct, count=n)

    return loss_fn
