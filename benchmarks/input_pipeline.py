"""Input pipeline images/s: against the CPU train step, and per host core at ImageNet shape.

    python benchmarks/input_pipeline.py           # CIFAR-shaped at 224 and 384; ImageNet at 384
    python benchmarks/input_pipeline.py --tiny    # CI smoke run (asserts nothing)

The pipeline is the real one (TFDS builder -> shuffle -> decode -> resize -> flip
-> batch). CIFAR-shaped: the cifar10 builder fed by `tfds.testing.mock_data`
(random 32x32 PNGs), against the paper's ViT-B/16 SGD step at the same image size
on the same cores. ImageNet-shaped: the imagenet100 folder builder on a generated
tree of 500x375 JPEGs (ImageNet's typical size, quality 90, textured so they
compress like photos, ~80 KB); what matters there is how many host cores feed an
accelerator's step, so the rate is also given per core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, median  # noqa: E402

from sparse_vit_jax.configs import base_config  # noqa: E402
from sparse_vit_jax.data import TrainData  # noqa: E402
from sparse_vit_jax.train.sharding import make_mesh  # noqa: E402


def rate(cfg: Any, size: int, batch: int, n_batches: int) -> float:
    """Images/s of the training stream, after one warm-up batch."""
    data = TrainData.create(cfg, batch, make_mesh())
    it = data._numpy_batches(cfg, size, seed=0, start_step=0)
    next(it)
    t = time.perf_counter()
    for b in itertools.islice(it, n_batches):
        assert b['image'].shape == (batch, size, size, 3)
    return n_batches * batch / (time.perf_counter() - t)


def pipeline_rate(size: int, batch: int, n_batches: int, tmp: str) -> float:
    cfg = base_config().data
    cfg.name, cfg.data_dir = 'cifar10', tmp
    with tfds.testing.mock_data(num_examples=batch * (n_batches + 4)):
        return rate(cfg, size, batch, n_batches)


def imagenet_tree(root: Path, classes: int, per_class: int, shape: tuple[int, int]) -> Path:
    """root/{train,val}/<wnid>/*.JPEG of photo-like JPEGs, and root/classes.txt."""
    from PIL import Image
    rng = np.random.default_rng(0)
    ids = [f'n{i:08d}' for i in range(classes)]
    h, w = shape
    for split, n in (('train', per_class), ('val', 1)):
        for wnid in ids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):  # smooth colour fields plus grain
                base = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), np.uint8))
                arr = np.asarray(base.resize((w, h), Image.BICUBIC), np.int16)
                arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, 'JPEG', quality=90)
                (root / split / wnid / f'{wnid}_{i}.JPEG').write_bytes(buf.getvalue())
    (root / 'classes.txt').write_text('\n'.join(ids) + '\n')
    return root


def imagenet_rates(tmp: str, size: int, modes: list[str], batch: int, n_batches: int,
                   shape: tuple[int, int]) -> dict[str, float]:
    root = imagenet_tree(Path(tmp) / 'tree', 4, batch * (n_batches + 2) // 4, shape)
    cfg = base_config().data
    cfg.name, cfg.data_dir, cfg.source = 'imagenet100', str(Path(tmp) / 'tfds'), 'folder'
    cfg.root, cfg.class_list = str(root), str(root / 'classes.txt')
    out = {}
    for mode in modes:
        cfg.preprocess = mode
        out[mode] = rate(cfg, size, batch, n_batches)
    return out


def step_rate(name: str, size: int, batch: int, reps: int) -> float:
    import optax

    from sparse_vit_jax.models import create_model
    from sparse_vit_jax.objective import make_loss_fn
    model = create_model(name, num_classes=10)
    params = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)))['params'])(
        jax.random.key(0))
    tx = optax.sgd(1e-3, momentum=0.9)
    loss_fn = make_loss_fn(model, 0.01, 'last')

    @jax.jit
    def step(p, s, x, y):
        batch_ = {'image': x, 'label': y}
        g = jax.grad(lambda q: loss_fn(q, batch_, jax.random.key(1), True)[0])(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    y = jnp.zeros(batch, jnp.int32)
    state = tx.init(params)
    params, state = jax.block_until_ready(step(params, state, x, y))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state, x, y))
        times.append(time.perf_counter() - t)
    return batch / median(times)


def main() -> None:
    import tempfile
    ap = argparse.ArgumentParser()
    ap.add_argument('--tiny', action='store_true')
    args = ap.parse_args()
    from sparse_vit_jax.cli import skip_tpu_without_chips
    skip_tpu_without_chips()  # runs on this machine's devices: no libtpu start-up errors
    sizes = [32] if args.tiny else [224, 384]
    model = 'testing' if args.tiny else 'ViT-B_16'
    print(f'# {command()}\n# {environment()}\n')
    print(f'| image size | pipeline img/s (batch 16) | {model} train step img/s | ratio |')
    print('|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            pipe = pipeline_rate(size, 16, 4 if args.tiny else 40, tmp)
            step = step_rate(model, size, 2 if args.tiny else 4, 2 if args.tiny else 3)
            print(f'| {size} | {pipe:.0f} | {step:.2f} | {pipe / step:.0f}x |', flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    size, shape = (32, (60, 80)) if args.tiny else (384, (375, 500))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        rates = imagenet_rates(tmp, size, ['paper', 'inception_crop'], 32,
                               2 if args.tiny else 40, shape)
    print(f'\nImageNet-shaped ({shape[1]}x{shape[0]} JPEGs) at {size} px, batch 32, '
          f'{cores} cores:\n')
    print('| preprocess | img/s | img/s per core | cores to feed 1,000 img/s |')
    print('|---|---|---|---|')
    for mode, r in rates.items():
        print(f'| {mode} | {r:.0f} | {r / cores:.0f} | {1000 / (r / cores):.1f} |')


if __name__ == '__main__':
    main()
