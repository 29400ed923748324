"""Where a train step's time goes: XLA ops by time, plus page faults and kernel time per step.

    python benchmarks/profile_step.py                      # ViT-Ti/16@224 b32, our CPU setup
    python benchmarks/profile_step.py --jax-defaults       # without the two CPU fixes
    python benchmarks/profile_step.py --model ViT-B_16 --batch 8 --top 30
    python benchmarks/profile_step.py --tiny               # CI smoke run

Traces a few steps of benchmarks/train_step.py's step with jax.profiler, joins the
executed thunks with the compiled HLO (shape and the jax op that produced each),
and groups them by block-independent op name (tracing perturbs the step: the
op times are shares, not exact costs). getrusage gives the minor page faults
and system time of untraced steps: the numbers that exposed the malloc cost
fixed in train/host_memory.py. `device_ops` reads a GPU or TPU trace the same way
(benchmarks/gpu_check.py profiles the paper's step with it).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment  # noqa: E402


def trace_cpu_ops() -> None:
    """Per-thunk trace events on CPU (added to whatever XLA_FLAGS the caller set); before
    JAX's backend starts."""
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_enable_xprof_traceme=true').strip()


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (shape, op_name metadata) for every instruction in the module."""
    out = {}
    for m in re.finditer(r'^\s+%(\S+) = (\S+) \w+\((.*)$', hlo_text, re.M):
        op = re.search(r'op_name="([^"]*)"', m.group(3))
        out[m.group(1)] = (m.group(2).split('{')[0], op.group(1) if op else '')
    return out


def any_block(jax_op: str) -> str:
    """The op's name with the block index dropped: every block's copy counts as one op."""
    return re.sub(r'encoderblock_\d+', 'encoderblock_N', jax_op)


def trace_events(trace_dir: str) -> list[dict[str, Any]]:
    """The Chrome-trace events that jax.profiler wrote under `trace_dir`."""
    files = glob.glob(f'{trace_dir}/plugins/profile/*/*.trace.json.gz')
    if not files:
        raise SystemExit(f'error: jax.profiler wrote no trace under {trace_dir}')
    return json.load(gzip.open(files[0]))['traceEvents']


# Kernel name -> what it computes, first match wins (cuDNN / cuBLAS / CUTLASS / Triton / XLA
# names on NVIDIA GPUs; a heuristic, so the top kernels are listed by name as well).
KERNEL_KINDS = (
    ('attention (fused)', r'sdpa|fmha|flash'),
    ('matmul', r'gemm|nvjet|xmma|cutlass|cublas|wgmma|matmul'),
    ('convolution', r'conv(?!ert)|fprop|dgrad|wgrad'),  # not XLA's loop_convert_* fusions
    ('memcpy / memset', r'memcpy|memset'),
    ('reduction fusion', r'reduce|softmax|norm'),
    ('other fusion', r''),
)


def kernel_kind(name: str) -> str:
    return next(k for k, pattern in KERNEL_KINDS if re.search(pattern, name.lower()))


def device_ops(events: list[dict[str, Any]], hlo: dict[str, tuple[str, str]], steps: int,
               top: int) -> dict[str, Any] | None:
    """GPU/TPU kernels of the trace (the device's stream lines), per step: busy time, time by
    kind of kernel, and the top kernels with the HLO op and jax op they came from. None when
    the trace has no device (a CPU run: see `op_table`)."""
    procs = {e['pid']: e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
    threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
               if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
    devices = {p for p, n in procs.items() if re.match(r'/device:(GPU|TPU):0\b', n)}
    kernels = [e for e in events if e.get('ph') == 'X' and e.get('pid') in devices]
    if not kernels:
        return None
    # One line set, or derived lines (XLA Modules, Steps...) count the time twice: a GPU's
    # streams, else a TPU's XLA Ops.
    for pick in (lambda n: n.startswith('Stream'), lambda n: n == 'XLA Ops'):
        lines = {k for k, n in threads.items() if k[0] in devices and pick(n)}
        if lines:
            kernels = [e for e in kernels if (e['pid'], e['tid']) in lines]
            break
    kinds: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    where: dict[str, tuple[str, str]] = {}
    for e in kernels:
        name, ms = e['name'], e.get('dur', 0) / 1e3 / steps
        kinds[kernel_kind(name)] += ms
        by_kernel[name] += ms
        calls[name] += 1 / steps
        if name not in where:
            op = hlo_op_of(name, e.get('args', {}).get('hlo_op', ''), hlo)
            where[name] = (op, any_block(hlo.get(op, ('', ''))[1]))
    return {'busy_ms': sum(kinds.values()), 'kinds': kinds.most_common(),
            'top': [(ms, calls[k], k, *where[k]) for k, ms in by_kernel.most_common(top)]}


def hlo_op_of(kernel: str, op: str, hlo: dict[str, tuple[str, str]]) -> str:
    """The HLO instruction a kernel runs: the trace's hlo_op, or, where that is a command
    buffer (a CUDA graph of many kernels), the kernel's own name, which XLA gives its fusions
    ('loop_add_fusion_84' runs %loop_add_fusion.84)."""
    for name in (op, kernel, re.sub(r'_(\d+)$', r'.\1', kernel)):
        if name in hlo:
            return name
    return op


_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
          's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_NO_KERNEL = ('parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant')
_SCRATCH = re.compile(r', [su]8\[\d+\]\{0\}\)$')  # the last of a custom-call's results
_GEMM = re.compile(r'__triton_gemm|__cudnn\$fusion|"kind":"__cublas')


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape, a tuple's summed: 'bf16[32,577]{1,0}' -> 36928."""
    return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(',') if d)
               for dt, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', shape) if dt in _BYTES)


