"""The GPU check: the trainer's own jitted step, timed on synthetic batches, against PyTorch.

    bash benchmarks/gpu_check.sh                 # one GPU, under 6 minutes
    python benchmarks/gpu_check.py --tiny        # the same code on any device (CI: the CPU)

The step is the one `python -m sparse_vit_jax.main --config=configs/imagenet100.py` runs:
`experiment.train_parts` builds it from that config (model, dtype and attention 'auto', the
loss with the paper's attention penalty on the last block, the optimizer chain), and
`create_state` its state; only the batches are synthetic (uniform images, random labels,
already on the device, so no TensorFlow is needed). Variants change one config key each:
no penalty, the L1 transform, the mask-keeping optimizer, XLA attention instead of the
fused one, Threefry / unsafe_rbg instead of rbg for dropout, rematerialisation. PyTorch's
step (HF ViT with SDPA, bf16 autocast, same optimizer) alternates with ours; images/s are
medians, MFU is the analytic matmul FLOPs (3x forward) over a bf16 matmul peak measured in
the same run. Where cuDNN runs, its bf16 logits are compared with XLA's attention.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, median  # noqa: E402
from train_step import peak_bf16_tflops, timeit, torch_step  # noqa: E402

from sparse_vit_jax.configs import copy  # noqa: E402
from sparse_vit_jax.experiment import build_model, train_parts, use_rng_impl  # noqa: E402
from sparse_vit_jax.models import abstract_params  # noqa: E402
from sparse_vit_jax.optimizer import build_optimizer  # noqa: E402
from sparse_vit_jax.pruning import magnitude_masks, matmul_flops  # noqa: E402
from sparse_vit_jax.train.sharding import batch_sharding, make_mesh  # noqa: E402
from sparse_vit_jax.train.state import create_state  # noqa: E402

NUM_CLASSES = 100
VARIANTS = {  # name -> (config overrides, masks?)
    'paper': ({}, False),
    'no penalty': ({'sparsity.attention.weight': 0.0}, False),
    'L1': ({'sparsity.l1.weight': 1e-5}, False),
    'masks': ({}, True),
    'xla attention': ({'model.attention_impl': 'xla'}, False),
    'threefry': ({'rng_impl': 'threefry'}, False),
    'unsafe_rbg': ({'rng_impl': 'unsafe_rbg'}, False),
    'remat dots': ({'model.remat': 'dots'}, False),
}


def load_config(path: str, tiny: bool) -> Any:
    spec = importlib.util.spec_from_file_location('config', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if tiny:
        c.model.name, c.model.image_size = 'testing', 32
    return c


def with_overrides(c: Any, overrides: dict[str, Any], batch: int) -> Any:
    c = copy(c)
    c.batch_size = batch
    for key, value in overrides.items():
        *groups, leaf = key.split('.')
        holder = c
        for g in groups:
            holder = holder[g]
        holder[leaf] = value  # a locked ConfigDict: a misspelt key raises
    return c


def build(c: Any, masks: bool, mesh: Any) -> tuple[Any, Any, Any, Any]:
    """(step, state, batch, model) for config `c`; rng impl set before anything random."""
    use_rng_impl(c.rng_impl)
    model = build_model(c, NUM_CLASSES, 'jax')
    tx = None
    if masks:
        params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                              abstract_params(model, c.model.image_size))
        tx = build_optimizer(c, 1000, magnitude_masks(params, 0.5))
    parts = train_parts(c, model, mesh, 1000, tx)
    state = create_state(parts.init_params, parts.tx, c.seed, parts.shardings)
    k1, k2 = jax.random.split(jax.random.key(1))
    size = c.model.image_size
    batch = jax.device_put({
        'image': jax.random.uniform(k1, (c.batch_size, size, size, 3), minval=-1, maxval=1),
        'label': jax.random.randint(k2, (c.batch_size,), 0, NUM_CLASSES)}, batch_sharding(mesh))
    return parts.step, state, batch, model


def runner(step: Any, state: Any, batch: Any) -> Any:
    box = {'state': state}

    def run() -> None:
        box['state'], _ = step(box['state'], batch)
        jax.block_until_ready(box['state'].params)

    return run


def fused_logits_agree(c: Any) -> tuple[str, bool]:
    """bf16 logits: the fused attention against XLA's, on the same parameters and images."""
    fused = build_model(c, NUM_CLASSES, 'jax')
    exact = fused.clone(attention_impl='xla')
    size = c.model.image_size
    params = fused.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape),
                          params)
    x = jax.random.uniform(jax.random.key(3), (16, size, size, 3), minval=-1, maxval=1)
    a, b = (np.asarray(jax.jit(m.apply)({'params': params}, x)) for m in (fused, exact))
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    scale = float(np.abs(b).max())
    ok = agree >= 0.9 and np.abs(a - b).max() <= 0.05 * scale
    return (f'fused ({fused.attention_impl}) vs xla bf16 logits: max |diff| '
            f'{np.abs(a - b).max():.4f} (logit scale {scale:.2f}), argmax agreement {agree:.3f}: '
            f'{"agree" if ok else "DISAGREE"}'), ok


