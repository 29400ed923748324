"""Renaming of published PyTorch ViT state dicts into the official JAX parameter names.

Every function maps a flat {torch_key: array} dict to a flat {'a/b/c': array}
dict in our (= official JAX) layout. Only transposes and reshapes happen here:
torch Linear weights are (out, in), conv weights (out, in, kh, kw).
"""

from __future__ import annotations

import re

import numpy as np

from sparse_vit_jax.errors import UserError

Flat = dict[str, np.ndarray]


def _blocks(sd: Flat, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return sorted(found)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _norms_and_mlp(out: Flat, sd: Flat, s: str, d: str, norms: tuple[str, str],
                   mlp: tuple[str, str]) -> None:
    """A block's two LayerNorms and MLP Dense layers (torch Linear weights transposed)."""
    for t, j in zip(norms, (0, 1)):
        out[f'{d}LayerNorm_{j}/scale'] = sd[f'{s}{t}.weight']
        out[f'{d}LayerNorm_{j}/bias'] = sd[f'{s}{t}.bias']
    for t, j in zip(mlp, (0, 1)):
        out[f'{d}MlpBlock_0/Dense_{j}/kernel'] = sd[f'{s}{t}.weight'].T
        out[f'{d}MlpBlock_0/Dense_{j}/bias'] = sd[f'{s}{t}.bias']


def _common_tail(out: Flat, sd: Flat, norm: str, head: str, pre_logits: str | None) -> None:
    out['Transformer/encoder_norm/scale'] = sd[f'{norm}.weight']
    out['Transformer/encoder_norm/bias'] = sd[f'{norm}.bias']
    if f'{head}.weight' in sd:
        out['head/kernel'] = sd[f'{head}.weight'].T
        out['head/bias'] = sd[f'{head}.bias']
    if pre_logits and f'{pre_logits}.weight' in sd:
        out['pre_logits/kernel'] = sd[f'{pre_logits}.weight'].T
        out['pre_logits/bias'] = sd[f'{pre_logits}.bias']


def from_asyml(sd: Flat) -> Flat:
    """asyml/vision-transformer-pytorch (the paper's .pth): attention already (D, H, Dh)."""
    out: Flat = {
        'embedding/kernel': _conv(sd['embedding.weight']),
        'embedding/bias': sd['embedding.bias'],
        'cls': sd['cls_token'],
        'Transformer/posembed_input/pos_embedding': sd['transformer.pos_embedding.pos_embedding'],
    }
    for i in _blocks(sd, r'transformer\.encoder_layers\.(\d+)\.'):
        s, d = f'transformer.encoder_layers.{i}.', f'Transformer/encoderblock_{i}/'
        _norms_and_mlp(out, sd, s, d, ('norm1', 'norm2'), ('mlp.fc1', 'mlp.fc2'))
        for name in ('query', 'key', 'value', 'out'):
            out[f'{d}MultiHeadDotProductAttention_0/{name}/kernel'] = sd[f'{s}attn.{name}.weight']
            out[f'{d}MultiHeadDotProductAttention_0/{name}/bias'] = sd[f'{s}attn.{name}.bias']
    _common_tail(out, sd, 'transformer.norm', 'classifier', None)
    return out


def _split_heads_in(w: np.ndarray, b: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """torch (H*Dh, D) Linear -> kernel (D, H, Dh), bias (H, Dh)."""
    d = w.shape[1]
    return w.T.reshape(d, heads, -1), b.reshape(heads, -1)


def _split_heads_out(w: np.ndarray, heads: int) -> np.ndarray:
    """torch (D, H*Dh) Linear -> kernel (H, Dh, D)."""
    return w.T.reshape(heads, -1, w.shape[0])


# transformers >= 5 renamed the modules; published hub files keep the old names.
_HF_V5 = [(r'^layers\.(\d+)\.attention\.([qkv])_proj\.',
           lambda m: f'encoder.layer.{m[1]}.attention.attention.'
                     f'{dict(q="query", k="key", v="value")[m[2]]}.'),
          (r'^layers\.(\d+)\.attention\.o_proj\.', r'encoder.layer.\1.attention.output.dense.'),
          (r'^layers\.(\d+)\.mlp\.fc1\.', r'encoder.layer.\1.intermediate.dense.'),
          (r'^layers\.(\d+)\.mlp\.fc2\.', r'encoder.layer.\1.output.dense.'),
          (r'^layers\.(\d+)\.', r'encoder.layer.\1.')]


def _hf_v4_names(key: str) -> str:
    key = key.removeprefix('vit.')
    for pattern, repl in _HF_V5:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def from_hf(sd: Flat, num_heads: int) -> Flat:
    """HuggingFace transformers ViTModel / ViTForImageClassification (v4 or v5 names)."""
    sd = {_hf_v4_names(k): v for k, v in sd.items()}
    out: Flat = {
        'embedding/kernel': _conv(sd['embeddings.patch_embeddings.projection.weight']),
        'embedding/bias': sd['embeddings.patch_embeddings.projection.bias'],
        'cls': sd['embeddings.cls_token'],
        'Transformer/posembed_input/pos_embedding': sd['embeddings.position_embeddings'],
    }
    for i in _blocks(sd, r'encoder\.layer\.(\d+)\.'):
        s, d = f'encoder.layer.{i}.', f'Transformer/encoderblock_{i}/'
        a = f'{d}MultiHeadDotProductAttention_0/'
        _norms_and_mlp(out, sd, s, d, ('layernorm_before', 'layernorm_after'),
                       ('intermediate.dense', 'output.dense'))
        for name in ('query', 'key', 'value'):
            k, b = _split_heads_in(sd[f'{s}attention.attention.{name}.weight'],
                                   sd[f'{s}attention.attention.{name}.bias'], num_heads)
            out[f'{a}{name}/kernel'], out[f'{a}{name}/bias'] = k, b
        out[f'{a}out/kernel'] = _split_heads_out(sd[f'{s}attention.output.dense.weight'], num_heads)
        out[f'{a}out/bias'] = sd[f'{s}attention.output.dense.bias']
    _common_tail(out, sd, 'layernorm', 'classifier', 'pooler.dense')
    return out


def from_timm(sd: Flat, num_heads: int) -> Flat:
    """timm VisionTransformer (e.g. vit_base_patch16_384): fused qkv (3*D, D)."""
    out: Flat = {
        'embedding/kernel': _conv(sd['patch_embed.proj.weight']),
        'embedding/bias': sd['patch_embed.proj.bias'],
        'cls': sd['cls_token'],
        'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
    }
    for i in _blocks(sd, r'blocks\.(\d+)\.'):
        s, d = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
        a = f'{d}MultiHeadDotProductAttention_0/'
        _norms_and_mlp(out, sd, s, d, ('norm1', 'norm2'), ('mlp.fc1', 'mlp.fc2'))
        qkv_w = np.split(sd[f'{s}attn.qkv.weight'], 3, axis=0)
        qkv_b = np.split(sd[f'{s}attn.qkv.bias'], 3, axis=0)
        for name, w, b in zip(('query', 'key', 'value'), qkv_w, qkv_b):
            out[f'{a}{name}/kernel'], out[f'{a}{name}/bias'] = _split_heads_in(w, b, num_heads)
        out[f'{a}out/kernel'] = _split_heads_out(sd[f'{s}attn.proj.weight'], num_heads)
        out[f'{a}out/bias'] = sd[f'{s}attn.proj.bias']
    _common_tail(out, sd, 'norm', 'head', 'pre_logits.fc')
    return out


def detect(sd: Flat) -> str:
    """Names the layout of a torch state dict: 'asyml', 'hf' or 'timm'."""
    keys = set(sd)
    if 'transformer.pos_embedding.pos_embedding' in keys:
        return 'asyml'
    if {'embeddings.cls_token', 'vit.embeddings.cls_token'} & keys:
        return 'hf'
    if 'patch_embed.proj.weight' in keys:
        return 'timm'
    sample = ', '.join(sorted(keys)[:3])
    raise UserError(f'unrecognised PyTorch ViT layout (first keys: {sample}); supported: '
                    'asyml vision-transformer-pytorch, HuggingFace ViT, timm ViT')


def to_official(sd: Flat, layout: str, num_heads: int) -> Flat:
    try:
        if layout == 'asyml':
            return from_asyml(sd)
        if layout == 'hf':
            return from_hf(sd, num_heads)
        return from_timm(sd, num_heads)
    except KeyError as e:
        raise UserError(f'{layout} checkpoint is missing key {e.args[0]!r}; '
                        'is it a complete ViT state dict?') from None
    except ValueError:  # a fused attention kernel that does not split into num_heads heads
        width = next((v.shape[-1] for k, v in sd.items() if k.endswith('cls_token')), '?')
        raise UserError(f'{layout} checkpoint of hidden size {width} does not split into '
                        f'{num_heads} attention heads of equal size; is it a checkpoint of '
                        'another variant?') from None
