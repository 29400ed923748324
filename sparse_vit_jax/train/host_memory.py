"""Keep freed host memory in the process, so CPU train steps stop page-faulting.

XLA:CPU allocates each step's temporaries (GBs for a ViT backward pass) and frees
them at the end. glibc hands such large blocks straight back to the kernel
(mmap/munmap, heap trimming), so the next step faults every page in again and
the kernel zeroes it: on a 2-core machine a ViT-Ti/16 batch-32 step took ~614,000
page faults and ~0.95 s of kernel time per step (1.7 s in all); with the memory
kept, 0 faults and ~1.3 s (benchmarks/profile_step.py, README Performance).

`retain_freed_memory()` sets three glibc malloc options (one arena, no mmap for
large blocks, no trimming; all three are needed: a thread's own arena mmaps
blocks over 64 MB whatever the options say). The price: the process keeps its
peak host memory until it exits, and all threads share one malloc arena, which
slows small steps fed by many input threads (the digits default: 46 s instead of
37 s). So by default ('auto') it is applied only on the CPU and only when one
step's activations are estimated at >= 512 MB (digits: 26 MB; ViT-Ti/16 batch
32: 2.2 GB; the crossover in between was not measured), and only on glibc. "On the CPU"
is JAX's own choice foreseen: no TPU/GPU plugin, or no device attached for one.
SPARSE_VIT_HOST_MALLOC=retain|system forces it on|off. It must run before JAX
starts its threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
from pathlib import Path
from types import ModuleType

from sparse_vit_jax.errors import UserError

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = -2  # read as size_t: 2**64 - 2 bytes (-1 still trimmed with glibc 2.36 here)
ENV = 'SPARSE_VIT_HOST_MALLOC'
AUTO_MIN_STEP_BYTES = 512 * 2**20


def _accelerator_plugin_installed() -> bool:
    """True if JAX has a TPU/GPU plugin to try (libtpu, a `jax_plugins` package)."""
    if importlib.util.find_spec('libtpu') is not None:
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _jax_hardware_utils() -> ModuleType | None:
    """JAX's own checks for attached TPU chips and GPUs (`jax/_src/hardware_utils.py`, which
    its backend start-up consults), loaded from its file: the options are set before jax is
    imported, as its import starts a thread. None if this jax has no such file."""
    spec = importlib.util.find_spec('jax')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / '_src' / 'hardware_utils.py'
    module_spec = importlib.util.spec_from_file_location('_sparse_vit_hardware_utils', path)
    if not path.is_file() or module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a jax whose file imports more than the standard library
        return None
    return module


def _accelerator_attached() -> bool:
    """Whether JAX will run on a TPU or GPU here: a plugin is installed and, by JAX's own
    checks, a device for it is attached (a plugin alone, e.g. libtpu from the `test` extra on
    a CPU machine, leaves JAX on the CPU). Where the checks are missing, a plugin counts."""
    if not _accelerator_plugin_installed():
        return False
    hw = _jax_hardware_utils()
    if hw is None:
        return True
    try:
        return (hw.num_available_tpu_chips_and_device_id()[0] > 0 or hw.has_visible_nvidia_gpu()
                or hw.num_available_amd_gpus(stop_at=1) > 0)
    except Exception:  # noqa: BLE001 - checks of another shape: assume an accelerator
        return True


def _wanted(step_bytes: int | None) -> bool:
    mode = os.environ.get(ENV, 'auto')
    if mode not in ('auto', 'retain', 'system'):
        raise UserError(f'{ENV} must be auto, retain or system, got {mode!r}')
    if mode != 'auto':
        return mode == 'retain'
    if step_bytes is not None and step_bytes < AUTO_MIN_STEP_BYTES:
        return False
    platforms = os.environ.get('JAX_PLATFORMS', '')
    return platforms.startswith('cpu') or (not platforms and not _accelerator_attached())


def retain_freed_memory(step_bytes: int | None = None) -> bool:
    """Applies the malloc options if wanted and possible; returns whether they are set.

    step_bytes: the step's activation estimate (`cli.step_activation_bytes`); None
    means large (the benchmarks' ViT steps).
    """
    if not _wanted(step_bytes):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return False
    if not hasattr(libc, 'gnu_get_libc_version') or not hasattr(libc, 'mallopt'):
        return False  # not glibc (musl, macOS): its malloc has other knobs
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                               (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
