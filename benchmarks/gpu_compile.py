"""Compiles the trainer's step for an NVIDIA H100 or H200 on any Linux machine: no GPU needed.

    python benchmarks/gpu_compile.py                       # H200, cuDNN and XLA attention
    python benchmarks/gpu_compile.py --gpu h100 --batches 32,64,128 --remat none,dots
    python benchmarks/gpu_compile.py --batches 32 --remat none --rng rbg,threefry --top 12
    python benchmarks/gpu_compile.py --batches 32 --attention cudnn --remat none --dropout hash,flax
    python benchmarks/gpu_compile.py --batches 32,256 --attention cudnn --gelu tanh,sigmoid
    python benchmarks/gpu_compile.py --tiny                # the testing ViT at 32 px

The step is the one `python -m sparse_vit_jax.main --config=configs/imagenet100.py` runs on
an NVIDIA GPU (bf16 compute, hash dropout masks keyed by rbg unless --dropout and --rng say
otherwise, the paper's penalty on the last block, its optimizer chain; the same code as
benchmarks/gpu_check.py times),
compiled ahead of time by XLA's GPU compiler for a target description of the card
(`jax.experimental.topologies`; needs a CUDA plugin and its libraries,
`pip install "jax[cuda12]"` or `"jax[cuda13]"`, about 6 GB, not a GPU).
Per row: XLA's memory analysis of the compiled program, the fused attention kernels it
calls (cuDNN's flash attention forward and backward), which shows which blocks run fused and
whether remat reruns their forward, and its kernels with what they read and write
(`profile_step.memory_traffic`, a floor of the HBM traffic: what the memory-bound kernels
cost; `--top N` lists the jax ops behind the most of it). Dropout shows there: with
`--dropout flax` or `bytes` rbg's bits are generated into memory and read back (Threefry's are
computed inside the kernels that use them: no traffic, but some 20 integer rounds per 32 bits),
with `hash` each draw is one integer hash computed where the mask is applied, forward and
backward (only a GPU can weigh its arithmetic against the bytes it saves). So does the MLP's
GELU: in `--gelu tanh` form cuBLASLt's epilogue computes it, and the first MLP matmul writes it
beside its input, for the dropout's kernel to read back (`sigmoid`, what 'auto' takes on GPUs,
leaves it to that kernel).

What this cannot check: cuDNN's own limits (it compiled unpadded 577-token attention, which
cuDNN on a GPU refuses), the GEMM autotuning (without a device XLA's Triton GEMM emitter finds
no tiles for some shapes, so GEMMs are compiled for cuBLAS, as
`--xla_gpu_enable_triton_gemm=false` does on a GPU), whether the program fits (the compiler
does not refuse it: compare the memory with the card's) and anything about speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# The CPU stays JAX's backend; the CUDA plugin only compiles (it finds no driver here).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_gpu_enable_triton_gemm=false').strip()
sys.path.insert(0, str(Path(__file__).parent))

# The cards' descriptions (what XLA reads off a device: NVIDIA's published figures).
CARDS = {
    'h100': ('NVIDIA H100 80GB HBM3', 79.6, 3_352_320_000_000),
    'h200': ('NVIDIA H200', 139.8, 4_800_000_000_000),
}
TARGET = '''gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }} device_description_str: "{name}"
'''


def cuda_plugin() -> str:
    """The installed CUDA plugin's distribution ('jax-cuda12-plugin' or 'jax-cuda13-plugin'),
    or ''."""
    for cuda in ('12', '13'):
        try:
            if importlib.util.find_spec(f'jax_plugins.xla_cuda{cuda}') is not None:
                return f'jax-cuda{cuda}-plugin'
        except ModuleNotFoundError:  # no jax_plugins package at all
            return ''
    return ''


def has_cuda_plugin() -> bool:
    return bool(cuda_plugin())


def gpu_mesh(card: str) -> Any:
    """A one-device 'data' mesh on a compile-only NVIDIA `card` ('h100', 'h200')."""
    if not has_cuda_plugin():
        raise SystemExit('error: compiling for an NVIDIA GPU needs the CUDA plugin: pip install '
                         '"jax[cuda12]" or "jax[cuda13]" (about 6 GB; no GPU is needed)')
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh
    name, gib, bandwidth = CARDS[card]
    target = TARGET.format(name=name, memory=int(gib * 2**30), bandwidth=bandwidth)
    topo = topologies.get_topology_desc(platform='cuda', target_config=target,
                                        topology='1x1x1')
    return Mesh(np.array(topo.devices), ('data',))


def examine(compiled: Any, top: int = 0) -> dict[str, Any]:
    """How many cuDNN attention kernels (forward, backward) the program calls, and what its
    kernels read and write (`profile_step.memory_traffic`)."""
    from profile_step import memory_traffic
    text = compiled.as_text()
    calls = Counter(re.findall(r'custom_call_target="__cudnn\$(fmha\w+)"', text))
    backward = sum(n for k, n in calls.items() if 'Backward' in k)
    traffic = memory_traffic(text, top)
    return {'fused_forward': sum(calls.values()) - backward, 'fused_backward': backward,
            'traffic_gb': round(traffic['gb'], 2), 'kernels': traffic['kernels'],
            'fusions_gb': round(traffic['by_kind'].get('fusion', 0.0), 2),
            'traffic_top': traffic['top']}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--config', default='configs/imagenet100.py')
    ap.add_argument('--gpu', default='h200', choices=sorted(CARDS))
    ap.add_argument('--batches', default='32,128,256')
    ap.add_argument('--attention', default='cudnn,xla')
    ap.add_argument('--remat', default='none,dots,full')
    ap.add_argument('--rng', default='rbg', help='dropout RNGs: rbg, threefry, unsafe_rbg')
    ap.add_argument('--dropout', default='hash', help='dropout masks: hash, flax, bytes '
                    '(model.dropout_impl)')
    ap.add_argument('--gelu', default='auto', help="the MLP's GELU form: auto (sigmoid on "
                    'GPUs), sigmoid, tanh (model.gelu_form)')
    ap.add_argument('--top', type=int, default=0,
                    help="also list each row's N jax ops that move the most memory")
    ap.add_argument('--json', default='', help='also write the rows here')
    ap.add_argument('--tiny', action='store_true', help='the testing ViT at 32 px')
    args = ap.parse_args()
    mesh = gpu_mesh(args.gpu)
    from common import command, environment, write_json
    from tpu_compile import compile_row
    from trainer import load_config
    base = load_config(args.config, args.tiny)
    if args.tiny:
        args.batches = '8'
    words = lambda s: [w for w in s.split(',') if w]  # noqa: E731
    name, gib, _ = CARDS[args.gpu]
    plugin = cuda_plugin()
    print(f'# {command()}\n# {environment()}, {plugin} {importlib.metadata.version(plugin)}\n\n'
          f'{base.model.name}@{base.model.image_size}, '
          f'{name} ({gib} GiB), bf16 compute; compiled (GEMMs for cuBLAS), not '
          'run\n', flush=True)
    print('| attention | remat | dropout RNG | dropout | GELU | batch | result | memory GiB | of '
          'which temporaries | fused attention fwd / bwd | kernels | traffic GB | of which '
          'fusions | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
          flush=True)
    rows = []
    for attention, remat, rng, dropout, gelu, batch in itertools.product(
            words(args.attention), words(args.remat), words(args.rng), words(args.dropout),
            words(args.gelu), [int(b) for b in words(args.batches)]):
        r = compile_row(base, mesh, attention, remat, batch,
                        inspect=lambda c: examine(c, args.top), rng=rng, dropout=dropout,
                        gelu=gelu)
        r['over_memory'] = r.get('memory_gib', 0) > gib
        rows.append(r)
        result = r['result'] + (' (more than the card has)' if r['over_memory'] else '')
        fused = f'{r["fused_forward"]} / {r["fused_backward"]}' if 'fused_forward' in r else ''
        print(f'| {attention} | {remat} | {rng} | {dropout} | {r["gelu"]} | {batch} | {result} | '
              f'{r.get("memory_gib", "")} | {r.get("temp_gib", "")} | {fused} | '
              f'{r.get("kernels", "")} | {r.get("traffic_gb", "")} | '
              f'{r.get("fusions_gb", "")} | {r["compile_s"]} |',
              flush=True)
    for r in rows if args.top else []:
        print(f'\n{r["attention"]} attention, remat {r["remat"]}, {r["rng"]}, '
              f'{r["dropout"]} dropout, {r["gelu"]} GELU, batch '
              f'{r["batch_per_chip"]}: the jax ops whose kernels move the most memory\n\n'
              '| GB | kernels | jax op |\n|---|---|---|')
        for gb, calls, op in r.get('traffic_top', []):
            print(f'| {gb:.2f} | {calls} | {op} |')
    if args.json:
        write_json(args.json, {'command': command(), 'environment': environment(),
                               'card': name, 'rows': rows})
    return 1 if any(r['result'].startswith('compile failed') for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
