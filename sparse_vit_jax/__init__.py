"""sparse_vit_jax: sparsity-regularised fine-tuning and pruning of Vision Transformers."""

__version__ = '0.1.0'
