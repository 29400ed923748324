"""Magnitude and N:M pruning masks as pure, jit-able functions over the parameter pytree.

A mask tree has the parameters' structure: a bool array (True = kept) for every
selected leaf and None elsewhere.

Global magnitude pruning reproduces `torch.nn.utils.prune.global_unstructured(
..., pruning_method=L1Unstructured, amount=ratio)`: one threshold over the
pooled tensors, exactly k = round(ratio * pool_size) weights pruned (Python's
round, half to even, as torch), no per-tensor normalisation. Weights tied at the
threshold are pruned in pool order (pytree order, then row-major index), which
makes the result deterministic; torch's `topk` leaves that order unspecified.

The k-th smallest |w| is found without sorting: |w| as float32 bits is an
order-preserving uint32, so two 65536-bin histograms (high then low 16 bits)
give the exact threshold in two passes over the weights. A sweep over ratios
shares the first pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.selection import KERNEL_POOL, PAPER_POOL, Patterns, path_str
from sparse_vit_jax.selection import select as select_params

_BINS = 1 << 16


def _is_none(x: Any) -> bool:
    return x is None


def _bits(w: jax.Array) -> jax.Array:
    """|w| as order-preserving uint32 (float32 bit pattern without the sign)."""
    return jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.uint32)


def _num_pruned(sparsity: float | jax.Array, size: int) -> int | jax.Array:
    if isinstance(sparsity, (int, float)):
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f'pruning ratio must be in [0, 1), got {sparsity}')
        return round(sparsity * size)  # as torch.nn.utils.prune
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def _hist(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """65536-bin histogram of uint16-range `values` (optionally weighted by 0/1 flags)."""
    ones = jnp.ones((), jnp.int32) if weights is None else weights.astype(jnp.int32)
    return jnp.zeros(_BINS, jnp.int32).at[values.astype(jnp.int32)].add(
        ones, mode='promise_in_bounds')


def _row_search(cum: jax.Array, k: jax.Array) -> jax.Array:
    return jax.vmap(lambda c, v: jnp.searchsorted(c, v, side='left'))(cum, k)


def _take(rows: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(rows, idx[:, None], axis=1)[:, 0]


def _per_segment(hists: list[jax.Array], layerwise: bool) -> jax.Array:
    return jnp.stack(hists) if layerwise else sum(hists)[None]


@functools.partial(jax.jit, static_argnames=('layerwise',))
def _keep_lowest(leaves: list[jax.Array], ks: jax.Array, layerwise: bool
                 ) -> list[list[jax.Array]]:
    """Keep-masks pruning the ks[r, s] smallest |w| of each segment s, for every ratio r.

    A segment is the whole pool (global) or one leaf (layerwise). Every pass is
    one independent op per leaf (XLA runs them concurrently); weights tied at
    the threshold are pruned in pool order.
    """
    bits = [_bits(w) for w in leaves]
    seg = list(range(len(bits))) if layerwise else [0] * len(bits)
    hist_hi = _per_segment([_hist(b >> 16) for b in bits], layerwise)
    cum_hi = jnp.cumsum(hist_hi, axis=1)
    results = []
    for r in range(ks.shape[0]):
        k = ks[r]
        b_hi = _row_search(cum_hi, k)
        below = _take(cum_hi, b_hi) - _take(hist_hi, b_hi)
        hist_lo = _per_segment([_hist(b & 0xFFFF, (b >> 16) == b_hi[s])
                                for b, s in zip(bits, seg)], layerwise)
        cum_lo = jnp.cumsum(hist_lo, axis=1)
        b_lo = _row_search(cum_lo, k - below)
        threshold = (b_hi.astype(jnp.uint32) << 16) | b_lo.astype(jnp.uint32)
        ties = _take(hist_lo, b_lo)
        ties_needed = k - (below + _take(cum_lo, b_lo) - ties)

        def prune_all_ties(_: None, threshold: jax.Array = threshold) -> list[jax.Array]:
            return [b > threshold[s] for b, s in zip(bits, seg)]

        def split_ties(_: None, threshold: jax.Array = threshold,
                       ties_needed: jax.Array = ties_needed) -> list[jax.Array]:
            eq = [b == threshold[s] for b, s in zip(bits, seg)]
            rank = jnp.cumsum(jnp.concatenate([e.reshape(-1) for e in eq]), dtype=jnp.int32) - 1
            out, start = [], 0
            for b, e, s in zip(bits, eq, seg):
                r_leaf = rank[start:start + b.size].reshape(b.shape)
                if layerwise and start:  # rank within this leaf only
                    r_leaf = r_leaf - rank[start - 1] - 1
                out.append((b > threshold[s]) | (e & (r_leaf >= ties_needed[s])))
                start += b.size
            return out

        results.append(jax.lax.cond(jnp.all(ties == ties_needed), prune_all_ties, split_ties,
                                    None))
    return results


def _selection(params: Any, select: Any, default: Patterns = PAPER_POOL) -> Any:
    """A bool tree from a bool tree, regex pattern(s), or None (= `default`)."""
    if select is None or isinstance(select, (str, list, tuple)):
        return select_params(params, default if select is None else select)
    return select


def _selected(params: Any, select: Any) -> tuple[list[Any], list[jax.Array], Any]:
    sel = _selection(params, select)
    leaves, treedef = jax.tree.flatten(params)
    flags = treedef.flatten_up_to(sel)
    chosen = [w for w, f in zip(leaves, flags) if f]
    if not chosen:
        raise UserError('the pruning pool is empty: the selection matches no parameter')
    return flags, chosen, treedef


def _assemble(flags: list[bool], kept: list[jax.Array], treedef: Any) -> Any:
    it = iter(kept)
    return treedef.unflatten([next(it) if f else None for f in flags])


def magnitude_masks(params: Any, sparsity: float | jax.Array | Sequence[float], *,
                    scope: str = 'global', select: Any = None) -> Any:
    """Keep-masks pruning the smallest-|w| fraction `sparsity` of the selected weights.

    scope 'global': one threshold over the pool (torch global_unstructured);
    'layerwise': each tensor pruned by the same fraction (torch L1Unstructured).
    select: a bool tree, regex pattern(s), or None for the paper's pool.
    A sequence of sparsities returns a list of mask trees, sharing the first pass.
    """
    if scope not in ('global', 'layerwise'):
        raise UserError(f"pruning scope must be 'global' or 'layerwise', got {scope!r}")
    flags, chosen, treedef = _selected(params, select)
    many = isinstance(sparsity, (list, tuple))
    ratios = list(sparsity) if many else [sparsity]
    sizes = tuple(int(np.prod(w.shape)) for w in chosen)
    segments = sizes if scope == 'layerwise' else (sum(sizes),)
    if all(isinstance(r, (int, float)) for r in ratios):
        ks = np.array([[_num_pruned(r, n) for n in segments] for r in ratios], np.int32)
    else:
        ks = jnp.stack([jnp.stack([jnp.asarray(_num_pruned(r, n), jnp.int32)
                                   for n in segments]) for r in ratios])
    if isinstance(ks, np.ndarray) and not ks.any():  # nothing to prune (gradual pruning's
        kept = [[jnp.ones(w.shape, bool) for w in chosen] for _ in ratios]  # start): no pass
    else:
        kept = _keep_lowest(chosen, ks, scope == 'layerwise')
    trees = [_assemble(flags, k, treedef) for k in kept]
    return trees if many else trees[0]


def zero_masks(params: Any, *, select: Any = None) -> Any:
    """Keep-masks of the selected weights that are not exactly zero: the masks of weights
    pruned before (an exported pruned model, a pruned run). A selected tensor with no
    non-zero entry is kept whole (all True): it was never trained (a zero-initialised
    classifier), not pruned. select: as for `magnitude_masks`."""
    flags, chosen, treedef = _selected(params, select)
    return _assemble(flags, [(w != 0) | ~jnp.any(w != 0) for w in chosen], treedef)


def _input_dims(path: str, ndim: int) -> int:
    """How many leading axes of a kernel are its input: 1 for q/k/v (D, H, Dh)."""
    return 1 if path.rsplit('/', 2)[-2] in ('query', 'key', 'value') else ndim - 1


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): n kept of every m, 0 < n < m (n = m would prune nothing)."""
    n, sep, m = str(pattern).strip().partition(':')
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise UserError(f'N:M pattern {pattern!r} is not "n:m" with whole numbers 0 < n < m '
                        '(e.g. "2:4": 2 kept in every 4 consecutive inputs)')
    return int(n), int(m)


