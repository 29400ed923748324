"""Sparsity regularisers: the paper's attention penalty and L1 optax transforms."""

from sparse_vit_jax.sparsity.attention import (
                                               attention_penalty,
                                               penalty_from_intermediates,
                                               resolve_layers,
)
from sparse_vit_jax.sparsity.l1 import L1State, add_l1_penalty, l1_proximal, soft_threshold

__all__ = ['attention_penalty', 'penalty_from_intermediates', 'resolve_layers',
           'add_l1_penalty', 'l1_proximal', 'soft_threshold', 'L1State']
