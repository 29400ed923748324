"""The GPU check: the trainer's own jitted step, timed on synthetic batches, against PyTorch.

    bash benchmarks/gpu_check.sh                 # one GPU, meant for under 6 minutes
    python benchmarks/gpu_check.py --tiny        # the same code on any device (CI: the CPU)

The step is the one `python -m sparse_vit_jax.main --config=configs/imagenet100.py` runs:
`experiment.train_parts` builds it from that config (model, dtype and attention 'auto', the
loss with the paper's attention penalty on the last block, the optimizer chain), and
`create_state` its state; only the batches are synthetic (uniform images, random labels,
already on the device, so no TensorFlow is needed). Variants change one config key each:
no penalty (the plain step), the L1 transform, the mask-keeping optimizer, XLA attention
instead of the fused one, dropout masks drawn by the PRNG (flax's draws or a byte each, rbg;
Threefry / unsafe_rbg) instead of hashed, rematerialisation, the GELU in tanh form (cuBLASLt's
epilogue), other GEMM emitters and cuDNN's LayerNorm (XLA compile options, compiled
last); then larger batches, plain and rematerialised. The L1 and masks rows keep the
penalty, so comparing them with the plain step is the stricter reading.

Compiling dominates the run (a ViT-B/16@384 step compiles in about a minute on a fresh GPU),
so every program is lowered from abstract shapes and compiled in threads while the next
is lowered (the first alone, so its autotuning runs undisturbed and fills XLA's cache for the
shapes the variants share), in the order of what the targets need, with the programs that
make the steps' fresh states; none starts after --budget-s. Timing starts when compiling has
ended. PyTorch's step (HF ViT with SDPA, bf16 autocast, same optimizer)
alternates with ours; each sample is --steps steps dispatched back to back and waited for
once (as the trainer's loop runs them; the same for PyTorch); images/s are medians, as is the
share of a sample the host spent queuing its steps (near 100%: host-bound); MFU is
the analytic matmul FLOPs (3x forward) over a bf16 matmul peak measured in the same run.
Where cuDNN runs, its bf16 logits are compared with XLA's attention. Then the paper's step
is traced (jax.profiler) and summarised: device busy time against the wall clock, time by
kind of kernel, the top kernels with their HLO and jax ops. Results go to --json after each
group, atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import command, environment, median, write_json  # noqa: E402
from profile_step import (  # noqa: E402
    device_ops,
    fusion_bandwidth,
    hlo_index,
    memory_traffic,
    op_table,
    trace_cpu_ops,
    trace_events,
)
from train_step import peak_bf16_tflops, torch_step  # noqa: E402
from trainer import NUM_CLASSES, load_config, lower_train_step, with_overrides  # noqa: E402

from sparse_vit_jax.experiment import build_model, use_rng_impl  # noqa: E402
from sparse_vit_jax.pruning import matmul_flops  # noqa: E402
from sparse_vit_jax.train.sharding import batch_sharding, make_mesh  # noqa: E402
from sparse_vit_jax.train.state import lower_state  # noqa: E402

PLAIN = 'no penalty'
VARIANTS = {  # name -> (config overrides, masks?, XLA compile options)
    'paper': ({}, False, {}),
    PLAIN: ({'sparsity.attention.weight': 0.0}, False, {}),
    'L1': ({'sparsity.l1.weight': 1e-5}, False, {}),
    'masks': ({}, True, {}),
    'xla attention': ({'model.attention_impl': 'xla'}, False, {}),
    # Dropout masks drawn by the PRNG, as flax does (rbg: its words go through memory), or a
    # byte each; Threefry's and unsafe_rbg's draws (the paper's step hashes indices).
    'flax dropout': ({'model.dropout_impl': 'flax'}, False, {}),
    'bytes dropout': ({'model.dropout_impl': 'bytes'}, False, {}),
    'threefry': ({'rng_impl': 'threefry', 'model.dropout_impl': 'flax'}, False, {}),
    'unsafe_rbg': ({'rng_impl': 'unsafe_rbg', 'model.dropout_impl': 'flax'}, False, {}),
    'remat dots': ({'model.remat': 'dots'}, False, {}),
    # The MLP's GELU in jax.nn.gelu's tanh form, which cuBLASLt may take into its epilogue.
    'tanh gelu': ({'model.gelu_form': 'tanh'}, False, {}),
    # The paper's step under other XLA options (as XLA_FLAGS=--<option>=<value> would set
    # them for a whole run): cuBLAS only, Triton wherever it can, cuBLASLt (bias epilogues)
    # for the GEMMs; cuDNN's kernels for the LayerNorms (25 per step, memory-bound fusions).
    'cuBLAS GEMMs': ({}, False, {'xla_gpu_enable_triton_gemm': False}),
    'Triton GEMMs': ({}, False, {'xla_gpu_triton_gemm_any': True}),
    'cuBLASLt': ({}, False, {'xla_gpu_enable_cublaslt': True}),
    'cuDNN LayerNorm': ({}, False, {'xla_gpu_enable_cudnn_layer_norm': True}),
}
TARGET_ROWS = ('paper', PLAIN, 'L1', 'masks')  # what the targets compare, compiled first
# The default: the targets, the fused attention's alternative and the PRNG's dropout draws;
# the rest (--variants all) was measured once (README) and costs a minute more.
DEFAULT_VARIANTS = (*TARGET_ROWS, 'xla attention', 'flax dropout')
REMAT = 'paper, remat dots'


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One program: a train step (`parts` set) or a forward pass for the logits check."""

    batch: int
    name: str
    config: Any = None
    masks: bool = False
    options: dict[str, Any] | None = None  # XLA compile options
    parts: Any = None
    lowered: Any = None
    compiled: Any = None
    compile_s: float = 0.0
    status: str = ''  # '' compiled | 'skipped' | an error line
    key: tuple[Any, ...] = ()  # what the lowered program depends on
    init: Job | None = None  # the program that makes a train step's fresh state
    args: tuple[Any, ...] = ()  # a state init's arguments