def oom(e: Exception) -> bool:
    return 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--config', default='configs/imagenet100.py')
    ap.add_argument('--tiny', action='store_true', help='the testing ViT at 32 px (CI, CPU)')
    ap.add_argument('--reps', type=int, default=10)
    ap.add_argument('--batches', default='32,64')
    ap.add_argument('--largest', default='128,256,384,512',
                    help='batches tried (with remat) for the largest that fits')
    ap.add_argument('--json', default='', help='also write the results here')
    ap.add_argument('--budget-s', type=float, default=300,
                    help='variants not started by then are skipped (and said so)')
    args = ap.parse_args()
    import torch
    on_gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        raise SystemExit('error: the GPU check needs an NVIDIA GPU for JAX and PyTorch; '
                         'use --tiny to run its code on this device')
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f'# {command()}\n# {environment()}\n', flush=True)
    base = load_config(args.config, args.tiny)
    mesh = make_mesh()
    batches = [8] if args.tiny else [int(b) for b in args.batches.split(',')]
    largest = [16] if args.tiny else [int(b) for b in args.largest.split(',')]
    reps = 2 if args.tiny else args.reps
    name, size = base.model.name, base.model.image_size
    peak = peak_bf16_tflops(512 if args.tiny else 8192)
    flops_per_image = 3 * matmul_flops(build_model(base, NUM_CLASSES, 'jax'), size) / 1e12
    resolved = build_model(with_overrides(base, {}, batches[0]), NUM_CLASSES, 'jax')
    print(f'{name}@{size}, {jax.devices()[0].device_kind}: model dtype '
          f'{jnp.dtype(resolved.dtype).name}, attention {resolved.attention_impl}; measured bf16 '
          f'matmul peak {peak:.1f} TFLOP/s; {flops_per_image:.3g} TFLOP per image and step\n')
    print('| batch | step | ours img/s | MFU % | pytorch img/s | ours / pytorch | vs paper |')
    print('|---|---|---|---|---|---|---|', flush=True)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def in_budget(what: str) -> bool:
        left = time.perf_counter() - t0 < args.budget_s
        if not left:
            print(f'# {what}: skipped, past --budget-s {args.budget_s:.0f}', flush=True)
        return left

    for batch in batches:
        variants = VARIANTS if batch == batches[0] else {'paper': VARIANTS['paper']}
        fns = {}
        for v, (overrides, masks) in variants.items():
            if v != 'paper' and not in_budget(f'batch {batch}, {v}'):
                continue
            t = time.perf_counter()
            fns[v] = runner(*build(with_overrides(base, overrides, batch), masks, mesh)[:3])
            fns[v]()  # compile
            fns[v]()
            print(f'# {v}: compiled and warmed up in {time.perf_counter() - t:.1f} s', flush=True)
        use_rng_impl(base.rng_impl)
        fns['pytorch'] = torch_step(name, size, batch, gpu=on_gpu, bf16=True)
        fns['pytorch']()
        fns['pytorch']()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):  # alternate, so every step sees the same machine state
            for k, f in fns.items():
                f()
                times[k] += timeit(f, 1)
        rate = {k: batch / median(v) for k, v in times.items()}
        for v in [v for v in variants if v in fns]:
            row = {'batch': batch, 'step': v, 'images_per_s': rate[v],
                   'mfu_percent': 100 * rate[v] * flops_per_image / peak,
                   'pytorch_images_per_s': rate['pytorch']}
            results.append(row)
            print(f'| {batch} | {v} | {rate[v]:.1f} | {row["mfu_percent"]:.1f} | '
                  f'{rate["pytorch"]:.1f} | {rate[v] / rate["pytorch"]:.2f} | '
                  f'{rate[v] / rate["paper"]:.2f} |', flush=True)
        del fns
    best = None
    for batch in largest:  # the largest batch that fits, rematerialised
        if not in_budget(f'batch {batch} with remat'):
            break
        c = with_overrides(base, {'model.remat': 'dots'}, batch)
        try:
            run = runner(*build(c, False, mesh)[:3])
            run()
            rate = batch / median(timeit(run, max(reps // 2, 2)))
        except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory as a runtime error
            if not oom(e):
                raise
            print(f'# batch {batch} with remat: out of memory', flush=True)
            break
        best = {'batch': batch, 'step': 'paper, remat dots', 'images_per_s': rate,
                'mfu_percent': 100 * rate * flops_per_image / peak}
        results.append(best)
        print(f'| {batch} | paper, remat dots | {rate:.1f} | {best["mfu_percent"]:.1f} | | | |',
              flush=True)
    check, ok = fused_logits_agree(with_overrides(base, {}, batches[0]))
    print(f'\n{check}')
    if args.json:
        Path(args.json).write_text(json.dumps({
            'command': command(), 'environment': environment(), 'peak_tflops': peak,
            'rows': results, 'fused_check': check}, indent=1))
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    main()
