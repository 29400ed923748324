"""Structured pruning: remove whole attention heads and MLP hidden units.

Unlike masks, this yields a physically smaller parameter tree (and the matching
model, with per-block `num_heads` / `mlp_dim`), so evaluation really gets faster.

Criterion (documented, simple, data-free): the L2 norm of all kernel weights
that belong to the unit. A head h of block i owns query/key/value kernel slices
[:, h, :] and out kernel slice [h]; an MLP unit j owns Dense_0 kernel column j
and Dense_1 kernel row j. Biases are not counted: a unit whose kernels are all
zero contributes nothing to the block's output whatever its biases (its output
passes through a zero out / Dense_1 slice), which is why removing such units
leaves the logits unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import VisionTransformer

ATT, MLP = 'MultiHeadDotProductAttention_0', 'MlpBlock_0'


def _blocks(params: Any) -> list[dict[str, Any]]:
    t = params['Transformer']
    return [t[f'encoderblock_{i}'] for i in range(sum(k.startswith('encoderblock_') for k in t))]


def unit_scores(params: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per block: head norms (H_i,) and MLP unit norms (M_i,), float64 numpy."""
    heads, mlps = [], []
    for b in _blocks(params):
        a = {k: np.asarray(v['kernel'], np.float64) for k, v in b[ATT].items()}
        sq = sum((a[k] ** 2).sum(axis=(0, 2)) for k in ('query', 'key', 'value'))
        heads.append(np.sqrt(sq + (a['out'] ** 2).sum(axis=(1, 2))))
        d0 = np.asarray(b[MLP]['Dense_0']['kernel'], np.float64)
        d1 = np.asarray(b[MLP]['Dense_1']['kernel'], np.float64)
        mlps.append(np.sqrt((d0 ** 2).sum(axis=0) + (d1 ** 2).sum(axis=1)))
    return heads, mlps


