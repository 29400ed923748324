"""Model zoo: the official ViT variants by name, plus a tiny `testing` one.

    model = create_model('ViT-B_16', num_classes=10, image_size=384)
    params = init_params(model, image_size=384)  # shapes only via jax.eval_shape
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models.dropout import DROPOUT_IMPLS
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


def _device(device: Any) -> Any:
    """The device an 'auto' choice is made for: the one given, else JAX's first."""
    return jax.devices()[0] if device is None else device


def cuda_capability(device: Any = None) -> tuple[int, int] | None:
    """An NVIDIA GPU's compute capability ((9, 0) for an H100); None for any other device."""
    device = _device(device)
    if device.platform != 'gpu':
        return None
    try:
        major, minor = (int(x) for x in str(device.compute_capability).split('.'))
    except (AttributeError, ValueError):
        return None  # not CUDA: ROCm names its architectures ('gfx90a')
    return major, minor


def compute_dtype(name: str, device: Any = None) -> Any:
    """'auto': bfloat16 where matmuls are fast in it (TPUs; GPUs, NVIDIA's from Ampere, 8.0),
    float32 elsewhere (CPUs; older NVIDIA GPUs such as the V100 and T4 have no bfloat16 units)."""
    if name == 'auto':
        device = _device(device)
        cc = cuda_capability(device)
        fast = device.platform == 'tpu' or (device.platform == 'gpu'
                                            and (cc is None or cc >= (8, 0)))
        name = 'bfloat16' if fast else 'float32'
    return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def cudnn_refusal(head_width: int, device: Any = None) -> str:
    """'' where cuDNN's fused attention runs heads `head_width` wide on `device`, else why not. Its
    flash attention needs compute capability 8.0 (Ampere) or newer, and head dims that are
    multiples of 8, up to 128 (256 from Hopper, 9.0), as its support matrix and JAX's
    checks say."""
    device = _device(device)
    cc = cuda_capability(device)
    if cc is None:
        return f'needs an NVIDIA GPU; this run is on {device.platform}'
    if cc < (8, 0):
        return (f'needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer; '
                f'{device.device_kind} is {cc[0]}.{cc[1]}')
    limit = 256 if cc >= (9, 0) else 128
    if head_width % 8 or head_width > limit:
        return (f'takes head dims that are multiples of 8 up to {limit} on '
                f'{device.device_kind}, not {head_width}')
    return ''


def attention_impl(name: str, dtype: Any, head_width: int, device: Any = None) -> str:
    """'auto': cuDNN's fused kernel where it runs (NVIDIA GPUs from Ampere, a 16-bit dtype,
    heads it takes: `cudnn_refusal`), XLA's attention elsewhere (TPUs included: 'pallas' is
    their opt-in flash attention, see the README)."""
    if name != 'auto':
        return name
    fused = jnp.dtype(dtype).itemsize == 2 and not cudnn_refusal(head_width, device)
    return 'cudnn' if fused else 'xla'


def dropout_impl(name: str, device: Any = None) -> str:
    """'auto': 'hash' on GPUs, where the PRNG's words would be written to memory and read back
    (see models/dropout.py), 'flax' elsewhere (CPUs; TPUs, whose RngBitGenerator is not
    measured against the hash)."""
    if name != 'auto':
        return name
    return 'hash' if _device(device).platform == 'gpu' else 'flax'


GELU_FORMS = ('tanh', 'sigmoid')


def gelu_form(name: str, device: Any = None) -> str:
    """'auto': 'sigmoid' on GPUs, where the tanh form lets cuBLASLt's GELU epilogue write an
    extra array that the dropout then reads (models.gelu), 'tanh' elsewhere (TPUs compile
    both to the same bytes; CPUs keep their program)."""
    if name != 'auto':
        return name
    return 'sigmoid' if _device(device).platform == 'gpu' else 'tanh'


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
           'abstract_params', 'per_block', 'compute_dtype', 'attention_impl', 'cuda_capability',
           'cudnn_refusal', 'dropout_impl', 'DROPOUT_IMPLS', 'gelu_form', 'GELU_FORMS']