def plan(base: Any, batches: list[int], largest: list[int], largest_remat: list[int],
         variants: tuple[str, ...] = DEFAULT_VARIANTS) -> list[Job]:
    """Every train-step program, in the order the targets need them: `variants` at the first
    batch (the targets' rows first), the paper's step at the others, remat at the largest."""
    b0 = batches[0]

    def job(batch: int, name: str, variant: str) -> Job:
        overrides, masks, options = VARIANTS[variant]
        return Job(batch, name, with_overrides(base, overrides, batch), masks, options,
                   key=(batch, tuple(sorted(overrides.items())), masks))

    first = [v for v in TARGET_ROWS if v in variants]
    return ([job(b0, v, v) for v in first]
            + [job(b, 'paper', 'paper') for b in batches[1:] + largest]
            + [job(b, REMAT, 'remat dots') for b in largest_remat]
            + [job(b0, v, v) for v in variants if v not in first])


def logits_jobs(c: Any) -> tuple[list[Job], tuple[Any, Any]]:
    """The fused attention's forward and XLA's, on the same noisy parameters and images."""
    fused = build_model(c, NUM_CLASSES, 'jax')
    exact = fused.clone(attention_impl='xla')
    size = c.model.image_size
    params = jax.jit(lambda r: exact.init(r, jnp.zeros((1, size, size, 3)))['params'])(
        jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape),
                          params)
    x = jax.random.uniform(jax.random.key(3), (16, size, size, 3), minval=-1, maxval=1)
    jobs = [Job(16, f'logits, {m.attention_impl} attention',
                lowered=jax.jit(m.apply).lower({'params': params}, x)) for m in (fused, exact)]
    return jobs, ({'params': params}, x)


START = time.perf_counter()  # reset by main: the check's clock, for the progress lines


def at() -> str:
    """How far into the check: on each progress line, so that a run cut short by its time
    limit shows where the time went."""
    return f'[{time.perf_counter() - START:.0f} s]'


