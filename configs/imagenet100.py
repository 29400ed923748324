"""ImageNet-100: the paper's recipe, ViT-B/16 at 384 px from ImageNet21K(+1k) weights.

    python -m sparse_vit_jax.main --config=configs/imagenet100.py --workdir=runs/in100 \
        --config.pretrained=/path/to/imagenet21k+imagenet2012_ViT-B_16.pth \
        --config.data.root=/path/to/imagenet100 \
        --config.data.class_list=/path/to/imagenet100_classes.txt

Data: a folder tree root/{train,val}/<wnid>/*.JPEG (prepared once into TFRecords
in data_dir), or --config.data.source=imagenet2012 to filter a prepared TFDS
imagenet2012 by the class list. Labels are the class list's order. Nothing is
downloaded. Note: ImageNet-1k fine-tuned weights have seen these classes' images.
Produces checkpoints, results.json/.csv and TensorBoard logs. On a TPU or a GPU (NVIDIA's from
Ampere) the step runs in bfloat16, with cuDNN's fused attention on those GPUs, and hashed
dropout masks and the GELU out of the matmul's epilogue on any GPU (model.dtype /
model.attention_impl / model.dropout_impl / model.gelu_form 'auto'); on a CPU in float32.
Expected: not reproduced here (no weights or data offline).
"""

from sparse_vit_jax.configs import base_config, paper_recipe


def get_config():
    c = paper_recipe(base_config(), 'imagenet100')
    c.data.source = 'folder'
    return c
