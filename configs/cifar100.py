"""CIFAR100: the paper's recipe, ViT-B/16 at 384 px from ImageNet21K(+1k) weights.

    python -m sparse_vit_jax.main --config=configs/cifar100.py --workdir=runs/cifar100 \
        --config.pretrained=/path/to/imagenet21k+imagenet2012_ViT-B_16.pth \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs the prepared TFDS 'cifar100' in data_dir (nothing is downloaded) and the
pretrained weights. Produces checkpoints, results.json/.csv (test accuracy,
unpruned and pruned at 10..50%) and TensorBoard logs. The paper reports
fine-tuning on CIFAR-100 for 20 epochs with batch 16; add --config.smoke=True for a
quick CPU check of the whole job with a tiny model.
"""

from sparse_vit_jax.configs import base_config


def get_config():
    c = base_config()
    c.model.name, c.model.image_size = 'ViT-B_16', 384
    c.model.numerics = 'auto'      # from the weights' format (the paper's .pth: 'asyml')
    c.data.name = 'cifar100'
    c.data.shuffle_buffer = 50_000  # the whole train split (the paper forgot to shuffle)
    c.batch_size, c.num_epochs = 16, 20.0
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = 'sgd', 1e-3, 0.9
    c.optimizer.weight_decay, c.optimizer.weight_decay_mode = 1e-4, 'coupled'
    c.schedule.name, c.schedule.warmup_steps = 'onecycle', 500
    c.sparsity.attention.weight, c.sparsity.attention.layers = 0.01, 'last'
    return c