class Programs:
    """Lowers the check's programs and compiles each in a thread as soon as it is lowered:
    tracing holds the GIL and is slow on a GPU machine's host (6 s a ViT-B/16 step on the
    H200's), XLA compiles without it. The first program compiles alone, so that its autotuning,
    undisturbed, fills XLA's cache for the shapes the others share; then up to `workers` at
    once, in the order given. None starts after `deadline` (its row says 'skipped') but those
    marked `must`. Each train step also gets the program that makes its fresh state
    (`lower_state`), one per distinct state: variants that change neither the state's shapes,
    shardings, masks nor dropout keys start from the same values. Made at run time, a state
    per variant took longer than the compiles on a fresh machine."""

    def __init__(self, mesh: Any, deadline: float, workers: int) -> None:
        self.mesh, self.deadline = mesh, deadline
        self.pool = ThreadPoolExecutor(max(workers, 1))
        self.first_done = threading.Event()
        self.futures: list[Any] = []
        self.steps: dict[tuple[Any, ...], Job] = {}  # what a lowered step depends on -> it
        self.inits: dict[tuple[Any, ...], Job] = {}  # a distinct state -> its init program

    def step(self, job: Job, must: bool = False) -> None:
        if time.perf_counter() > self.deadline and not must:
            job.status = 'skipped'
            print(f'# {at()} {job.name} @ {job.batch}: skipped', flush=True)
            return
        if job.key in self.steps:  # differs only in XLA's compile options
            job.parts, job.lowered = self.steps[job.key].parts, self.steps[job.key].lowered
        else:
            job.parts, job.lowered = lower_train_step(job.config, self.mesh, job.masks)
            self.steps[job.key] = job
        self.compile(job, must)
        p, c = job.parts, job.config
        leaves = jax.tree.leaves(p.abstract)
        key = (job.masks, c.seed, c.rng_impl, jax.tree.structure(p.abstract),
               tuple((a.shape, a.dtype) for a in leaves), tuple(jax.tree.leaves(p.shardings)))
        if key not in self.inits:
            use_rng_impl(c.rng_impl)
            lowered, args = lower_state(p.init_params, p.tx, c.seed, p.shardings)
            self.inits[key] = Job(0, f'state init {len(self.inits) + 1}', lowered=lowered,
                                  args=args)
            self.compile(self.inits[key], must=True)
        job.init = self.inits[key]

    def compile(self, job: Job, must: bool = False) -> None:
        first = not self.futures
        self.futures.append(self.pool.submit(self._compile, job, first, must))

    def _compile(self, job: Job, first: bool, must: bool) -> None:
        try:
            if not first:
                self.first_done.wait()
            if time.perf_counter() > self.deadline and not (first or must):
                job.status = 'skipped'
            else:
                t = time.perf_counter()
                try:
                    job.compiled = job.lowered.compile(compiler_options=job.options or None)
                except Exception as e:  # noqa: BLE001 - reported in the job's row
                    job.status = f'compile failed: {first_line(e)}'
                job.compile_s = time.perf_counter() - t
            print(f'# {at()} {job.name}{f" @ {job.batch}" if job.batch else ""}: '
                  f'{job.status or "compiled"} in {job.compile_s:.1f} s', flush=True)
        finally:
            if first:
                self.first_done.set()

    def wait(self) -> int:
        """Waits for every compile; returns how many programs there were."""
        for f in self.futures:
            f.result()
        self.pool.shutdown()
        return len(self.futures)


def first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def oom(e: Exception) -> bool:
    return 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower()


def fits(job: Job) -> str:
    """'' when XLA's memory analysis says the step fits on the device, else why not."""
    try:
        m = job.compiled.memory_analysis()
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports these
        return ''
    if m is None or not stats or 'bytes_limit' not in stats:
        return ''
    need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    free = stats['bytes_limit'] - stats.get('bytes_in_use', 0)
    return '' if need <= free else f'needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free'


