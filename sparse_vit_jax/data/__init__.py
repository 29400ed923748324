"""Input pipelines: TFDS builders (digits, CIFAR, ImageNet-100) and sharded batches."""

from sparse_vit_jax.data.pipeline import (
                                          DATASETS,
                                          Source,
                                          TrainData,
                                          eval_batches,
                                          get_source,
                                          local_batch_size,
                                          split_size,
)

__all__ = ['DATASETS', 'Source', 'TrainData', 'eval_batches', 'get_source', 'local_batch_size',
           'split_size']