def _pass_and_op(jax_op: str) -> str:
    """'jit(step)/transpose(jvp(ViT))/Transformer/encoderblock_3/Dense_0/dot_general' ->
    'bwd Transformer/encoderblock_N/Dense_0/dot_general'."""
    parts = [p for p in any_block(jax_op).split('/')
             if not re.match(r'(transpose\()?(jvp|jit)\(|checkpoint$|remat$', p)]
    return ('bwd ' if 'transpose(' in jax_op else 'fwd ') + '/'.join(parts)


_COMPUTATION = re.compile(r'^%?([\w.-]+) \(.*?\) -> .*? \{\n(.*?)^\}', re.M | re.S)
_DUS_ROOT = re.compile(r'ROOT %\S+ = \S+ dynamic-update-slice\(%[\w.-]+, %([\w.-]+)')


def _in_place_updates(hlo_text: str) -> dict[str, int]:
    """{fused computation: bytes of its update} for the fusions whose root is a
    dynamic-update-slice: XLA runs them in place, writing only the updated region."""
    out = {}
    for name, body in _COMPUTATION.findall(hlo_text):
        if (root := _DUS_ROOT.search(body)) and (
                update := re.search(rf'%{re.escape(root.group(1))} = (\S+) ', body)):
            out[name] = _shape_bytes(update.group(1))
    return out


def memory_traffic(hlo_text: str, top: int = 0) -> dict[str, Any]:
    """What the compiled program's kernels read and write, from its optimized HLO: each
    kernel of the entry computation (a fusion, a library call, a copy) reads its operands
    and writes its result once, but an in-place update (a fusion whose root is a
    dynamic-update-slice) reads and writes only its update. A rough floor of the memory
    traffic (caches aside, and the bodies of loops uncounted): what memory-bound kernels
    cost, seen without a device.
    {'gb', 'kernels', 'by_kind': {HLO kind: gb}, 'top': [(gb, calls, jax op), ...] by op
    (any block)}. On a GPU the kind 'fusion' holds XLA's own memory-bound kernels; matmuls
    are library calls (custom-call, as fused attention) or 'matmul fusion' (Triton's or
    cuDNN's GEMMs)."""
    entry = hlo_text[hlo_text.index('\nENTRY'):]
    sizes: dict[str, int] = {}
    by_op: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    updates = _in_place_updates(hlo_text)
    for m in re.finditer(r'^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$', entry, re.M):
        name, shape, kind, rest = m.groups()
        sizes[name] = _shape_bytes(shape)
        if kind in _NO_KERNEL:
            continue
        if kind == 'custom-call' and (scratch := _SCRATCH.search(shape)):
            sizes[name] -= _shape_bytes(scratch.group(0))  # a library call's scratch space
        operands = re.findall(r'%([\w.-]+)', rest.split('), ')[0])
        op = re.search(r'op_name="([^"]*)"', rest)
        key = _pass_and_op(op.group(1)) if op else kind
        moved = sizes[name] + sum(sizes.get(o, 0) for o in operands)
        if kind == 'fusion' and (called := re.search(r'calls=%([\w.-]+)', rest)) and \
                called.group(1) in updates:
            moved = 2 * updates[called.group(1)]
        by_op[key] += moved
        by_kind['matmul fusion' if kind == 'fusion' and _GEMM.search(rest) else kind] += moved
        calls[key] += 1
    return {'gb': sum(by_op.values()) / 1e9, 'kernels': sum(calls.values()),
            'by_kind': {k: b / 1e9 for k, b in by_kind.items()},
            'top': [(b / 1e9, calls[k], k) for k, b in by_op.most_common(top)]}


