"""Pretrained weights: official `.npz`, the paper's asyml `.pth`, HuggingFace and timm.

`load_pretrained(path, target)` returns parameters shaped like `target` (a real
or `jax.eval_shape` tree) after three documented fix-ups, and otherwise fails
on the first key or shape that does not match:

1. `pre_logits` is dropped when the target model has no representation layer;
2. the classifier `head` is taken from the target (re-initialised) when its
   shape differs (e.g. the zeroed 21843-class ImageNet21K head) or when asked;
3. the position embedding grid is resized as the official code does
   (bilinear `scipy.ndimage.zoom(order=1)` on the grid, class token kept).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sparse_vit_jax.checkpoints.io import read_checkpoint, save_npz
from sparse_vit_jax.errors import UserError

POSEMB = 'Transformer/posembed_input/pos_embedding'
ATTENTION = 'MultiHeadDotProductAttention_0'


def flatten(tree: Any) -> dict[str, Any]:
    return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, Any]) -> Any:
    return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def resize_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
    """(1, 1 + g*g, D) -> (1, num_tokens, D): bilinear zoom of the grid, class token kept."""
    from scipy import ndimage

    tok, grid = posemb[:, :1], posemb[0, 1:]
    gs_old, gs_new = math.isqrt(len(grid)), math.isqrt(num_tokens - 1)
    if gs_old * gs_old != len(grid) or gs_new * gs_new != num_tokens - 1:
        raise UserError(f'cannot resize position embeddings from {posemb.shape[1]} to '
                        f'{num_tokens} tokens: only square patch grids are supported')
    grid = grid.reshape(gs_old, gs_old, -1)
    grid = ndimage.zoom(grid, (gs_new / gs_old, gs_new / gs_old, 1), order=1)
    return np.concatenate([tok, grid.reshape(1, gs_new * gs_new, -1)], axis=1).astype(posemb.dtype)


def num_heads_of(flat_target: dict[str, Any]) -> int:
    key = f'Transformer/encoderblock_0/{ATTENTION}/query/kernel'
    return flat_target[key].shape[1] if key in flat_target else 1


def block_widths(shapes: dict[str, Any]) -> dict[str, Any] | None:
    """Per-block attention heads and MLP units, and the head dimension, read from parameter
    shapes (official names; any values with a `.shape`, or shapes themselves): a structurally
    pruned model's widths differ per block. None when the blocks are not all there."""
    shape = lambda k: tuple(getattr(shapes[k], 'shape', shapes[k]))  # noqa: E731
    layers = sorted(int(m[1]) for k in shapes
                    if (m := re.match(r'Transformer/encoderblock_(\d+)/LayerNorm_0/scale$', k)))
    blocks = [f'Transformer/encoderblock_{i}/' for i in layers]
    try:
        query = [shape(f'{b}{ATTENTION}/query/kernel') for b in blocks]
        mlp = [shape(f'{b}MlpBlock_0/Dense_0/kernel')[1] for b in blocks]
    except (KeyError, IndexError):
        return None
    if not layers or layers != list(range(len(layers))) or any(len(q) != 3 for q in query):
        return None
    return {'num_heads': tuple(q[1] for q in query), 'mlp_dim': tuple(mlp),
            'head_dim': query[0][2]}


