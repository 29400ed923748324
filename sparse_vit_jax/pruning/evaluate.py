"""Pruning evaluation: prune the same weights at every ratio (or N:M pattern), evaluate each.

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
    nm_masks,
    parse_nm,
    sparsity_report,
)
from sparse_vit_jax.selection import KERNEL_POOL, PAPER_POOL, select


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
    cases = [({'ratio': r}, f'{ratio_text(r)} ({scope})', f'ratio {r} ({scope})', lambda m=m: m)
             for r, m in zip(ratios, masks)]
    rows, report = _evaluate_each(params, cases, evaluate, include, to_host, log)
    return rows, '# Per-tensor sparsity after pruning\n\n' + report


def evaluate_nm(params: Any, patterns: Sequence[str],
                evaluate: Callable[[Any], dict[str, Any]], *,
                include: Sequence[str] | None = None,
                to_host: Callable[[Any], Any] = jax.device_get,
                log: Callable[[str], None] | None = None,
                ) -> tuple[list[dict[str, Any]], str]:
    """`evaluate_at_ratios` for N:M patterns ('2:4': 2 kept in every 4 consecutive inputs of
    each kernel of the pool, or of `include`): one row per pattern, with `ratio` 1 - n/m."""
    include = list(include) if include else None
    cases = []
    for p in patterns:
        n, m = parse_nm(p)
        masks_of = jax.jit(lambda w, n=n, m=m: nm_masks(w, n, m, select=include))
        cases.append(({'pattern': f'{n}:{m}', 'ratio': 1 - n / m}, f'{n}:{m} (N:M)',
                      f'N:M {n}:{m}', lambda f=masks_of: f(params)))
    rows, report = _evaluate_each(params, cases, evaluate, include or KERNEL_POOL, to_host, log)
    return rows, '# Per-tensor sparsity after N:M pruning\n\n' + report


def _evaluate_each(params: Any, cases: list[tuple[dict[str, Any], str, str, Callable[[], Any]]],
                   evaluate: Callable[[Any], dict[str, Any]], pool: Sequence[str] | None,
                   to_host: Callable[[Any], Any], log: Callable[[str], None] | None
                   ) -> tuple[list[dict[str, Any]], str]:
    """Per (row head, log label, report title, masks maker): prune, report, evaluate."""
    rows, reports = [], []
    for head, label, title, masks_of in cases:
        pruned = apply_masks(params, masks_of())
        host = to_host(pruned)
        report = sparsity_report(host, pool)
        ev = evaluate(pruned)
        leaves = jax.tree.leaves(host)
        rows.append({**head, **ev, 'pool_sparsity': report['fraction'],
                     'nonzero_params': sum(int(np.count_nonzero(x)) for x in leaves),
                     'total_params': sum(int(x.size) for x in leaves)})
        reports.append(f'## {title}\n\n```\n{format_report(report)}\n```\n')
        if log is not None:
            log(f'prune {label} | accuracy {ev["accuracy"]:.4f} | loss {ev["loss"]:.4f} | '
                f'pool sparsity {report["fraction"]:.4f}')
    return rows, '\n'.join(reports)


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
