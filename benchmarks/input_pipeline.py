"""Input pipeline images/s against the train step's images/s, same config, same cores.

    python benchmarks/input_pipeline.py           # CIFAR-shaped data at 224 and 384
    python benchmarks/input_pipeline.py --tiny    # CI smoke run (asserts nothing)

The pipeline is the real one (TFDS cifar10 builder -> shuffle -> decode ->
resize -> flip -> batch), fed by `tfds.testing.mock_data` (random 32x32 PNGs),
since the real files cannot be downloaded here. The train step is the paper's
ViT-B/16 SGD step (forward, backward, update) at the same image size.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, median  # noqa: E402

from sparse_vit_jax.configs import base_config  # noqa: E402
from sparse_vit_jax.data import TrainData  # noqa: E402
from sparse_vit_jax.train.sharding import make_mesh  # noqa: E402


def pipeline_rate(size: int, batch: int, n_batches: int, tmp: str) -> float:
    cfg = base_config().data
    cfg.name, cfg.data_dir = 'cifar10', tmp
    mesh = make_mesh()
    with tfds.testing.mock_data(num_examples=batch * (n_batches + 4)):
        data = TrainData.create(cfg, batch, mesh)
        it = data._numpy_batches(cfg, size, seed=0, start_step=0)
        next(it)  # warm-up
        t = time.perf_counter()
        for b in itertools.islice(it, n_batches):
            assert b['image'].shape == (batch, size, size, 3)
        return n_batches * batch / (time.perf_counter() - t)


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
    sizes = [32] if args.tiny else [224, 384]
    model = 'testing' if args.tiny else 'ViT-B_16'
    print(f'# {command()}\n# {environment()}\n')
    print(f'| image size | pipeline img/s (batch 16) | {model} train step img/s | ratio |')
    print('|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            pipe = pipeline_rate(size, 16, 4 if args.tiny else 40, tmp)
            step = step_rate(model, size, 2 if args.tiny else 4, 2 if args.tiny else 3)
            print(f'| {size} | {pipe:.0f} | {step:.2f} | {pipe / step:.0f}x |')


if __name__ == '__main__':
    main()
