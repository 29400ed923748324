"""Our flat parameters (official JAX names) in the layouts other frameworks load.

The inverse of `layouts`: only transposes, reshapes and renames, so a zero stays
a zero. `shape_of` reads a model's widths from its arrays alone (per block, so
structurally pruned models are described too).

- `to_hf`: `transformers.ViTForImageClassification` (the hub's `vit.*` names, which
  transformers 4 and 5 both load) and its `config.json`;
- `to_timm`: a `timm` `VisionTransformer` state dict and timm's `config.json`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_vit_jax.checkpoints import block_widths
from sparse_vit_jax.errors import UserError

Flat = dict[str, np.ndarray]
ATT = 'MultiHeadDotProductAttention_0'
# numerics -> (HF hidden_act, GELU name for timm's act_layer, LayerNorm epsilon)
ACTIVATIONS = {'jax': ('gelu_pytorch_tanh', 'gelu_tanh', 1e-6), 'timm': ('gelu', 'gelu', 1e-6),
               'hf': ('gelu', 'gelu', 1e-12), 'asyml': ('gelu', 'gelu', 1e-5)}
# timm's names for the published ViT shapes: (width, depth, heads, mlp) -> size name
TIMM_SIZES = {(192, 12, 3, 768): 'tiny', (384, 12, 6, 1536): 'small', (768, 12, 12, 3072): 'base',
              (1024, 24, 16, 4096): 'large', (1280, 32, 16, 5120): 'huge'}


def shape_of(flat: Flat) -> dict[str, Any]:
    """Widths read from the arrays: hidden size, patch, image size, classes, per-block heads
    and MLP units (lists), head dimension, representation size (or None)."""
    try:
        kh, _, _, d = flat['embedding/kernel'].shape
        n = flat['Transformer/posembed_input/pos_embedding'].shape[1]
        classes = int(flat['head/kernel'].shape[1])
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f'not a complete ViT parameter set (missing or misshapen {e}); '
                        'export takes our params.npz or a run directory') from None
    widths = block_widths(flat)
    grid = round((n - 1) ** 0.5)
    if widths is None or grid * grid != n - 1:
        raise UserError('not a complete ViT parameter set (blocks missing or a non-square '
                        'patch grid)')
    rep = flat['pre_logits/kernel'].shape[1] if 'pre_logits/kernel' in flat else None
    return {'hidden_size': int(d), 'patch_size': int(kh), 'image_size': int(grid * kh),
            'num_layers': len(widths['num_heads']), 'num_heads': list(widths['num_heads']),
            'mlp_dim': list(widths['mlp_dim']), 'head_dim': widths['head_dim'],
            'num_classes': classes, 'representation_size': rep}


def _uniform(values: list[int]) -> int | None:
    return values[0] if len(set(values)) == 1 else None


def _linear_in(kernel: np.ndarray) -> np.ndarray:
    """(D, H, Dh) or (D, M) kernel -> torch Linear weight (H*Dh or M, D)."""
    return kernel.reshape(kernel.shape[0], -1).T


def _blocks_torch(flat: Flat, s: dict[str, Any], names: dict[str, str]) -> Flat:
    out: Flat = {}
    for i in range(s['num_layers']):
        p, t = f'Transformer/encoderblock_{i}/', names['block'].format(i=i)
        for j, norm in enumerate((names['norm1'], names['norm2'])):
            out[f'{t}{norm}.weight'] = flat[f'{p}LayerNorm_{j}/scale']
            out[f'{t}{norm}.bias'] = flat[f'{p}LayerNorm_{j}/bias']
        for j, fc in enumerate((names['fc1'], names['fc2'])):
            out[f'{t}{fc}.weight'] = flat[f'{p}MlpBlock_0/Dense_{j}/kernel'].T
            out[f'{t}{fc}.bias'] = flat[f'{p}MlpBlock_0/Dense_{j}/bias']
        a = f'{p}{ATT}/'
        qkv = [(_linear_in(flat[f'{a}{n}/kernel']), flat[f'{a}{n}/bias'].reshape(-1))
               for n in ('query', 'key', 'value')]
        if names['qkv'] is None:
            for n, (w, bias) in zip(('query', 'key', 'value'), qkv):
                out[f'{t}{names[n]}.weight'], out[f'{t}{names[n]}.bias'] = w, bias
        else:
            out[f'{t}{names["qkv"]}.weight'] = np.concatenate([w for w, _ in qkv])
            out[f'{t}{names["qkv"]}.bias'] = np.concatenate([bias for _, bias in qkv])
        o = flat[f'{a}out/kernel']  # (H, Dh, D)
        out[f'{t}{names["out"]}.weight'] = o.reshape(-1, o.shape[-1]).T
        out[f'{t}{names["out"]}.bias'] = flat[f'{a}out/bias']
    return out


def _stem(flat: Flat) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """conv weight (out, in, kh, kw), conv bias, class token, position embedding."""
    return (np.transpose(flat['embedding/kernel'], (3, 2, 0, 1)), flat['embedding/bias'],
            flat['cls'], flat['Transformer/posembed_input/pos_embedding'])


def _contiguous(out: Flat) -> Flat:
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def check_exportable(s: dict[str, Any], fmt: str) -> None:
    """Formats with one width for all blocks (hf, timm) cannot hold per-block widths, nor the
    pre-logits layer of the ImageNet21K checkpoints (fine-tuned models have none)."""
    if s['representation_size'] is not None:
        raise UserError(f'{fmt} classifiers have no pre-logits layer; this model has one '
                        '(representation_size): export it as npz')
    if _uniform(s['num_heads']) is None or _uniform(s['mlp_dim']) is None:
        raise UserError(f'{fmt} models have one head count and one MLP width for all blocks; '
                        'these parameters differ per block: export them as npz')
    if s['head_dim'] * s['num_heads'][0] != s['hidden_size']:
        raise UserError(f'{fmt} models have head size = width / heads; these have '
                        f'{s["num_heads"][0]} heads of {s["head_dim"]} in width '
                        f'{s["hidden_size"]}: export them as npz')


def to_hf(flat: Flat, numerics: str) -> tuple[dict[str, Any], Flat]:
    """(config.json contents, state dict) for transformers' ViTForImageClassification."""
    s = shape_of(flat)
    check_exportable(s, 'hf')
    act, _, eps = ACTIVATIONS[numerics]
    conv_w, conv_b, cls, pos = _stem(flat)
    out: Flat = {'vit.embeddings.patch_embeddings.projection.weight': conv_w,
                 'vit.embeddings.patch_embeddings.projection.bias': conv_b,
                 'vit.embeddings.cls_token': cls, 'vit.embeddings.position_embeddings': pos}
    out.update(_blocks_torch(flat, s, {
        'block': 'vit.encoder.layer.{i}.', 'norm1': 'layernorm_before',
        'norm2': 'layernorm_after', 'fc1': 'intermediate.dense', 'fc2': 'output.dense',
        'qkv': None, 'query': 'attention.attention.query', 'key': 'attention.attention.key',
        'value': 'attention.attention.value', 'out': 'attention.output.dense'}))
    out['vit.layernorm.weight'] = flat['Transformer/encoder_norm/scale']
    out['vit.layernorm.bias'] = flat['Transformer/encoder_norm/bias']
    out['classifier.weight'] = flat['head/kernel'].T
    out['classifier.bias'] = flat['head/bias']
    labels = {str(i): f'LABEL_{i}' for i in range(s['num_classes'])}
    config = {
        'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
        'hidden_size': s['hidden_size'], 'num_hidden_layers': s['num_layers'],
        'num_attention_heads': s['num_heads'][0], 'intermediate_size': s['mlp_dim'][0],
        'hidden_act': act, 'layer_norm_eps': eps, 'image_size': s['image_size'],
        'patch_size': s['patch_size'], 'num_channels': 3, 'qkv_bias': True,
        'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
        'initializer_range': 0.02, 'encoder_stride': s['patch_size'],
        'id2label': labels, 'label2id': {v: int(k) for k, v in labels.items()},
        'torch_dtype': 'float32'}
    return config, _contiguous(out)


