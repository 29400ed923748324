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

from sparse_vit_jax.checkpoints import block_widths, check_tree, flatten, read_checkpoint
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
    widths, narrower = _widths(flat, v), ''
    if widths:
        narrower = (f', heads per block {list(widths["num_heads"])}, MLP units per block '
                    f'{list(widths["mlp_dim"])}')
    model = create_model(model_name, num_classes=flat['head/kernel'].shape[-1],
                         image_size=image_size, representation_size=rep, **widths)
    check_tree(flat, flatten(abstract_params(model, image_size)), src)
    save_npz(dst, flat)
    return (f'wrote {dst}: {model_name}{narrower}, {len(flat)} arrays, image size {image_size}, '
            f'{flat["head/kernel"].shape[-1]} classes, source numerics {source!r}')


def _widths(flat: dict, variant: dict) -> dict:
    """Per-block heads and MLP units where the weights' differ from the variant's (a
    structurally pruned model: `main` reads them back from the `.npz`); {} otherwise, or
    where the depth or head size differ (then the shape check names what does not fit)."""
    found = block_widths(flat)
    head_dim = variant['hidden_size'] // variant['num_heads']
    if (found is None or len(found['num_heads']) != variant['num_layers']
            or found['head_dim'] != head_dim
            or all(set(found[k]) == {variant[k]} for k in ('num_heads', 'mlp_dim'))):
        return {}
    return {'num_heads': found['num_heads'], 'mlp_dim': found['mlp_dim'], 'head_dim': head_dim}


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
