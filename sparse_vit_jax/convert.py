"""Converts any supported ViT checkpoint to our `.npz` (official names), losslessly.

    python -m sparse_vit_jax.convert SRC DST.npz --model ViT-B_16

The class count, image size and representation size are read from the source;
the result is checked key by key and shape by shape against the named variant (at
the weights' own heads and MLP units per block, where they differ), and written
atomically to a new file (an existing one is never overwritten). No fix-up (resize,
head re-init) is applied here: that is `load_pretrained`'s job at fine-tuning time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from sparse_vit_jax.checkpoints import check_tree, flatten, other_widths, read_checkpoint
from sparse_vit_jax.checkpoints.io import save_npz
from sparse_vit_jax.cli import skip_tpu_without_chips
from sparse_vit_jax.errors import UserError, run_cli
from sparse_vit_jax.models import VARIANTS, abstract_params, create_model


def convert(src: str, dst: str, model_name: str) -> str:
    if model_name not in VARIANTS:
        raise UserError(f'unknown model {model_name!r}; choose one of {", ".join(VARIANTS)}')
    if not dst.endswith('.npz'):
        raise UserError(f'destination must end in .npz, got {dst}')
    if os.path.lexists(dst):
        raise UserError(f'{dst} already exists; choose a new name (nothing is overwritten)')
    v = VARIANTS[model_name]
    flat, source = read_checkpoint(src, v['num_heads'])
    pos = flat.get('Transformer/posembed_input/pos_embedding')
    if pos is None or 'head/kernel' not in flat:
        raise UserError(f'{src}: no position embedding or head found; not a complete ViT')
    grid = math.isqrt(pos.shape[1] - 1)
    image_size = grid * v['patch_size']
    rep = flat['pre_logits/kernel'].shape[1] if 'pre_logits/kernel' in flat else None
    widths, narrower = other_widths(flat, v), ''  # a structurally pruned model's
    if widths:
        narrower = (f', heads per block {list(widths["num_heads"])}, MLP units per block '
                    f'{list(widths["mlp_dim"])}')
        widths['head_dim'] = v['hidden_size'] // v['num_heads']
    model = create_model(model_name, num_classes=flat['head/kernel'].shape[-1],
                         image_size=image_size, representation_size=rep, **widths)
    check_tree(flat, flatten(abstract_params(model, image_size)), src)
    save_npz(dst, flat)
    return (f'wrote {dst}: {model_name}{narrower}, {len(flat)} arrays, image size {image_size}, '
            f'{flat["head/kernel"].shape[-1]} classes, source numerics {source!r}')


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog='python -m sparse_vit_jax.convert', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src', help='.npz, .pth/.pt/.bin (asyml, HuggingFace, timm) or .safetensors')
    ap.add_argument('dst', help='output .npz')
    ap.add_argument('--model', required=True, help=f'one of {", ".join(VARIANTS)}')
    args = ap.parse_args(argv)
    skip_tpu_without_chips()  # before JAX starts its backends: no libtpu errors on GPU/CPU hosts
    print(run_cli(convert, args.src, args.dst, args.model))


if __name__ == '__main__':
    main(sys.argv[1:])
