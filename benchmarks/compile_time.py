"""How long the trainer's step takes to compile, and to come back from the compile cache.

    python benchmarks/compile_time.py                # ViT-B/16@384, batch 2, a fresh cache
    python benchmarks/compile_time.py --tiny         # CI smoke run

Lowers the step of configs/imagenet100.py (`experiment.train_parts`, as gpu_check.py does),
then compiles it in two fresh processes sharing one `compile_cache` directory (the
trainer's `use_compile_cache`): the first compiles, the second reads the cache.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def compile_once(cache: str, batch: int, tiny: bool) -> float:
    import gpu_check as g

    from sparse_vit_jax.experiment import use_compile_cache
    use_compile_cache(cache)
    base = g.load_config('configs/imagenet100.py', tiny)
    job = g.plan(base, [batch], [], [])[0]  # the paper's step
    job.parts, job.lowered = g.lower_train_step(job.config, g.make_mesh())
    t = time.perf_counter()
    job.lowered.compile()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--tiny', action='store_true')
    ap.add_argument('--child', default='', help=argparse.SUPPRESS)
    args = ap.parse_args()
    from sparse_vit_jax.cli import skip_tpu_without_chips
    skip_tpu_without_chips()  # runs on this machine's devices: no libtpu start-up errors
    if args.child:
        print(f'{compile_once(args.child, args.batch, args.tiny):.2f}')
        return
    from common import command, environment
    print(f'# {command()}\n# {environment()}\n')
    print('| model | batch | first compile s | from the cache s |\n|---|---|---|---|')
    with tempfile.TemporaryDirectory() as cache:
        secs = [float(subprocess.run(
            [sys.executable, __file__, '--child', cache, '--batch', str(args.batch)]
            + ['--tiny'] * args.tiny, check=True, capture_output=True, text=True,
            cwd=Path(__file__).parents[1]).stdout.split()[-1]) for _ in range(2)]
    name = 'testing@32' if args.tiny else 'ViT-B_16@384'
    print(f'| {name} | {args.batch} | {secs[0]:.1f} | {secs[1]:.1f} |')


if __name__ == '__main__':
    main()
