"""The paper's attention penalty: S = mean log(1 + A^2) over post-softmax attention A.

What it does (see README, "What the attention penalty does"): on [0, 1]
f(a) = log(1 + a^2) is convex and every attention row sums to 1, so by Jensen
the row sum of f is smallest for the uniform row. The penalty therefore pushes
attention towards *uniform*, away from sparse attention, and is tiny: at 577
tokens uniform attention gives S ~ 3e-6 and 0.01 * S ~ 3e-8; a one-hot row
gives S = log 2 / 577 ~ 1.2e-3, i.e. 0.01 * S ~ 1.2e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparse_vit_jax.errors import UserError

Layers = str | Sequence[int]


def attention_penalty(probs: jax.Array) -> jax.Array:
    """mean(log(1 + probs^2)) over every axis, computed in float32."""
    p = probs.astype(jnp.float32)
    return jnp.mean(jnp.log1p(p * p))


def resolve_layers(layers: Layers, depth: int) -> tuple[int, ...]:
    """'last' (the paper's implementation), 'all', or explicit block indices."""
    if isinstance(layers, str):
        if layers == 'last':
            return (depth - 1,)
        if layers == 'all':
            return tuple(range(depth))
        raise UserError(f"attention penalty layers must be 'last', 'all' or a list of block "
                        f'indices, got {layers!r}')
    idx = tuple(int(i) for i in layers)
    bad = [i for i in idx if not -depth <= i < depth]
    if not idx or bad:
        raise UserError(f'attention penalty layers {list(layers)} are not valid block indices '
                        f'for a {depth}-block model')
    return tuple(sorted({i % depth for i in idx}))


def penalty_from_intermediates(intermediates: Any, layers: Sequence[int]) -> jax.Array:
    """Mean over `layers` of each block's penalty: sown by the model as
    'attention_probs_reduced' (applied with ``reduce_attention=attention_penalty``, which
    spares the backward pass the probabilities), or computed here from the sown
    'attention_probs'."""
    blocks = intermediates['Transformer']
    values = []
    for i in layers:
        sown = blocks[f'encoderblock_{i}']['MultiHeadDotProductAttention_0']
        values.append(sown['attention_probs_reduced'][0] if 'attention_probs_reduced' in sown
                      else attention_penalty(sown['attention_probs'][0]))
    return jnp.mean(jnp.stack(values))
