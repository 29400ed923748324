"""Model zoo: the official ViT variants by name, plus a tiny `testing` one.

    model = create_model('ViT-B_16', num_classes=10, image_size=384)
    params = init_params(model, image_size=384)  # shapes only via jax.eval_shape
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models.vit import VisionTransformer, per_block

# (patch, hidden, mlp, heads, layers), as in google-research/vision_transformer.
VARIANTS: dict[str, dict[str, int]] = {
    'testing': dict(patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2),
    'ViT-Ti_16': dict(patch_size=16, hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
    'ViT-S_16': dict(patch_size=16, hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    'ViT-S_32': dict(patch_size=32, hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    'ViT-B_16': dict(patch_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    'ViT-B_32': dict(patch_size=32, hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    'ViT-L_16': dict(patch_size=16, hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
    'ViT-L_32': dict(patch_size=32, hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
    'ViT-H_14': dict(patch_size=14, hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32),
}

# Numerics of each published implementation (see README, "Numerics").
NUMERICS: dict[str, dict[str, Any]] = {
    'jax': dict(gelu_approximate=True, layer_norm_eps=1e-6),      # official .npz
    'timm': dict(gelu_approximate=False, layer_norm_eps=1e-6),
    'hf': dict(gelu_approximate=False, layer_norm_eps=1e-12),     # google/vit-* configs
    'asyml': dict(gelu_approximate=False, layer_norm_eps=1e-5),   # the paper's .pth port
}


def compute_dtype(name: str) -> Any:
    """'auto': bfloat16 where matmuls are fast in it (GPU, TPU), float32 on CPUs."""
    if name == 'auto':
        name = 'bfloat16' if jax.default_backend() in ('gpu', 'tpu') else 'float32'
    return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def attention_impl(name: str, dtype: Any) -> str:
    """'auto': cuDNN's fused kernel on NVIDIA GPUs in a 16-bit dtype, XLA's attention elsewhere
    (TPUs included: 'pallas' is their opt-in flash attention, see the README)."""
    if name != 'auto':
        return name
    device = jax.devices()[0]
    nvidia = device.platform == 'gpu' and 'nvidia' in device.device_kind.lower()
    return 'cudnn' if nvidia and jnp.dtype(dtype).itemsize == 2 else 'xla'


def create_model(name: str, *, num_classes: int, image_size: int | None = None,
                 **overrides: Any) -> VisionTransformer:
    """Builds a VisionTransformer by variant name; `overrides` set any field.

    `image_size` is only checked here (divisible by the patch); the parameter
    shapes follow the images the model is initialised with.
    """
    if name not in VARIANTS:
        raise UserError(f'unknown model {name!r}; choose one of {", ".join(VARIANTS)}')
    if num_classes < 1:
        raise UserError(f'num_classes must be >= 1, got {num_classes}')
    kwargs: dict[str, Any] = {**VARIANTS[name], **overrides}
    if image_size is not None and image_size % kwargs['patch_size']:
        raise UserError(f'image_size {image_size} is not divisible by the patch size '
                        f'{kwargs["patch_size"]} of {name}')
    return VisionTransformer(num_classes=num_classes, **kwargs)


def init_params(model: VisionTransformer, image_size: int, rng: jax.Array | None = None,
                channels: int = 3) -> Any:
    """Initialises parameters for square `image_size` inputs (float32)."""
    rng = jax.random.key(0) if rng is None else rng
    images = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
    return jax.jit(lambda r: model.init(r, images)['params'])(rng)


def abstract_params(model: VisionTransformer, image_size: int, channels: int = 3) -> Any:
    """Parameter shapes and dtypes without allocating (jax.eval_shape)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x)['params'], images)


__all__ = ['VARIANTS', 'NUMERICS', 'VisionTransformer', 'create_model', 'init_params',
           'abstract_params', 'per_block', 'compute_dtype', 'attention_impl']
