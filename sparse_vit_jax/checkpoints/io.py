"""Reading checkpoint files into flat {name: np.ndarray} dicts, and writing .npz atomically.

No reader executes code from the file: `.npz` is opened with
`allow_pickle=False`, torch files with `weights_only=True`, safetensors is
code-free by design.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from sparse_vit_jax.checkpoints import layouts
from sparse_vit_jax.errors import UserError

Flat = dict[str, np.ndarray]
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')


def _widen(a: np.ndarray) -> np.ndarray:
    """bfloat16 / float16 -> float32 (exact). numpy stores bfloat16 in .npz as 2-byte void."""
    if a.dtype.kind == 'V' and a.dtype.itemsize == 2:
        import ml_dtypes
        a = a.view(ml_dtypes.bfloat16)
    if a.dtype.kind == 'f' or a.dtype.name == 'bfloat16':
        return a.astype(np.float32) if a.dtype.itemsize < 4 else a
    return a


def _read_npz(path: Path) -> Flat:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: _widen(np.asarray(f[k])) for k in f.files}
    except ValueError as e:
        if 'pickle' in str(e):
            raise UserError(f'{path} contains pickled objects, which are never loaded '
                            '(allow_pickle=False); re-save it with plain numeric arrays') from None
        raise UserError(f'{path} is not a readable .npz file ({e}); re-download or '
                        're-convert it') from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f'{path} is truncated or not an .npz archive ({type(e).__name__}: '
                        f'{e}); re-download or re-convert it') from None


def _torch_to_numpy(obj: object) -> Flat:
    import torch

    if isinstance(obj, dict):
        for wrapper in ('state_dict', 'model', 'state_dict_ema'):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError('torch file holds no state dict (expected a dict of tensors, or one '
                        "under 'state_dict' / 'model')")
    out: Flat = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy()
    return out


def _read_torch(path: Path) -> Flat:
    try:
        import torch
    except ImportError:
        raise UserError(f'reading {path.name} needs PyTorch: pip install '
                        '"sparse_vit_jax[torch]"') from None
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f'{path} could not be loaded as a PyTorch checkpoint with '
                        f'weights_only=True ({type(e).__name__}: {msg[:200]}); it may be '
                        'truncated or contain pickled code, which is refused') from None
    return _torch_to_numpy(obj)


def _read_safetensors(path: Path) -> Flat:
    """Through torch when it is installed (numpy has no bfloat16, in which many ship)."""
    try:
        import torch  # noqa: F401
        from safetensors.torch import load_file
        convert = _torch_to_numpy
    except ImportError:
        from safetensors.numpy import load_file
        convert = lambda d: {k: _widen(v) for k, v in d.items()}  # noqa: E731
    try:
        flat = load_file(str(path))
    except TypeError as e:  # numpy's loader meeting bfloat16
        raise UserError(f'{path} holds {e}; install PyTorch to read it: pip install '
                        '"sparse_vit_jax[torch]"') from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f'{path} is not a valid safetensors file ({e}); re-download it') from None
    return convert(flat)


def read_checkpoint(path: str | os.PathLike, num_heads: int) -> tuple[Flat, str]:
    """Returns ({official name: array}, source) where source names the numerics.

    source is 'jax' for `.npz` (official or ours), else the torch layout
    ('asyml', 'hf', 'timm'). `num_heads` is needed to split fused torch kernels.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint not found: {path}')
    suffix = path.suffix.lower()
    if suffix == '.npz':
        return _official_names(_read_npz(path)), 'jax'
    if suffix in TORCH_SUFFIXES:
        sd = _read_torch(path)
    elif suffix == '.safetensors':
        sd = _read_safetensors(path)
    else:
        raise UserError(f'unsupported checkpoint format {suffix or "(no suffix)"!r} for {path}; '
                        'use .npz (official JAX), .pth/.pt/.bin (PyTorch) or .safetensors')
    layout = layouts.detect(sd)
    return layouts.to_official(sd, layout, num_heads), layout


def _official_names(flat: Flat) -> Flat:
    """Pre-Linen names (MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_2) -> Linen."""
    from flax import traverse_util
    from flax.training.checkpoints import convert_pre_linen

    tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
    tree = convert_pre_linen(tree)
    return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes to a temp file in the same directory, fsyncs, then renames over `path`.

    Cloud paths (gs://...) are written as one object, which appears whole or not at all.
    """
    if str(path).startswith('gs://'):
        from etils import epath
        epath.Path(path).write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path: str | os.PathLike, flat: Flat) -> None:
    """Saves {name: array} as an uncompressed .npz, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in flat.items()})
    atomic_write_bytes(path, buf.getvalue())