def timm_architecture(s: dict[str, Any]) -> str:
    size = TIMM_SIZES.get((s['hidden_size'], s['num_layers'], s['num_heads'][0], s['mlp_dim'][0]))
    return f'vit_{size or "base"}_patch{s["patch_size"]}_{s["image_size"]}'


def to_timm(flat: Flat, numerics: str) -> tuple[dict[str, Any], Flat]:
    """(timm config.json contents, state dict) for timm's VisionTransformer."""
    s = shape_of(flat)
    check_exportable(s, 'timm')
    mlp_ratio = s['mlp_dim'][0] / s['hidden_size']
    if int(s['hidden_size'] * mlp_ratio) != s['mlp_dim'][0]:
        raise UserError(f'timm derives the MLP width from width * mlp_ratio, which cannot give '
                        f'{s["mlp_dim"][0]} from {s["hidden_size"]}: export as npz or hf')
    _, act, _ = ACTIVATIONS[numerics]
    conv_w, conv_b, cls, pos = _stem(flat)
    out: Flat = {'patch_embed.proj.weight': conv_w, 'patch_embed.proj.bias': conv_b,
                 'cls_token': cls, 'pos_embed': pos}
    out.update(_blocks_torch(flat, s, {
        'block': 'blocks.{i}.', 'norm1': 'norm1', 'norm2': 'norm2', 'fc1': 'mlp.fc1',
        'fc2': 'mlp.fc2', 'qkv': 'attn.qkv', 'out': 'attn.proj'}))
    out['norm.weight'] = flat['Transformer/encoder_norm/scale']
    out['norm.bias'] = flat['Transformer/encoder_norm/bias']
    out['head.weight'] = flat['head/kernel'].T
    out['head.bias'] = flat['head/bias']
    args: dict[str, Any] = {
        'img_size': s['image_size'], 'patch_size': s['patch_size'],
        'embed_dim': s['hidden_size'], 'depth': s['num_layers'], 'num_heads': s['num_heads'][0],
        'mlp_ratio': mlp_ratio, 'act_layer': act}
    config = {'architecture': timm_architecture(s), 'num_classes': s['num_classes'],
              'num_features': s['hidden_size'], 'model_args': args,
              'pretrained_cfg': {'input_size': [3, s['image_size'], s['image_size']],
                                 'num_classes': s['num_classes']}}
    return config, _contiguous(out)