def synthetic_batch(batch: int, size: int, mesh: Any) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(1))
    return jax.device_put({
        'image': jax.random.uniform(k1, (batch, size, size, 3), minval=-1, maxval=1),
        'label': jax.random.randint(k2, (batch,), 0, NUM_CLASSES)}, batch_sharding(mesh))


def runner(job: Job, batch: dict[str, jax.Array], steps: int) -> Any:
    """A closure that runs `steps` steps of `job` (from a fresh state), then waits for them:
    dispatch overlaps the device's work, as in the trainer's loop. It returns the seconds the
    host took to dispatch them."""
    use_rng_impl(job.config.rng_impl)
    init = job.init
    box = {'state': (init.compiled or init.lowered.compile())(*init.args)}

    def run() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            box['state'], _ = job.compiled(box['state'], batch)
        dispatched = time.perf_counter() - t
        jax.block_until_ready(box['state'].params)
        return dispatched

    return run


def alternate(fns: dict[str, Any], reps: int
              ) -> tuple[dict[str, float], dict[str, float], dict[str, Exception]]:
    """Median seconds per call, after one untimed call each, and the median share of a call
    the host spent dispatching (what a function returns: seconds until its last step was
    queued, before it waits): near 1, the host sets the pace, not the device. Every function
    runs once per round, so all see the same machine state; the order rotates each round, so
    none always follows the other framework's step. A function that raises (a kernel the GPU
    refuses at run time, out of memory) is dropped with its error, and the others go on."""
    failed: dict[str, Exception] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    shares: dict[str, list[float]] = {k: [] for k in fns}

    def call(k: str, timed: bool) -> None:
        t = time.perf_counter()
        try:
            dispatched = fns[k]()
        except Exception as e:  # noqa: BLE001 - reported in k's row
            failed[k] = e
            return
        seconds = time.perf_counter() - t
        if timed:
            times[k].append(seconds)
            if dispatched is not None:
                shares[k].append(min(dispatched / seconds, 1.0))

    keys = list(fns)
    for k in keys:
        call(k, False)
    for i in range(reps):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            if k not in failed:
                call(k, True)
    ok = [k for k in keys if k not in failed]
    return ({k: median(times[k]) for k in ok},
            {k: median(shares[k]) for k in ok if shares[k]}, failed)


