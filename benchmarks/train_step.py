"""Train-step speed: our jitted step against a PyTorch step of the same ViT, side by side.

    python benchmarks/train_step.py                 # CPU: Ti/16@224 b32, B/16@224 b8, B/16@384 b2
    python benchmarks/train_step.py --tiny          # CI smoke run (asserts nothing)
    python benchmarks/train_step.py --jax-defaults  # ours without the two CPU fixes below
    python benchmarks/train_step.py --variants plain,bytes,hash  # dropout masks drawn 3 ways

Both steps do forward, cross-entropy, backward and an SGD-momentum update with
coupled weight decay (the paper's optimizer) on the same architecture, batch and
image size; they alternate after warm-up and the median images/s is reported.
Ours is also timed with the attention penalty, the L1 transform and the
mask-keeping wrapper (`--variants` picks them; `bytes` and `hash` draw dropout masks as
`model.dropout_impl` says, the others as flax does).
The PyTorch model is HuggingFace's ViTForImageClassification
(exact GELU, as in our 'hf' numerics) with a dropout after the MLP's GELU added,
so that it drops out where the official ViT (and ours, and timm's) does.
Synthetic batches live on the device.

Ours runs as `python -m sparse_vit_jax.main` runs it on a CPU: with the
straight-line Threefry lowering (train/cpu_threefry.py) and freed host memory kept
in the process (train/host_memory.py; process-wide, so PyTorch gets it too).
`--jax-defaults` leaves both out, to show what they are worth.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads otherwise spin after each step and steal the cores from the
# next (JAX) step in the alternation; passive waiting keeps the comparison fair.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import sys
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, median  # noqa: E402

from sparse_vit_jax.models import NUMERICS, VARIANTS, create_model  # noqa: E402
from sparse_vit_jax.objective import make_loss_fn  # noqa: E402
from sparse_vit_jax.pruning import keep_masks, magnitude_masks  # noqa: E402
from sparse_vit_jax.sparsity import add_l1_penalty  # noqa: E402
from sparse_vit_jax.train.cpu_threefry import use_unrolled_threefry_on_cpu  # noqa: E402
from sparse_vit_jax.train.host_memory import retain_freed_memory  # noqa: E402


def ours(name, size, batch, dtype, variant='plain', return_step=False):
    model = create_model(name, num_classes=10, dtype=dtype, **NUMERICS['hf'],
                         dropout_impl=variant if variant in ('bytes', 'hash') else 'flax')
    params = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)))['params'])(
        jax.random.key(0))
    base = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(1e-3, momentum=0.9))
    penalty = 0.0
    if variant == 'attention':
        penalty = 0.01
    elif variant == 'l1':
        base = optax.chain(add_l1_penalty(1e-5), base)
    elif variant == 'masks':
        base = keep_masks(base, magnitude_masks(params, 0.5))
    tx = base
    loss_fn = make_loss_fn(model, penalty, 'last')
    state = tx.init(params)
    x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
    y = jnp.zeros(batch, jnp.int32)

    def step_fn(p, s, rng):
        g = jax.grad(lambda q: loss_fn(q, {'image': x, 'label': y}, rng, True)[0])(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step_fn, donate_argnums=(0, 1))
    operands = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            (params, state, jax.random.key(0)))
    carry = {'p': params, 's': state, 'i': 0}

    def run():
        carry['p'], carry['s'] = step(carry['p'], carry['s'], jax.random.key(carry['i']))
        carry['i'] += 1
        jax.block_until_ready(carry['p'])

    return (run, step, operands) if return_step else (run, model)


def use_cpu_fixes() -> bool:
    """Ours as the CLI runs it on a CPU (call before JAX starts); returns if memory is kept."""
    kept = retain_freed_memory()
    use_unrolled_threefry_on_cpu()
    return kept


def torch_step(name, size, batch, gpu=False, bf16=False, num_classes=10, steps=1):
    """A closure running `steps` PyTorch train steps, then waiting for the GPU; it returns the
    seconds until the last step was queued."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    v = VARIANTS[name]
    cfg = ViTConfig(hidden_size=v['hidden_size'], num_hidden_layers=v['num_layers'],
                    num_attention_heads=v['num_heads'], intermediate_size=v['mlp_dim'],
                    image_size=size, patch_size=v['patch_size'], num_labels=num_classes,
                    hidden_dropout_prob=0.1, attn_implementation='sdpa')
    dev = 'cuda' if gpu else 'cpu'
    model = ViTForImageClassification(cfg)
    mlps = [(m, n) for m in model.modules()  # transformers 5 / 4 names of the MLP's GELU
            for n in ('activation_fn', 'intermediate_act_fn') if hasattr(m, n)]
    assert len(mlps) == v['num_layers'], mlps
    for m, n in mlps:  # dropout after the GELU, as in the official ViT
        setattr(m, n, torch.nn.Sequential(torch.nn.GELU(), torch.nn.Dropout(0.1)))
    model = model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    y = torch.randint(0, num_classes, (batch,), device=dev)

    def run():  # -> seconds until the last step was queued (on a GPU, before the wait)
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            loss.backward()
            opt.step()
        dispatched = time.perf_counter() - t
        if gpu:
            torch.cuda.synchronize()
        return dispatched

    return run


