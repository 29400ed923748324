"""Whether a train state or a compiled step fits the devices' memory, asked before it runs.

Without asking, a step that does not fit ends in the allocator's error with a long traceback
on a GPU or TPU, and on several CPU devices in a wait: those whose allocation succeeded wait in
the step's first collective for those whose allocation failed, until XLA's rendezvous timeout
aborts the process with a C++ stack (40 s in jax 0.10.2).
The need comes from shapes (a state: `jax.eval_shape` and its shardings) or from XLA's memory
analysis of the compiled program; what a device has free from its allocator (GPU, TPU) or,
for CPU devices, from the host's available memory, which they share.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from sparse_vit_jax.errors import UserError

GiB = 2 ** 30


def out_of_memory(e: BaseException) -> bool:
    """An allocation (or a TPU compilation) that ran out of device memory. XLA's CPU runtime
    reports a program's temporaries it cannot allocate as INTERNAL, not RESOURCE_EXHAUSTED
    (jax 0.10.2: "Error dispatching computation: Out of memory allocating N bytes.")."""
    return isinstance(e, jax.errors.JaxRuntimeError) and (
        'RESOURCE_EXHAUSTED' in str(e) or 'Out of memory allocating' in str(e))


def _mem_available() -> int | None:
    """The host's available memory (Linux's MemAvailable), or None where unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_bytes(device: Any) -> int | None:
    """Bytes `device` can still allocate, or None where unknown: its allocator's limit less
    what is in use (GPU, TPU); for a CPU device, its share of the host's available memory."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics: nothing to compare with
        stats = None
    if stats and 'bytes_limit' in stats:
        return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
    if device.platform == 'cpu' and (available := _mem_available()) is not None:
        return available // len(jax.local_devices(backend='cpu'))
    return None


def state_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes each device holds of a pytree of shapes laid out by `shardings` (its shards)."""
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def run_bytes(compiled: Any) -> int:
    """Bytes a compiled program allocates on each device while it runs: its temporaries and
    its outputs, less the outputs written into donated inputs (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def check_fits(what: str, need: int, advice: str, device: Any = None) -> None:
    """A UserError (one line: `what`, the sizes and `advice`) if `need` bytes per device are
    more than `device` (the first local one) has free; nothing where that is unknown."""
    device = device or jax.local_devices()[0]
    free = free_bytes(device)
    if free is not None and need > free:
        raise UserError(f'{what} needs {need / GiB:.2f} GiB per device, more than the '
                        f'{max(free, 0) / GiB:.2f} GiB free on each {device.platform} device '
                        f'({device.device_kind}): {advice}')


def check_step_fits(step: Any, *args: Any, advice: str, what: str = 'the train step') -> None:
    """Compiles jitted `step` for `args` (the call that follows reuses the compiled program)
    and checks what it allocates while it runs (`check_fits`). A TPU's compiler refuses a
    program that does not fit: that becomes the same one line."""
    if not hasattr(step, 'lower'):
        return
    try:
        compiled = step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if out_of_memory(e):
            raise UserError(f'{what} does not fit in device memory '
                            f'({str(e).strip().splitlines()[0][:300]}): {advice}') from None
        raise
    check_fits(what, run_bytes(compiled), advice)