def profile(job: Job, run: Any, steps: int, top: int = 12) -> list[str]:
    """One traced call of `run` (`steps` steps of `job`, warm): device busy time against the
    wall clock, the bandwidth XLA's fusions reach, time by kind of kernel, the top kernels
    with the HLO and jax ops they run (on a CPU: the XLA ops)."""
    text = job.compiled.as_text()
    hlo = hlo_index(text)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        run()
        wall = (time.perf_counter() - t) * 1e3 / steps
        jax.profiler.stop_trace()
        events = trace_events(d)
    head = (f'profile: {job.name} @ {job.batch}, {steps} steps traced, {wall:.1f} ms/step wall '
            'while traced')
    dev = device_ops(events, hlo, steps, top)
    if dev is None:
        rows = op_table(events, hlo, steps, top)
        return [f'{head}; no device kernels (a CPU run): XLA ops on the host', '',
                '| ms/step | XLA op | shape | jax op |', '|---|---|---|---|',
                *[f'| {ms:.2f} | {kind} | {shape} | {op} |' for ms, kind, shape, op in rows]]
    busy = dev['busy_ms']
    return [f'{head}, device busy {busy:.1f} ms/step ({100 * busy / wall:.0f}%)', '',
            fusion_bandwidth(dev['kinds'], memory_traffic(text)), '',
            '| kernel kind | ms/step | % of busy |', '|---|---|---|',
            *[f'| {k} | {ms:.2f} | {100 * ms / busy:.1f} |' for k, ms in dev['kinds']], '',
            '| ms/step | calls/step | kernel | HLO op | jax op |', '|---|---|---|---|---|',
            *[f'| {ms:.2f} | {n:g} | {k[:90]} | {op} | {jop[-120:]} |'
              for ms, n, k, op, jop in dev['top']]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument('--config', default='configs/imagenet100.py')
    ap.add_argument('--tiny', action='store_true', help='the testing ViT at 32 px (CI, CPU)')
    ap.add_argument('--reps', type=int, default=10, help='timed samples per step variant')
    ap.add_argument('--steps', type=int, default=5,
                    help='steps per sample, dispatched back to back, then waited for')
    ap.add_argument('--batches', default='32,64', help='with PyTorch alongside; the first '
                    'also runs the variants')
    ap.add_argument('--variants', default=','.join(DEFAULT_VARIANTS),
                    help=f'steps at the first batch, or "all": {", ".join(VARIANTS)}')
    # 384 is the largest batch the paper's step fits into at the script's memory fraction (0.6
    # of an H200's 139.8 GiB: 76.0 GiB by XLA's analysis with hashed dropout masks, 87.5 with
    # flax's; benchmarks/gpu_compile.py), so remat is not needed on an H200.
    ap.add_argument('--largest', default='256,384', help='larger batches, the plain config')
    ap.add_argument('--largest-remat', default='', help='larger batches with remat dots')
    ap.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                    help='compiles at once')
    ap.add_argument('--json', default='', help='also write the results here')
    ap.add_argument('--budget-s', type=float, default=160,
                    help='no compile starts after this many seconds (those are skipped), '
                    "except the paper's step and the logits check")
    ap.add_argument('--no-profile', action='store_true',
                    help="skip tracing the paper's step at the first batch")
    ap.add_argument('--profile-by-s', type=float, default=290,
                    help='no profile starts after this many seconds')
    args = ap.parse_args()
    from sparse_vit_jax.cli import skip_tpu_without_chips
    skip_tpu_without_chips()  # runs on this machine's devices: no libtpu start-up errors
    if args.tiny:
        trace_cpu_ops()
    global START
    START = time.perf_counter()
    import torch
    on_gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        raise SystemExit('error: the GPU check needs an NVIDIA GPU for JAX and PyTorch; '
                         'use --tiny to run its code on this device')
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f'# {command()}\n# {environment()}\n', flush=True)
    ints = lambda s: [int(b) for b in s.split(',') if b]  # noqa: E731
    variants = tuple(VARIANTS) if args.variants == 'all' else tuple(
        v.strip() for v in args.variants.split(',') if v.strip())
    if unknown := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f'error: unknown --variants {", ".join(unknown)}; choose from '
                         f'{", ".join(VARIANTS)} or "all"')
    base = load_config(args.config, args.tiny)
    if args.tiny:
        batches, largest, largest_remat, reps, args.steps = [8], [16], [32], 2, 2
    else:
        batches, largest, largest_remat, reps = (ints(args.batches), ints(args.largest),
                                                 ints(args.largest_remat), args.reps)
    mesh = make_mesh()
    name, size = base.model.name, base.model.image_size
    peak = peak_bf16_tflops(512 if args.tiny else 8192)
    flops_per_image = 3 * matmul_flops(build_model(base, NUM_CLASSES, 'jax'), size) / 1e12
    resolved = build_model(with_overrides(base, {}, batches[0]), NUM_CLASSES, 'jax')
    print(f'{name}@{size}, {jax.devices()[0].device_kind}: model dtype '
          f'{jnp.dtype(resolved.dtype).name}, attention {resolved.attention_impl}, dropout masks '
          f'{resolved.dropout_impl}, GELU {resolved.gelu_form} form; measured bf16 '
          f'matmul peak {peak:.1f} TFLOP/s; {flops_per_image:.3g} TFLOP per image and step',
          flush=True)

    jobs = plan(base, batches, largest, largest_remat, variants)
    programs = Programs(mesh, START + args.budget_s, args.workers)
    programs.step(jobs[0], must=True)  # the paper's step, whatever the budget
    use_rng_impl(base.rng_impl)
    check_jobs, (variables, images) = logits_jobs(with_overrides(base, {}, batches[0]))
    for j in check_jobs:  # needed whatever happens
        programs.compile(j, must=True)
    for j in jobs[1:]:
        programs.step(j)
    print(f'# {at()} {len(programs.futures)} programs lowered, compiling with {args.workers} '
          'threads', flush=True)
    count = programs.wait()
    print(f'# {at()} {count} programs compiled', flush=True)

    results: list[dict[str, Any]] = []

    def save() -> None:
        if args.json:
            write_json(args.json, {'command': command(), 'environment': environment(),
                                   'peak_tflops': peak, 'rows': results})

    def row(job: Job, rate: float | None, torch_rate: float | None = None, note: str = '',
            host: tuple[float | None, float | None] = (None, None)) -> None:
        r = {'batch': job.batch, 'step': job.name, 'compile_s': round(job.compile_s, 1),
             'images_per_s': rate, 'note': note or job.status,
             'mfu_percent': rate and 100 * rate * flops_per_image / peak,
             'pytorch_images_per_s': torch_rate,
             'dispatch_percent': host[0] and 100 * host[0],
             'pytorch_dispatch_percent': host[1] and 100 * host[1]}
        results.append(r)
        cells = ([f'{rate:.1f}', f'{r["mfu_percent"]:.1f}'] if rate else [r['note'], ''])
        cells += [f'{torch_rate:.1f}', f'{rate / torch_rate:.2f}'] if rate and torch_rate else [
            '', '']
        cells.append(' / '.join(f'{100 * h:.0f}' if h is not None else '-' for h in host)
                     if rate else '')
        print(f'| {job.batch} | {job.name} | ' + ' | '.join(cells) + ' |', flush=True)

    print('\n| batch | step | ours img/s | MFU % | pytorch img/s | ours / pytorch '
          '| host dispatch %, ours / pytorch |')
    print('|---|---|---|---|---|---|---|', flush=True)
    grouped = [j for j in jobs if j.batch in batches and j.name != REMAT]
    paper_run = None  # the paper's step at the first batch, warm: profiled at the end
    reference_failed: list[str] = []  # PyTorch's step, by batch
    for b in batches:  # ours and PyTorch, alternated
        group = [j for j in grouped if j.batch == b]
        data = synthetic_batch(b, size, mesh)
        fns: dict[str, Any] = {}
        failed: dict[str, Exception] = {}
        for j in group:
            try:
                if j.compiled:
                    fns[j.name] = runner(j, data, args.steps)
            except Exception as e:  # noqa: BLE001 - reported in the row, the rest runs
                failed[j.name] = e
        print(f'# {at()} batch {b}: states made', file=sys.stderr, flush=True)
        try:
            fns['pytorch'] = torch_step(name, size, b, gpu=on_gpu, bf16=True,
                                        num_classes=NUM_CLASSES, steps=args.steps)
        except Exception as e:  # noqa: BLE001 - our rows still run
            failed['pytorch'] = e
        print(f'# {at()} batch {b}: {len(fns)} steps ready, timing', file=sys.stderr, flush=True)
        seconds, host, errors = alternate(fns, reps)
        failed.update(errors)
        per_image = {k: v / (b * args.steps) for k, v in seconds.items()}
        if b == batches[0] and not args.no_profile and 'paper' in per_image:
            paper_run = fns['paper']
        fns = {}  # the group's states go before the next group's
        torch_rate = 1 / per_image['pytorch'] if 'pytorch' in per_image else None
        if 'pytorch' in failed:
            reference_failed.append(f'PyTorch @ {b}: run failed: '
                                    f'{first_line(failed["pytorch"])}')
            print(f'# {reference_failed[-1]}', flush=True)
        for j in group:
            if j.name in failed:
                e = failed[j.name]
                j.status = 'out of memory' if oom(e) else f'run failed: {first_line(e)}'
            row(j, 1 / per_image[j.name] if j.name in per_image else None, torch_rate,
                host=(host.get(j.name), host.get('pytorch')))
        save()
    for j in [j for j in jobs if j not in grouped]:  # larger batches, one at a time
        why = j.status or (fits(j) if j.compiled else 'not compiled')
        if why:
            row(j, None, note=why)
            continue
        try:
            steps = max(1, args.steps * batches[0] // j.batch)  # long steps: little to overlap
            run = runner(j, synthetic_batch(j.batch, size, mesh), steps)
            seconds, host, errors = alternate({'one': run}, max(reps // 2, 2))
            if errors:
                raise errors['one']
            row(j, j.batch * steps / seconds['one'], host=(host.get('one'), None))
        except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory as a runtime error
            if not oom(e):
                j.status = f'run failed: {first_line(e)}'
            row(j, None, note='out of memory' if oom(e) else j.status)
        save()

    agree = False
    if all(j.compiled for j in check_jobs):
        try:
            a, b = (np.asarray(j.compiled(variables, images)) for j in check_jobs)
        except Exception as e:  # noqa: BLE001 - a line, then the rest of the report
            check = f'fused vs XLA logits: run failed: {first_line(e)}'
        else:
            share = float((a.argmax(-1) == b.argmax(-1)).mean())
            scale = float(np.abs(b).max())
            agree = share >= 0.9 and np.abs(a - b).max() <= 0.05 * scale
            check = (f'{check_jobs[0].name} vs {check_jobs[1].name}, bf16 logits: max |diff| '
                     f'{np.abs(a - b).max():.4f} (logit scale {scale:.2f}), argmax agreement '
                     f'{share:.3f}: {"agree" if agree else "DISAGREE"}')
    else:
        check = 'fused vs XLA logits: not compiled: ' + '; '.join(j.status for j in check_jobs)
    print(f'\n{check}')
    summary = targets(results, batches[0])
    print('\n'.join(summary), flush=True)
    final = {'command': command(), 'environment': environment(), 'peak_tflops': peak,
             'rows': results, 'reference_failed': reference_failed, 'fused_check': check,
             'targets': summary}
    if args.json:
        write_json(args.json, final)

    # Last, so that a run cut short has printed and saved everything else.
    traced = ['profile: skipped (--no-profile, the step did not run, or past --profile-by-s)']
    if paper_run is not None and time.perf_counter() - START < args.profile_by_s:
        try:
            traced = profile(jobs[0], paper_run, args.steps)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a line, not the end
            traced = [f'profile: failed: {first_line(e)}']
    print('\n' + '\n'.join(traced))
    print(f'# whole check: {time.perf_counter() - START:.0f} s', flush=True)
    if args.json:
        write_json(args.json, {**final, 'profile': traced})
    failed_jobs = [j for j in [*jobs, *check_jobs, *programs.inits.values()]
                   if 'failed: ' in j.status]
    return 1 if failed_jobs or reference_failed or not agree else 0


def targets(results: list[dict[str, Any]], b0: int) -> list[str]:
    """The issue's three targets, read off the measured rows (measured, not judged)."""
    at = {r['step']: r for r in results if r['batch'] == b0 and r['images_per_s']}
    measured = [r for r in results if r['images_per_s']]
    lines = []
    if measured:
        best = max(measured, key=lambda r: r['mfu_percent'])
        lines.append(f'best MFU {best["mfu_percent"]:.1f}% ({best["step"]}, batch '
                     f'{best["batch"]}); target >= 45%: {met(best["mfu_percent"] >= 45)}')
    if 'paper' in at and at['paper']['pytorch_images_per_s']:
        ratio = at['paper']['images_per_s'] / at['paper']['pytorch_images_per_s']
        lines.append(f'paper step / PyTorch at batch {b0}: {ratio:.2f}x; target >= 1.3x: '
                     f'{met(ratio >= 1.3)}')
    if PLAIN in at:
        for v in ('paper', 'L1', 'masks'):
            if v in at:
                ratio = at[v]['images_per_s'] / at[PLAIN]['images_per_s']
                lines.append(f'{v} step: {ratio:.2f}x the plain step\'s images/s; target '
                             f'>= 0.90x: {met(ratio >= 0.90)}')
    return lines


def met(ok: bool) -> str:
    return 'met' if ok else 'NOT met'


if __name__ == '__main__':
    sys.exit(main())
