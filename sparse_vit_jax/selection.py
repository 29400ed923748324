"""Which parameters are regularised and pruned: one selector shared by both.

A selection is a pytree of Python bools shaped like the parameters, built from
regular expressions over '/'-joined paths such as
``Transformer/encoderblock_3/MultiHeadDotProductAttention_0/query/kernel``.
Bools (not arrays) keep the selection static under `jax.jit`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

from sparse_vit_jax.errors import UserError

# The paper's pool (torch.nn.utils.prune over its model): patch embedding, both
# LayerNorm scales and the q/k/v/out and MLP kernels of every block, and the
# classifier. Not pruned: biases, position embedding, class token, encoder_norm.
PAPER_POOL: tuple[str, ...] = (
    r'embedding/kernel',
    r'Transformer/encoderblock_\d+/LayerNorm_\d+/scale',
    r'Transformer/encoderblock_\d+/MultiHeadDotProductAttention_0/(query|key|value|out)/kernel',
    r'Transformer/encoderblock_\d+/MlpBlock_0/Dense_\d+/kernel',
    r'head/kernel',
)

# The pool's kernels: what N:M pruning groups (a LayerNorm scale has no input dimension).
KERNEL_POOL: tuple[str, ...] = tuple(p for p in PAPER_POOL if 'scale' not in p)

Patterns = str | Sequence[str] | None


def path_str(path: tuple[Any, ...]) -> str:
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _compile(patterns: Patterns) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise UserError(f'invalid parameter-selection regex {e.pattern!r}: {e}') from None


def select(params: Any, include: Patterns = PAPER_POOL, exclude: Patterns = None) -> Any:
    """Pytree of bools: True where the path fully matches an include and no exclude regex."""
    inc, exc = _compile(include), _compile(exclude)

    def pick(path: tuple[Any, ...], _: Any) -> bool:
        s = path_str(path)
        return any(p.fullmatch(s) for p in inc) and not any(p.fullmatch(s) for p in exc)

    chosen = jax.tree_util.tree_map_with_path(pick, params)
    if not any(jax.tree.leaves(chosen)):
        but = f' (exclude {exclude!r})' if exclude else ''
        raise UserError(f'parameter selection {include!r}{but} matches no parameter; paths '
                        'look like Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')
    return chosen


def selected_paths(params: Any, selection: Any) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(selection)[0]
    return [path_str(p) for p, s in flat if s]
