"""CIFAR100: the paper's recipe, ViT-B/16 at 384 px from ImageNet21K(+1k) weights.

    python -m sparse_vit_jax.main --config=configs/cifar100.py --workdir=runs/cifar100 \
        --config.pretrained=/path/to/imagenet21k+imagenet2012_ViT-B_16.pth \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs the prepared TFDS 'cifar100' in data_dir (nothing is downloaded) and the
pretrained weights. Produces checkpoints, results.json/.csv (test accuracy,
unpruned and pruned at 10..50%) and TensorBoard logs. The paper reports
fine-tuning on CIFAR-100 for 20 epochs with batch 16; add --config.smoke=True for a
quick CPU check of the whole job with a tiny model.
Expected: not reproduced here (no weights or data offline). For scale, the official
vision_transformer code reports 92.06% on CIFAR-100 for ViT-B/16 at 384 px with its own
recipe (10k steps, batch 512, dropout 0).
"""

from sparse_vit_jax.configs import base_config, paper_recipe


def get_config():
    c = paper_recipe(base_config(), 'cifar100')
    return c
