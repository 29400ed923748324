"""Compiles the trainer's step for a TPU on any Linux machine: libtpu's compiler, no TPU needed.

    python benchmarks/tpu_compile.py                      # TPU v5e, 4 chips (v5litepod-4)
    python benchmarks/tpu_compile.py --topology v5p:2x2x1 --batches 32,64,128,256
    python benchmarks/tpu_compile.py --attention xla --remat none --dropout flax,hash
    python benchmarks/tpu_compile.py --attention xla --batches 32 --gelu tanh,sigmoid
    python benchmarks/tpu_compile.py --tiny               # CI: the testing ViT at 32 px

The step is the one `python -m sparse_vit_jax.main --config=configs/imagenet100.py` runs on
TPUs (bf16 compute, rbg dropout with flax's masks unless --dropout says otherwise, the
paper's penalty on the last block, its optimizer chain, the batch sharded over every chip),
built by the code that benchmarks/gpu_check.py times (benchmarks/trainer.py), for each
attention (XLA's: what `auto` takes on TPUs; the Pallas flash kernel), remat option, dropout
mask, GELU form and batch per chip, and compiled ahead of time for a TPU topology
(`jax.experimental.topologies`; needs libtpu: `pip install "jax[tpu]"`). This checks what no
CPU test can: that XLA and Mosaic (the Pallas kernel's compiler) accept the program for that
chip. The TPU compiler refuses a program that does not fit the chip's HBM, so a row that
compiles fits as far as the compiler can tell (one near the limit may still fail to allocate);
its memory per chip is XLA's memory analysis of the compiled program, and the bytes accessed
its cost analysis (an estimate of the traffic per step). Nothing runs, so nothing here says how
fast it is.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Compiling owns no TPU: no need for libtpu's one-process lock (a TPU job may hold it).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, write_json  # noqa: E402
from trainer import load_config, lower_train_step, with_overrides  # noqa: E402

from sparse_vit_jax.models import gelu_form  # noqa: E402


def tpu_mesh(topology: str) -> Any:
    """A 1-D 'data' mesh over the compile-only devices of a TPU topology ('v5e:2x2')."""
    from jax.experimental import topologies
    from jax.sharding import Mesh
    try:
        importlib.metadata.version('libtpu')
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit('error: compiling for a TPU needs libtpu: pip install "jax[tpu]" '
                         '(Linux x86-64); no TPU is needed') from None
    shape = re.fullmatch(r'\w+:(\d+(?:x\d+){0,2})', topology)
    if not shape:
        raise SystemExit(f'error: --topology {topology!r} is not of the form NAME:AxB[xC] '
                         '(v5e:2x2, v5p:2x2x1)')
    dims = [int(x) for x in shape[1].split('x')]
    bounds = tuple((dims + [1, 1])[:3])
    try:
        topo = topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                            chip_config_name='default',
                                            chips_per_host_bounds=bounds, num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu's own message, in one line
        raise SystemExit(f'error: libtpu could not describe the topology {topology!r}: '
                         f'{str(e).splitlines()[0][:200]}') from None
    return Mesh(np.array(topo.devices), ('data',))


def compile_row(base: Any, mesh: Any, attention: str, remat: str, per_chip: int,
                fsdp: bool = False, inspect: Any = None, rng: str = 'rbg',
                dropout: str = 'flax', gelu: str = 'auto') -> dict[str, Any]:
    """One compile: the step for `per_chip` images on each chip of `mesh`; `inspect(compiled)`
    adds its own entries to the row."""
    c = with_overrides(base, {'model.attention_impl': attention, 'model.remat': remat,
                              'model.dtype': 'bfloat16', 'rng_impl': rng, 'mesh.fsdp': fsdp,
                              'model.dropout_impl': dropout, 'model.gelu_form': gelu},
                       per_chip * mesh.size)
    row: dict[str, Any] = {'attention': attention, 'remat': remat, 'rng': rng,
                           'dropout': dropout, 'gelu': gelu_form(gelu, mesh.devices.flat[0]),
                           'batch_per_chip': per_chip}
    t = time.perf_counter()
    try:
        _, lowered = lower_train_step(c, mesh)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the row says why; the others go on
        compiled, text = None, str(e)
    row['compile_s'] = round(time.perf_counter() - t, 1)
    if compiled is None:
        sizes = re.search(r'\(([\d.]+\w)\) exceeds available HBM \(([\d.]+\w)\)', text)
        if 'RESOURCE_EXHAUSTED' in text:
            row['fits'] = False
            row['result'] = (f'does not fit: needs {sizes[1]}, HBM {sizes[2]}' if sizes else
                             'does not fit: ' + text.strip().splitlines()[0][:200])
        else:
            row['result'] = 'compile failed: ' + text.strip().splitlines()[0][:300]
        return row
    m = compiled.memory_analysis()
    need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    row.update(result='compiles', fits=True, memory_gib=round(need / 2**30, 2),
               temp_gib=round(m.temp_size_in_bytes / 2**30, 2))
    if inspect is not None:
        row.update(inspect(compiled))
    return row


def bytes_accessed(compiled: Any) -> dict[str, Any]:
    """XLA's cost analysis of the compiled program: the bytes its operations read and write
    on one chip (the compiler's estimate; nothing runs)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gb = (cost or {}).get('bytes accessed')
    return {} if gb is None else {'accessed_gb': round(gb / 1e9, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--config', default='configs/imagenet100.py')
    ap.add_argument('--topology', default='v5e:2x2', help="one host's chips, libtpu's name: "
                    'v5e:2x2, v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x2 ...')
    ap.add_argument('--batches', default='32,64,128', help='images per chip')
    ap.add_argument('--attention', default='xla,pallas')
    ap.add_argument('--remat', default='none,dots')
    ap.add_argument('--dropout', default='flax', help='dropout masks: flax (what auto takes on '
                    'TPUs), bytes, hash (model.dropout_impl)')
    ap.add_argument('--gelu', default='auto', help="the MLP's GELU form: auto (tanh on TPUs), "
                    'tanh, sigmoid (model.gelu_form)')
    ap.add_argument('--fsdp', action='store_true',
                    help='shard parameters and optimizer state over the chips (mesh.fsdp)')
    ap.add_argument('--json', default='', help='also write the rows here')
    ap.add_argument('--tiny', action='store_true', help='the testing ViT at 32 px (CI)')
    args = ap.parse_args()
    base = load_config(args.config, args.tiny)
    if args.tiny:
        args.batches, args.remat = '8', 'none'
    mesh = tpu_mesh(args.topology)
    words = lambda s: [w for w in s.split(',') if w]  # noqa: E731
    kind = mesh.devices.flat[0].device_kind
    print(f'# {command()}\n# {environment()}, libtpu {importlib.metadata.version("libtpu")}\n'
          f'\n{base.model.name}@{base.model.image_size}, {kind} x{mesh.size} ({args.topology}), '
          'bf16 compute, rbg dropout, the batch sharded over the chips'
          f'{", parameters and optimizer state too (fsdp)" if args.fsdp else ""}; '
          'compiled, not run\n',
          flush=True)
    print('| attention | remat | dropout | GELU | batch per chip | result | memory per chip GiB | '
          'of which temporaries | GB accessed per chip | compile s |\n'
          '|---|---|---|---|---|---|---|---|---|---|', flush=True)
    rows = []
    for attention, remat, dropout, gelu in itertools.product(
            words(args.attention), words(args.remat), words(args.dropout), words(args.gelu)):
        for per_chip in (int(b) for b in words(args.batches)):
            r = compile_row(base, mesh, attention, remat, per_chip, args.fsdp, dropout=dropout,
                            gelu=gelu, inspect=bytes_accessed)
            rows.append(r)
            print(f'| {attention} | {remat} | {dropout} | {r["gelu"]} | {per_chip} | '
                  f'{r["result"]} | {r.get("memory_gib", "")} | {r.get("temp_gib", "")} | '
                  f'{r.get("accessed_gb", "")} | {r["compile_s"]} |', flush=True)
            if r.get('fits') is False:
                break  # larger batches do not fit either
    if args.json:
        write_json(args.json, {'command': command(), 'environment': environment(),
                               'device_kind': kind, 'rows': rows})
    return 1 if any(r['result'].startswith('compile failed') for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
