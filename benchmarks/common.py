"""Shared helpers for the benchmarks: timing and the environment line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def environment() -> str:
    import jax
    parts = [f'python {platform.python_version()}', f'jax {jax.__version__}',
             f'{jax.devices()[0].platform} x{jax.device_count()}', f'{os.cpu_count()} CPUs',
             cpu_model()]
    try:
        import torch
        parts.append(f'torch {torch.__version__} ({torch.get_num_threads()} threads)')
    except ImportError:
        pass
    return ', '.join(parts)


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo on Linux), else the architecture."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes `payload` to `path` atomically (a temporary file, then a rename)."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def command() -> str:
    return 'python ' + ' '.join(sys.argv)
