"""Reading checkpoint files into flat {name: np.ndarray} dicts, and writing .npz atomically.

No reader executes code from the file: `.npz` is opened with
`allow_pickle=False`, torch files with `weights_only=True`, safetensors is
code-free by design.
"""

from __future__ import annotations

import collections
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

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


LFS_POINTER = b'version https://git-lfs'


def _sniff_npz(path: Path) -> None:
    """UserError unless the file starts like a zip archive, naming what it is instead."""
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.startswith((b'PK\x03\x04', b'PK\x05\x06')):
        return
    if head.startswith(LFS_POINTER):
        raise UserError(f'{path} is a git-LFS pointer ({path.stat().st_size} bytes), not the '
                        'weights: fetch the file itself (git lfs pull, or download it again)')
    if head.startswith(b'\x93NUMPY'):
        raise UserError(f'{path} is a single .npy array, not an .npz archive of named '
                        'parameters; save the parameters with numpy.savez')
    if not head:
        raise UserError(f'{path} is empty; download or convert it again')
    if head[:1] == b'\x80':
        raise UserError(f'{path} is a Python pickle, not an .npz archive; pickles are never '
                        'loaded (they can run code): convert the weights to .npz or safetensors')
    raise UserError(f'{path} is not an .npz archive (no zip header: the file is damaged or of '
                    'another format); download or convert it again')


def _read_npz(path: Path) -> Flat:
    _sniff_npz(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: _widen(np.asarray(f[k])) for k in f.files}
    except ValueError as e:
        if 'pickle' in str(e):
            raise UserError(f'{path} holds an array of Python objects, which is never loaded '
                            '(allow_pickle=False); re-save it with plain numeric arrays') from None
        raise UserError(f'{path} is not a readable .npz file ({e}); download or convert it '
                        'again') from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise UserError(f'{path} is truncated or not an .npz archive ({type(e).__name__}: '
                        f'{e}); download or convert it again') from None


def npz_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{official name: shape} of an `.npz`, from each array's header alone (a ViT-B/16 file
    is 330 MB; no array is read). A file that cannot be read so gives {}: reading it whole
    (`read_checkpoint`) then says what is wrong with it."""
    headers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    shapes = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                with z.open(name) as f:
                    read = headers.get(np.lib.format.read_magic(f))
                    if read is None or not name.endswith('.npy'):
                        return {}
                    shapes[name[:-len('.npy')]] = tuple(int(n) for n in read(f)[0])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return {}
    return _official_names(shapes)


def _state_dict(obj: object) -> dict[str, Any]:
    """The state dict inside a loaded torch object (bare, or under a training wrapper key)."""
    if isinstance(obj, dict):
        for wrapper in ('state_dict', 'model', 'state_dict_ema'):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError('torch file holds no state dict (expected a dict of tensors, or one '
                        "under 'state_dict' / 'model')")
    return obj


def _torch_to_numpy(obj: object) -> Flat:
    import torch

    out: Flat = {}
    for k, v in _state_dict(obj).items():
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
        if type(e).__name__ != 'UnpicklingError':
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f'{path} is truncated or not a PyTorch checkpoint '
                            f'({type(e).__name__}: {msg.split(". ")[0]}); download or convert '
                            'it again') from None
        why = next((line.strip().split(' was not')[0].replace('WeightsUnpickler error: ', '')
                    for line in str(e).splitlines() if 'Unsupported' in line), 'objects')
        raise UserError(f'{path} holds pickled Python objects besides tensors ({why}), which '
                        'torch.load(weights_only=True) refuses: loading them could run '
                        'arbitrary code. If you trust its '
                        'source, re-save only its tensors (torch.save(state_dict, ...)), or '
                        'convert it to safetensors') from None
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


def directory_message(path: Any) -> str:
    """What to say when a directory is given where a weights file is expected."""
    inside = sorted(p.name for p in (path.iterdir() if path.is_dir() else ())
                    if p.suffix.lower() in ('.npz', '.safetensors', *TORCH_SUFFIXES))
    hint = f' (it holds {", ".join(inside[:3])})' if inside else ''
    if (path / 'checkpoints').is_dir():  # where a run is not taken (convert)
        return f'{path} is a run directory; give a weights file{hint}'
    return f'{path} is a directory, not a run with checkpoints; give the weights file itself{hint}'


def read_checkpoint(path: str | os.PathLike, num_heads: int) -> tuple[Flat, str]:
    """Returns ({official name: array}, source) where source names the numerics.

    source is 'jax' for `.npz` (official or ours), else the torch layout
    ('asyml', 'hf', 'timm'). `num_heads` is needed to split fused torch kernels.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(directory_message(path))
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


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """{torch name: shape} of a torch file (memory-mapped) or a safetensors file (its
    header), no tensor read; None where the file cannot be read so (an old torch format, a
    damaged file, no torch installed: reading it whole says why)."""
    suffix = path.suffix.lower()
    try:
        if suffix in TORCH_SUFFIXES:
            import torch
            sd = _state_dict(torch.load(path, map_location='cpu', weights_only=True, mmap=True))
            return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if suffix == '.safetensors':
            from safetensors import safe_open
            with safe_open(str(path), framework='numpy') as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - torch and safetensors raise many types for bad files
        return None
    return None


