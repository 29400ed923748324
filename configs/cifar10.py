"""CIFAR10: the paper's recipe, ViT-B/16 at 384 px from ImageNet21K(+1k) weights.

    python -m sparse_vit_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 \
        --config.pretrained=/path/to/imagenet21k+imagenet2012_ViT-B_16.pth \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs the prepared TFDS 'cifar10' in data_dir (nothing is downloaded) and the
pretrained weights. Produces checkpoints, results.json/.csv (test accuracy,
unpruned and pruned at 10..50%) and TensorBoard logs. The paper reports
fine-tuning on CIFAR-10 for 20 epochs with batch 16; add --config.smoke=True for a
quick CPU check of the whole job with a tiny model.
Expected: not reproduced here (no weights or data offline). For scale, the official
vision_transformer code reports 99.02% on CIFAR-10 for ViT-B/16 at 384 px with its own
recipe (10k steps, batch 512, dropout 0).
"""

from sparse_vit_jax.configs import base_config, paper_recipe


def get_config():
    c = paper_recipe(base_config(), 'cifar10')
    return c
