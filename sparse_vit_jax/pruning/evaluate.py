"""Pruning evaluation: prune the same weights at every ratio and evaluate each.

The evaluation itself is the caller's (`evaluate(params) -> dict`), so this
works with any model, data and engine. One selection pass serves all ratios
(`magnitude_masks` with a sequence of ratios).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sparse_vit_jax.pruning.masks import (
    apply_masks,
    format_report,
    magnitude_masks,
    sparsity_report,
)
from sparse_vit_jax.selection import PAPER_POOL, select


def ratio_text(ratio: float) -> str:
    """A ratio for a log line: two decimals, or every digit it has (0.125 is not 0.12)."""
    return f'{ratio:.2f}' if round(ratio, 2) == ratio else f'{ratio:g}'


def evaluate_at_ratios(params: Any, ratios: Sequence[float],
                       evaluate: Callable[[Any], dict[str, Any]], *, scope: str = 'global',
                       include: Sequence[str] | None = None,
                       to_host: Callable[[Any], Any] = jax.device_get,
                       log: Callable[[str], None] | None = None,
                       ) -> tuple[list[dict[str, Any]], str]:
    """(one row per ratio: the evaluation, pool sparsity and non-zero count; a per-tensor
    sparsity report in markdown). Each ratio prunes `params` as given (unpruned)."""
    include = list(include) if include else None
    masks = magnitude_masks(params, list(ratios), scope=scope, select=include)
    rows, reports = [], []
    for ratio, m in zip(ratios, masks):
        pruned = apply_masks(params, m)
        host = to_host(pruned)
        report = sparsity_report(host, include)
        ev = evaluate(pruned)
        leaves = jax.tree.leaves(host)
        rows.append({'ratio': ratio, **ev, 'pool_sparsity': report['fraction'],
                     'nonzero_params': sum(int(np.count_nonzero(x)) for x in leaves),
                     'total_params': sum(int(x.size) for x in leaves)})
        reports.append(f'## ratio {ratio} ({scope})\n\n```\n{format_report(report)}\n```\n')
        if log is not None:
            log(f'prune {ratio_text(ratio)} ({scope}) | accuracy {ev["accuracy"]:.4f} | loss '
                f'{ev["loss"]:.4f} | pool sparsity {report["fraction"]:.4f}')
    return rows, '# Per-tensor sparsity after pruning\n\n' + '\n'.join(reports)


def weight_stats(params: Any, include: Sequence[str] | None = None) -> dict[str, Any]:
    """The |w| distribution over the pool (host arrays): zeros, small fractions, quantiles."""
    sel = select(params, list(include) if include else PAPER_POOL)
    w = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel()
                        for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(sel)) if s])
    q = np.quantile(w, [0.1, 0.5, 0.9])
    return {'zero': float((w == 0).mean()), 'below_1e-3': float((w < 1e-3).mean()),
            'below_1e-2': float((w < 1e-2).mean()), 'q10': float(q[0]), 'median': float(q[1]),
            'q90': float(q[2]), 'histogram_log10': np.histogram(
                np.log10(w[w > 0]), bins=np.arange(-8, 1.01, 0.5))[0].tolist()}