def checkpoint_source(path: str | os.PathLike) -> str:
    """What `read_checkpoint(path, ...)` reports as the source, from the file's names alone
    (`_torch_shapes`: a ViT-B/16 file is 330 MB). A file that cannot be read that way is read
    whole, for `read_checkpoint`'s errors."""
    path = Path(path)
    if path.suffix.lower() == '.npz':
        return 'jax'
    shapes = _torch_shapes(path)
    if not shapes:
        return read_checkpoint(path, 1)[1]
    return layouts.detect(shapes)


def checkpoint_shapes(path: str | os.PathLike, num_heads: int) -> dict[str, tuple[int, ...]]:
    """{official name: shape} of any weights file, no tensor read: what `read_checkpoint(path,
    num_heads)` returns, shapes only. Torch layouts are renamed on zero-stride stand-ins (views
    of one zero: no memory). A file that cannot be read so gives {}."""
    path = Path(path)
    if path.suffix.lower() == '.npz':
        return npz_shapes(path)
    shapes = _torch_shapes(path)
    if not shapes:
        return {}
    stand_ins = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    try:
        flat = layouts.to_official(stand_ins, layouts.detect(stand_ins), num_heads)
    except (UserError, ValueError):  # not a ViT we know, or heads that do not divide
        return {}
    return {k: tuple(v.shape) for k, v in flat.items()}


def _official_names(flat: Flat) -> Flat:
    """Pre-Linen names (MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_2) -> Linen."""
    from flax import traverse_util

    tree = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
    return {'/'.join(k): v for k, v in traverse_util.flatten_dict(_linen_names(tree)).items()}


_NUMBERED = re.compile(r'(.*)_\d+$')


def _linen_names(tree: Any) -> Any:
    """Pre-Linen numbered a module's submodules across classes (LayerNorm_0,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3), Linen per class (LayerNorm_0,
    MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0). The names are renumbered in
    natural order, as `flax.training.checkpoints.convert_pre_linen` does (a Linen tree comes
    back unchanged) without importing that module, which imports TensorFlow (3 s) for gfile.
    """
    if not isinstance(tree, dict):
        return tree
    counts: collections.Counter[str] = collections.Counter()
    out = {}
    natural = lambda name: [(0, int(t), '') if t.isdigit() else (1, 0, t)
                            for t in re.split(r'(\d+)', name)]
    for name in sorted(tree, key=natural):
        new = name
        if match := _NUMBERED.match(name):
            new = f'{match[1]}_{counts[match[1]]}'
            counts[match[1]] += 1
        out[new] = _linen_names(tree[name])
    return out


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