def other_widths(shapes: dict[str, Any], model: dict[str, int]) -> dict[str, Any]:
    """{'num_heads', 'mlp_dim'}: per-block widths of weights (their shapes, `block_widths`)
    that differ from `model`'s (num_layers, num_heads, hidden_size, mlp_dim: a structurally
    pruned model); {} where they are the model's, or do not fit it (another depth or head
    size: loading then names the first misshapen parameter)."""
    found = block_widths(shapes)
    if (found is None or len(found['num_heads']) != model['num_layers']
            or found['head_dim'] != model['hidden_size'] // model['num_heads']):
        return {}
    widths = {k: found[k] for k in ('num_heads', 'mlp_dim')}
    return {} if all(set(widths[k]) == {model[k]} for k in widths) else widths


def load_pretrained(path: str | os.PathLike, target: Any, *,
                    reinit_head: bool = False) -> tuple[Any, str]:
    """Loads a checkpoint onto `target`'s structure; returns (params, source).

    source ('jax', 'asyml', 'hf', 'timm') says which numerics the weights were
    trained with (see `sparse_vit_jax.models.NUMERICS`). Leaves of `target` that
    are taken fresh (the head) keep their value, or zeros for an abstract target.
    """
    want = flatten(target)
    got, source = read_checkpoint(path, num_heads_of(want))
    check_values(got, path)
    if not any(k.startswith('pre_logits/') for k in want):
        got = {k: v for k, v in got.items() if not k.startswith('pre_logits/')}
    head_differs = any(k in got and tuple(got[k].shape) != tuple(want[k].shape)
                       for k in ('head/kernel', 'head/bias'))
    if reinit_head or head_differs or 'head/kernel' not in got:
        got = {k: v for k, v in got.items() if not k.startswith('head/')}
        got.update({k: _fresh(v) for k, v in want.items() if k.startswith('head/')})
    if POSEMB in got and POSEMB in want and got[POSEMB].shape != tuple(want[POSEMB].shape):
        if got[POSEMB].shape[2] == want[POSEMB].shape[2]:
            got[POSEMB] = resize_posemb(got[POSEMB], want[POSEMB].shape[1])
    check_tree(got, want, str(path))
    out = {k: np.asarray(got[k], dtype=want[k].dtype) for k in want}
    return unflatten(out), source


def check_values(flat: dict[str, np.ndarray], path: Any) -> None:
    """UserError naming the first parameter that is not floating point, or not finite."""
    for k, v in sorted(flat.items()):
        if v.dtype.kind not in 'f':
            raise UserError(f'{path}: parameter {k} is {v.dtype}, not floating point; '
                            'quantised or corrupt weights are not loaded')
        if not np.isfinite(v).all():
            raise UserError(f'{path}: parameter {k} holds NaN or infinite values; the file '
                            'is damaged or came from a diverged run')


def _fresh(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return np.zeros(leaf.shape, leaf.dtype)
    return np.asarray(leaf)


def check_tree(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Raises UserError naming the first key (sorted) that is missing, extra or misshapen,
    and the shape of the model the weights hold (to set in the config)."""
    for k in sorted(set(got) | set(want)):
        if k not in got:
            problem = (f'missing parameter {k} (expected shape {tuple(want[k].shape)}); is it '
                       'a checkpoint of another model?')
        elif k not in want:
            problem = (f'unexpected parameter {k} (shape {tuple(got[k].shape)}) that the model '
                       'does not have; is it a checkpoint of another model?')
        elif tuple(got[k].shape) != tuple(want[k].shape):
            problem = (f'{k} has shape {tuple(got[k].shape)}, the model expects '
                       f'{tuple(want[k].shape)}; is it a checkpoint of another variant?')
        else:
            continue
        raise UserError(f'{what}: {problem}{model_of(got)}')


def model_of(flat: dict[str, Any]) -> str:
    """' (the weights: <layers>, hidden size, MLP units, patch size)', or '' where the
    blocks are not all there. Heads are read only from official-layout weights (torch
    files are split into the config's head count)."""
    widths = block_widths(flat)
    embed = flat.get('embedding/kernel')
    if widths is None or embed is None or len(embed.shape) != 4:
        return ''
    mlp = set(widths['mlp_dim'])
    mlp_text = str(mlp.pop()) if len(mlp) == 1 else str(list(widths['mlp_dim']))
    return (f' (the weights: {len(widths["mlp_dim"])} blocks, hidden size {embed.shape[3]}, '
            f'MLP units {mlp_text}, patch size {embed.shape[0]})')


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Writes params as an `.npz` with the official flat '/'-joined names, atomically."""
    save_npz(path, {k: np.asarray(v) for k, v in flatten(params).items()})


__all__ = ['load_pretrained', 'block_widths', 'other_widths', 'read_checkpoint', 'resize_posemb',
           'save_params', 'check_tree', 'check_values', 'flatten', 'unflatten']