def fusion_bandwidth(kinds: list[tuple[str, float]], traffic: dict[str, Any]) -> str:
    """What XLA's own fusions move (`memory_traffic`) against their kernels' time in a device
    trace (`device_ops`' kinds, ms/step): the bandwidth they reach."""
    ms = sum(t for k, t in kinds if k in ('reduction fusion', 'other fusion'))
    gb = traffic['by_kind'].get('fusion', 0.0)
    reach = f', {gb / ms:.2f} TB/s' if ms else ''
    return f"XLA's fusions: {gb:.1f} GB/step by the HLO (a floor), {ms:.2f} ms/step{reach}"


def op_table(events: list[dict[str, Any]], hlo: dict[str, tuple[str, str]], steps: int,
             top: int) -> list[tuple[float, str, str, str]]:
    """XLA ops run on the host (a CPU backend), grouped by kind, shape and jax op, per step."""
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get('ph') == 'X' and e['name'] in hlo:
            shape, op = hlo[e['name']]
            op = any_block(op).split('/', 1)[-1]
            total[(re.sub(r'\.\d+$', '', e['name']), shape, op)] += e['dur'] / 1e3 / steps
    if not total:
        raise SystemExit('error: the trace holds no XLA ops; is this jaxlib built with TraceMe?')
    return [(ms, kind, shape, op) for (kind, shape, op), ms in total.most_common(top)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--model', default='ViT-Ti_16')
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--top', type=int, default=25)
    ap.add_argument('--tiny', action='store_true')
    ap.add_argument('--jax-defaults', action='store_true')
    args = ap.parse_args()
    from sparse_vit_jax.cli import skip_tpu_without_chips
    skip_tpu_without_chips()  # runs on this machine's devices: no libtpu start-up errors
    if args.tiny:
        args.model, args.size, args.batch, args.steps, args.top = 'testing', 32, 4, 2, 5
    trace_cpu_ops()
    import train_step
    if not args.jax_defaults:
        train_step.use_cpu_fixes()
    import jax
    import jax.numpy as jnp

    print(f'# {command()}\n# {environment()}\n')
    run, step, operands = train_step.ours(args.model, args.size, args.batch, jnp.float32,
                                          return_step=True)
    hlo = hlo_index(step.lower(*operands).compile().as_text())
    run()
    run()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):  # untraced: the profiler's own buffers fault pages too
        run()
    wall = (time.perf_counter() - t0) / args.steps
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            run()
        traced = (time.perf_counter() - t0) / args.steps
        jax.profiler.stop_trace()
        rows = op_table(trace_events(d), hlo, args.steps, args.top)
    print(f'{args.model}@{args.size} batch {args.batch}: {wall:.3f} s/step, '
          f'{(r1.ru_minflt - r0.ru_minflt) / args.steps:,.0f} page faults/step, '
          f'system {(r1.ru_stime - r0.ru_stime) / args.steps:.2f} s/step, '
          f'user {(r1.ru_utime - r0.ru_utime) / args.steps:.2f} s/step (untraced steps); '
          f'{traced:.3f} s/step while traced, op times below from those\n')
    print('| ms/step | XLA kind | shape | op |\n|---|---|---|---|')
    for ms, kind, shape, op in rows:
        print(f'| {ms:.1f} | {kind} | {shape} | {op} |')


if __name__ == '__main__':
    main()
