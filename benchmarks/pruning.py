"""Pruning speed: our global masks vs torch.nn.utils.prune.global_unstructured; structured eval.

    python benchmarks/pruning.py            # ViT-B/16 pool (85.6 M weights), ratios 0.1..0.9
    python benchmarks/pruning.py --tiny     # the `testing` model (CI smoke run, asserts nothing)

Part 1, on the same random float32 weights, alternating: torch's global
L1Unstructured pruning and ours (jitted; compile time reported separately),
with a mask comparison (any difference must be a weight tied at the threshold).
Part 2: evaluation images/s of a dense ViT-B/16 against the same model with 50%
of MLP units and 25% of heads removed; the FLOP ratio is the ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, median, timed  # noqa: E402

from sparse_vit_jax.checkpoints import flatten  # noqa: E402
from sparse_vit_jax.models import abstract_params, create_model  # noqa: E402
from sparse_vit_jax.pruning import magnitude_masks, matmul_flops, prune_structured  # noqa: E402


def random_params(model, size, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02,
                        abstract_params(model, size))


def torch_global(pool, ratio):
    import torch
    import torch.nn.utils.prune as tprune
    mods = []
    for w in pool:
        m = torch.nn.Module()
        m.weight = torch.nn.Parameter(torch.from_numpy(w))
        mods.append(m)
    dt, _ = timed(lambda: tprune.global_unstructured(
        [(m, 'weight') for m in mods], pruning_method=tprune.L1Unstructured, amount=ratio))
    return dt, [m.weight_mask.numpy().astype(bool) for m in mods]


def part1(name, ratios):
    model = create_model(name, num_classes=10)
    params_np = random_params(model, 224 if name != 'testing' else 32)
    params = jax.device_put(params_np)
    compile_s, masks0 = timed(lambda: jax.block_until_ready(magnitude_masks(params, 0.1)))
    keys = [k for k, v in flatten(masks0).items() if v is not None]
    pool_np = [flatten(params_np)[k] for k in keys]
    size = sum(w.size for w in pool_np)
    rows = []
    for r in ratios:
        t_torch, ref = torch_global(pool_np, r)
        ours_t = []
        for _ in range(3):
            dt, masks = timed(lambda r=r: jax.block_until_ready(magnitude_masks(params, r)))
            ours_t.append(dt)
        fm = flatten(masks)
        ours_masks = [np.asarray(fm[k]) for k in keys]
        differ = sum(int((a != b).sum()) for a, b in zip(ours_masks, ref))
        rows.append(dict(ratio=r, torch_s=t_torch, ours_s=median(ours_t),
                         speedup=t_torch / median(ours_t), masks_differ=differ,
                         pruned=sum(int((~m).sum()) for m in ours_masks)))
    sweep_s, _ = timed(lambda: jax.block_until_ready(magnitude_masks(params, list(ratios))))
    sweep_s, _ = timed(lambda: jax.block_until_ready(magnitude_masks(params, list(ratios))))
    return dict(model=name, pool=size, first_call_compile_s=compile_s, rows=rows,
                sweep_all_ratios_s=sweep_s)


def part2(name, size, batch, reps):
    model = create_model(name, num_classes=1000)
    params = jax.device_put(random_params(model, size))
    small_model, small = prune_structured(model, params, head_ratio=0.25, mlp_ratio=0.5)
    small = jax.device_put(small)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    fns = {'dense': (jax.jit(lambda p, x: model.apply({'params': p}, x)), params),
           'pruned': (jax.jit(lambda p, x: small_model.apply({'params': p}, x)), small)}
    for f, p in fns.values():
        jax.block_until_ready(f(p, x))
    times = {k: [] for k in fns}
    for _ in range(reps):  # alternate, so both see the same machine state
        for k, (f, p) in fns.items():
            times[k].append(timed(lambda f=f, p=p: jax.block_until_ready(f(p, x)))[0])
    ips = {k: batch / median(v) for k, v in times.items()}
    ceiling = matmul_flops(model, size) / matmul_flops(small_model, size)
    speedup = ips['pruned'] / ips['dense']
    return dict(model=name, image_size=size, batch=batch, dense_img_s=ips['dense'],
                pruned_img_s=ips['pruned'], speedup=speedup, flop_ratio_ceiling=ceiling,
                fraction_of_ceiling=speedup / ceiling)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--tiny', action='store_true')
    ap.add_argument('--json', help='also write the results here')
    args = ap.parse_args()
    from sparse_vit_jax.cli import skip_tpu_without_chips
    skip_tpu_without_chips()  # runs on this machine's devices: no libtpu start-up errors
    name = 'testing' if args.tiny else 'ViT-B_16'
    ratios = [0.1, 0.5, 0.9] if args.tiny else [0.1, 0.3, 0.5, 0.7, 0.9]
    p1 = part1(name, ratios)
    p2 = part2(name, 32 if args.tiny else 224, 2 if args.tiny else 8, 2 if args.tiny else 5)
    print(f'# {command()}\n# {environment()}\n')
    print(f'Global magnitude masks over the {p1["model"]} pool ({p1["pool"]:,} weights); '
          f'our first call (compile included) takes {p1["first_call_compile_s"]:.2f} s.\n')
    print('| ratio | torch global_unstructured (s) | ours (s) | speedup | masks differ |')
    print('|---|---|---|---|---|')
    for r in p1['rows']:
        print(f'| {r["ratio"]:.1f} | {r["torch_s"]:.2f} | {r["ours_s"]:.3f} | '
              f'{r["speedup"]:.1f}x | {r["masks_differ"]} |')
    print(f'\nAll {len(ratios)} ratios in one call (shared first pass): '
          f'{p1["sweep_all_ratios_s"]:.2f} s\n')
    print(f'Structured: {p2["model"]} at {p2["image_size"]} px, batch {p2["batch"]}, 25% heads '
          f'+ 50% MLP units removed: dense {p2["dense_img_s"]:.1f} img/s, pruned '
          f'{p2["pruned_img_s"]:.1f} img/s, speedup {p2["speedup"]:.2f}x of a '
          f'{p2["flop_ratio_ceiling"]:.2f}x FLOP ceiling ({100 * p2["fraction_of_ceiling"]:.0f}%).')
    if args.json:
        Path(args.json).write_text(json.dumps(dict(masks=p1, structured=p2), indent=1))


if __name__ == '__main__':
    main()