def nm_masks(params: Any, n: int = 2, m: int = 4, *, select: Any = None) -> Any:
    """N:M keep-masks: in every group of m consecutive inputs of each output, keep the n largest.

    Groups run along each kernel's input dimension (q/k/v: D; out: H*Dh;
    Dense: in; conv: kh*kw*in). Ties keep the lower input index. Default
    selection: the kernels of the paper's pool (LayerNorm scales excluded).
    """
    if not 0 < n <= m:
        raise UserError(f'N:M pruning needs 0 < n <= m, got {n}:{m}')
    sel = _selection(params, select, default=KERNEL_POOL)

    def one(path: tuple[Any, ...], w: jax.Array, chosen: bool) -> jax.Array | None:
        if not chosen:
            return None
        name = path_str(path)
        if w.ndim < 2:
            raise UserError(f'{name} is {w.ndim}-D: N:M pruning groups the inputs of kernels; '
                            'leave it out of the selection')
        k = _input_dims(name, w.ndim)
        fan_in = int(np.prod(w.shape[:k]))
        if fan_in % m:
            raise UserError(f'{name}: input size {fan_in} is not divisible by m={m} '
                            'for N:M pruning; use an m that divides every kernel\'s inputs')
        g = jnp.abs(w.reshape(fan_in // m, m, -1))
        order = jnp.argsort(-g, axis=1, stable=True)
        rank = jnp.argsort(order, axis=1, stable=True)
        return (rank < n).reshape(w.shape)

    return jax.tree_util.tree_map_with_path(one, params, sel)


def check_masks(params: Any, masks: Any) -> None:
    """UserError unless `masks` has params' structure (None allowed) and matching shapes."""
    try:
        pairs = jax.tree.map(lambda m, p: (m, p), masks, params, is_leaf=_is_none)
    except ValueError as e:
        raise UserError(f'pruning masks do not match the parameters\' structure: {e}') from None
    for path, (m, p) in jax.tree_util.tree_flatten_with_path(
            pairs, is_leaf=lambda x: isinstance(x, tuple))[0]:
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise UserError(f'pruning mask for {path_str(path)} has shape {tuple(m.shape)}, '
                            f'the parameter {tuple(p.shape)}')


def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes pruned weights; leaves without a mask (None) are returned unchanged."""
    check_masks(params, masks)
    return jax.tree.map(lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros_like(p)),
                        masks, params, is_leaf=_is_none)


def sparsity_report(params: Any, select: Any = None) -> dict[str, Any]:
    """Per-tensor and total size, zeros and zero fraction over the selection (default: pool)."""
    sel = _selection(params, select)
    rows = []
    for path, (w, s) in jax.tree_util.tree_flatten_with_path(
            jax.tree.map(lambda a, b: (a, b), params, sel),
            is_leaf=lambda x: isinstance(x, tuple))[0]:
        if s:
            size, zeros = int(np.prod(w.shape)), int(jnp.sum(w == 0))
            rows.append(dict(name=path_str(path), size=size, zeros=zeros,
                             fraction=zeros / size))
    size = sum(r['size'] for r in rows)
    zeros = sum(r['zeros'] for r in rows)
    return dict(tensors=rows, size=size, zeros=zeros, fraction=zeros / max(size, 1))


def format_report(report: dict[str, Any]) -> str:
    lines = [f'{"tensor":<72} {"size":>10} {"zeros":>10} {"fraction":>8}']
    for r in report['tensors']:
        lines.append(f'{r["name"]:<72} {r["size"]:>10} {r["zeros"]:>10} {r["fraction"]:>8.4f}')
    lines.append(f'{"total":<72} {report["size"]:>10} {report["zeros"]:>10} '
                 f'{report["fraction"]:>8.4f}')
    return '\n'.join(lines)