def timeit(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def compare(name, size, batch, reps, variants, dtype=jnp.float32, gpu=False):
    fns = {f'ours ({v})': ours(name, size, batch, dtype, v)[0] for v in variants}
    fns['pytorch'] = torch_step(name, size, batch, gpu=gpu, bf16=dtype == jnp.bfloat16)
    for f in fns.values():  # warm-up (compiles)
        f()
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):  # alternate so both see the same machine state
        for k, f in fns.items():
            f()  # untimed: the first step after the other framework pays for its idle threads
            times[k] += timeit(f, 1)
    return {k: batch / median(v) for k, v in times.items()}


def peak_bf16_tflops(n: int = 8192, chain: int = 10, reps: int = 5) -> float:
    """The device's best bf16 matmul rate, TFLOP/s: `chain` n^3 products dispatched back to
    back and waited for once (the sync amortised, as in the steps' timing), best of `reps`.
    The operands are random: constant ones (all ones) draw less power, so a GPU may hold
    clocks on them that a training step's matmuls do not get."""
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in (ka, kb))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()

    def run():
        for _ in range(chain):
            out = f(a, b)
        out.block_until_ready()

    t = min(timeit(run, reps)) / chain
    return 2 * n ** 3 / t / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--tiny', action='store_true')
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--variants', default='plain,attention,l1,masks',
                    help='ours: plain, attention (penalty), l1, masks; bytes, hash (dropout '
                    'masks drawn as model.dropout_impl says)')
    ap.add_argument('--jax-defaults', action='store_true',
                    help='leave out the CPU Threefry lowering and the malloc settings')
    args = ap.parse_args()
    from sparse_vit_jax.cli import skip_tpu_without_chips
    skip_tpu_without_chips()  # runs on this machine's devices: no libtpu start-up errors
    if not args.jax_defaults:
        print(f'# host memory kept: {use_cpu_fixes()}')
    print(f'# {command()}\n# {environment()}\n')
    cases = ([('testing', 32, 4)] if args.tiny else
             [('ViT-Ti_16', 224, 32), ('ViT-B_16', 224, 8), ('ViT-B_16', 384, 2)])
    variants = ['plain'] if args.tiny else args.variants.split(',')
    reps = 2 if args.tiny else args.reps
    print('| model | image | batch | ' + ' | '.join(f'{v} img/s' for v in variants) +
          ' | pytorch img/s | ratio (plain / pytorch) |')
    print('|---' * (5 + len(variants)) + '|')
    for name, size, batch in cases:
        r = compare(name, size, batch, reps, variants)
        cells = ' | '.join(f'{r[f"ours ({v})"]:.2f}' for v in variants)
        print(f'| {name} | {size} | {batch} | {cells} | {r["pytorch"]:.2f} | '
              f'{r["ours (plain)"] / r["pytorch"]:.2f} |', flush=True)


if __name__ == '__main__':
    main()