def _keep_top(scores: list[np.ndarray], ratio: float, scope: str, minimum: int
              ) -> list[np.ndarray]:
    """Indices (sorted) kept per block after removing round(ratio * n) lowest-scoring units."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f'structured pruning ratio must be in [0, 1), got {ratio}')
    if scope == 'layerwise':
        keep_n = [max(len(s) - round(ratio * len(s)), minimum) for s in scores]
    elif scope == 'global':
        # Each block's `minimum` strongest units first, then the strongest of the rest across
        # blocks up to the global count: a block that would lose all its units costs the
        # others theirs, so round(ratio * n) are removed whenever the minimums allow it.
        offsets = np.cumsum([0] + [len(s) for s in scores])
        flat = np.concatenate(scores)
        kept = np.zeros(len(flat), bool)
        for o, s in zip(offsets, scores):
            kept[o + np.argsort(-s, kind='stable')[:minimum]] = True
        order = np.argsort(-flat, kind='stable')  # ties keep the earlier unit
        rest = order[~kept[order]][:max(len(flat) - round(ratio * len(flat)) - kept.sum(), 0)]
        kept[rest] = True
        return [np.flatnonzero(kept[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    else:
        raise UserError(f"structured scope must be 'layerwise' or 'global', got {scope!r}")
    return [np.sort(np.argsort(-s, kind='stable')[:n]) for s, n in zip(scores, keep_n)]


def remove_units(params: Any, keep_heads: Sequence[np.ndarray], keep_mlp: Sequence[np.ndarray]
                 ) -> Any:
    """Gathers the kept heads / MLP units of every block into a smaller tree (numpy)."""
    out = {k: v for k, v in params.items() if k != 'Transformer'}
    t = {k: v for k, v in params['Transformer'].items() if not k.startswith('encoderblock_')}
    for i, (b, h, m) in enumerate(zip(_blocks(params), keep_heads, keep_mlp)):
        a = b[ATT]
        att = {k: {'kernel': np.asarray(a[k]['kernel'])[:, h], 'bias': np.asarray(a[k]['bias'])[h]}
               for k in ('query', 'key', 'value')}
        att['out'] = {'kernel': np.asarray(a['out']['kernel'])[h],
                      'bias': np.asarray(a['out']['bias'])}
        d0, d1 = b[MLP]['Dense_0'], b[MLP]['Dense_1']
        mlp = {'Dense_0': {'kernel': np.asarray(d0['kernel'])[:, m],
                           'bias': np.asarray(d0['bias'])[m]},
               'Dense_1': {'kernel': np.asarray(d1['kernel'])[m],
                           'bias': np.asarray(d1['bias'])}}
        t[f'encoderblock_{i}'] = {**{k: v for k, v in b.items() if k not in (ATT, MLP)},
                                  ATT: att, MLP: mlp}
    out['Transformer'] = t
    return out


def smaller_model(model: VisionTransformer, keep_heads: Sequence[np.ndarray],
                  keep_mlp: Sequence[np.ndarray]) -> VisionTransformer:
    return model.clone(num_heads=tuple(len(h) for h in keep_heads),
                       mlp_dim=tuple(len(m) for m in keep_mlp),
                       head_dim=model.resolved_head_dim)


def prune_structured(model: VisionTransformer, params: Any, *, head_ratio: float = 0.0,
                     mlp_ratio: float = 0.0, scope: str = 'layerwise', min_heads: int = 1,
                     min_mlp: int = 1) -> tuple[VisionTransformer, Any]:
    """Removes the lowest-norm fraction of heads and MLP units; returns (model, params).

    'layerwise' removes round(ratio * n) units from every block; 'global' ranks
    all blocks' units together (per-block counts then differ) and removes
    round(ratio * n) in all. At least `min_heads` / `min_mlp` units stay in every
    block: fewer are removed only when the minimums leave no more to remove.
    """
    keep_h, keep_m = strongest_units(params, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
                                     scope=scope, min_heads=min_heads, min_mlp=min_mlp)
    return smaller_model(model, keep_h, keep_m), remove_units(params, keep_h, keep_m)


def strongest_units(params: Any, *, head_ratio: float = 0.0, mlp_ratio: float = 0.0,
                    scope: str = 'layerwise', min_heads: int = 1, min_mlp: int = 1
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per block, the (sorted) indices of the heads and MLP units `prune_structured` keeps:
    for `remove_units`, where no model object is at hand (a checkpoint file)."""
    heads, mlps = unit_scores(params)
    return (_keep_top(heads, head_ratio, scope, min_heads),
            _keep_top(mlps, mlp_ratio, scope, min_mlp))


def nonzero_units(scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per block, the indices of units with any non-zero kernel weight (at least one stays)."""
    return [np.flatnonzero(s > 0) if (s > 0).any() else np.array([int(np.argmax(s))])
            for s in scores]


def prune_zero_units(model: VisionTransformer, params: Any) -> tuple[VisionTransformer, Any]:
    """Removes every head and MLP unit whose kernels are all zero (one unit per block stays)."""
    heads, mlps = unit_scores(params)
    keep_h, keep_m = nonzero_units(heads), nonzero_units(mlps)
    return smaller_model(model, keep_h, keep_m), remove_units(params, keep_h, keep_m)


def matmul_flops(model: VisionTransformer, image_size: int) -> int:
    """Forward multiply-add FLOPs (x2) of the matrix products of one image."""
    from sparse_vit_jax.models import per_block

    n = (image_size // model.patch_size) ** 2 + 1
    d, dh = model.hidden_size, model.resolved_head_dim
    heads = per_block(model.num_heads, model.num_layers, 'num_heads')
    mlps = per_block(model.mlp_dim, model.num_layers, 'mlp_dim')
    flops = 2 * (n - 1) * model.patch_size ** 2 * 3 * d + 2 * d * model.num_classes
    for h, m in zip(heads, mlps):
        flops += 2 * n * d * h * dh * 4 + 2 * 2 * n * n * h * dh + 2 * 2 * n * d * m
    return flops
