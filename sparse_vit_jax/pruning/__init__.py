"""Pruning: pure mask functions, mask-keeping optimizers, and structured removal."""

from sparse_vit_jax.pruning.evaluate import (
                                         evaluate_at_ratios,
                                         evaluate_nm,
                                         ratio_text,
                                         weight_stats,
)
from sparse_vit_jax.pruning.keep import (
                                         GradualPruningState,
                                         KeepMasksState,
                                         gradual_pruning,
                                         keep_masks,
                                         keep_zeros,
                                         polynomial_sparsity,
)
from sparse_vit_jax.pruning.masks import (
                                         apply_masks,
                                         check_masks,
                                         format_report,
                                         magnitude_masks,
                                         nm_masks,
                                         parse_nm,
                                         sparsity_report,
                                         zero_masks,
)
from sparse_vit_jax.pruning.structured import (
                                         matmul_flops,
                                         nonzero_units,
                                         prune_structured,
                                         prune_zero_units,
                                         remove_units,
                                         strongest_units,
                                         unit_scores,
)

__all__ = ['magnitude_masks', 'nm_masks', 'parse_nm', 'zero_masks', 'apply_masks',
           'check_masks', 'sparsity_report', 'format_report', 'keep_masks', 'keep_zeros',
           'gradual_pruning', 'polynomial_sparsity', 'KeepMasksState', 'GradualPruningState',
           'prune_structured', 'prune_zero_units', 'strongest_units', 'remove_units',
           'unit_scores', 'nonzero_units', 'matmul_flops', 'evaluate_at_ratios', 'evaluate_nm',
           'ratio_text', 'weight_stats']
