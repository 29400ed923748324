"""The paper's experiment on the engine: config -> model, data, optimizer; train -> eval -> prune.

    results = run(config, workdir)

`Experiment.create` builds only what every stage needs (mesh, model, the data
source, parameter shapes and shardings) and checks the config's selections on
shapes, before any compute. Training data and the optimizer are built by the
train stage alone, so `stages=('eval', 'prune')` of a finished run needs neither
its training split nor its optimizer. Writes to the workdir: checkpoints/
(orbax), params.npz, results.json/.csv, sparsity_report.md and tensorboard/.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
from etils import epath
from jax.sharding import Mesh

from sparse_vit_jax.checkpoints import load_pretrained, other_widths, save_params
from sparse_vit_jax.checkpoints.io import checkpoint_shapes, directory_message
from sparse_vit_jax.configs import model_shape, nm_patterns, training_differences, validate
from sparse_vit_jax.data import Source, TrainData, eval_batches, get_source, split_size
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import (
    NUMERICS,
    VisionTransformer,
    attention_impl,
    compute_dtype,
    create_model,
    cudnn_refusal,
    dropout_impl,
    gelu_form,
)
from sparse_vit_jax.multihost import everywhere, from_process0, on_process0
from sparse_vit_jax.objective import EvalMetrics, TrainMetrics, make_loss_fn
from sparse_vit_jax.optimizer import build_optimizer, current_hparams, steps_for
from sparse_vit_jax.pruning import evaluate_at_ratios, evaluate_nm, nm_masks, parse_nm, weight_stats
from sparse_vit_jax.selection import PAPER_POOL, select
from sparse_vit_jax.train import results as results_io
from sparse_vit_jax.train import signals
from sparse_vit_jax.train.checkpointing import (
    Checkpointer,
    checkpoint_dir,
    latest_meta,
    restore_params,
)
from sparse_vit_jax.train.loop import LoopConfig, log, train_loop
from sparse_vit_jax.train.memory import check_fits, state_bytes
from sparse_vit_jax.train.sharding import make_mesh, state_shardings, to_host
from sparse_vit_jax.train.state import (
    TrainState,
    abstract_state,
    create_state,
    with_shardings,
)
from sparse_vit_jax.train.steps import evaluate, make_eval_step, make_train_step
from sparse_vit_jax.train.workdir import WorkdirLock, check_workdir


def build_model(c: Any, num_classes: int, numerics: str = 'jax', mesh: Mesh | None = None,
                widths: dict[str, Any] | None = None) -> VisionTransformer:
    """The config's model; `mesh` is where the 'pallas' attention runs per device, and its
    devices are what the config's 'auto' choices are made for (else JAX's first device).
    `widths`: per-block heads and MLP units (`start_widths`) in place of the config's."""
    m = c.model
    overrides = {k: m[k] for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim',
                                   'patch_size') if m[k] > 0}
    if widths:
        overrides.update(widths, head_dim=head_width(c))
    device = None if mesh is None else mesh.devices.flat[0]
    dtype = compute_dtype(m.dtype, device)
    impl = attention_impl(m.attention_impl, dtype, head_width(c), device)
    return create_model(m.name, num_classes=num_classes, image_size=m.image_size,
                        dropout_rate=m.dropout_rate,
                        dropout_impl=dropout_impl(m.dropout_impl, device),
                        gelu_form=gelu_form(m.gelu_form, device),
                        attention_dropout_rate=m.attention_dropout_rate, dtype=dtype,
                        attention_impl=impl, remat=m.remat, mesh=mesh, **NUMERICS[numerics],
                        **overrides)


def head_width(c: Any) -> int:
    shape = model_shape(c)
    return shape['hidden_size'] // shape['num_heads']


# Attention kernels for one kind of device: (its JAX backend, what to call it).
KERNEL_BACKENDS = {'cudnn': ('gpu', 'an NVIDIA GPU'), 'pallas': ('tpu', 'a TPU')}

PRNG_IMPLS = {'threefry': 'threefry2x32', 'rbg': 'rbg', 'unsafe_rbg': 'unsafe_rbg'}


def use_rng_impl(name: str) -> str:
    """Sets JAX's default PRNG (dropout masks, initialisation): 'auto' keeps Threefry on CPUs
    (with its fast CPU lowering) and takes 'rbg' on GPUs and TPUs, where XLA's RngBitGenerator
    is cheaper than Threefry's hash rounds. Returns the implementation used."""
    if name == 'auto':
        name = 'threefry' if jax.default_backend() == 'cpu' else 'rbg'
    jax.config.update('jax_default_prng_impl', PRNG_IMPLS[name])
    if jax.default_backend() == 'cpu' and name == 'threefry':
        from sparse_vit_jax.train.cpu_threefry import use_unrolled_threefry_on_cpu
        use_unrolled_threefry_on_cpu()  # same random bits, ~5x faster dropout masks on CPU
    return name


def use_compile_cache(where: str) -> str:
    """Keeps compiled XLA programs on disk, so a resumed or re-run job skips compiling (about
    a minute for ViT-B/16@384 on a GPU). 'auto': a per-user directory on GPUs and TPUs unless
    JAX_COMPILATION_CACHE_DIR names one; on a CPU JAX's default (its programs compile in
    seconds). '' leaves JAX's default. Returns the directory in use ('' for none)."""
    chosen = jax.config.jax_compilation_cache_dir
    if where == 'auto' and jax.default_backend() != 'cpu' and not chosen:
        home = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
        where = os.path.join(home, 'sparse_vit_jax', 'xla')
    if where and where != 'auto':
        jax.config.update('jax_compilation_cache_dir', where)
    return jax.config.jax_compilation_cache_dir or ''


def resolve_numerics(c: Any) -> str:
    """model.numerics, with 'auto' read from the weights' format or the run it continues."""
    if c.model.numerics != 'auto':
        return c.model.numerics
    if c.pretrained and not c.pretrained.endswith('.npz'):
        from sparse_vit_jax.checkpoints.io import checkpoint_source
        return everywhere(lambda: checkpoint_source(c.pretrained),
                          lambda i: _not_read(i, c.pretrained))
    if c.init_from and is_run_dir(c.init_from):
        return latest_meta(c.init_from)[1].get('numerics', 'jax')
    return 'jax'


def start_widths(c: Any, workdir: Any) -> dict[str, tuple[int, ...]]:
    """Per-block `num_heads` and `mlp_dim` of the weights the run starts from where they
    differ from the config's: a structurally pruned model (`export --format npz --structured`,
    or a run fine-tuned from one) is built with its own widths; {} for the config's model.

    Read from the workdir's own checkpoints when training resumes, else from `init_from`'s
    run, else from the weights file's shapes, no tensor read (torch files hold one MLP width
    for all blocks, and the config's heads). Widths that do not fit the config (other depth,
    head size) are left to the weights' loading, which names the first misshapen parameter."""
    if 'train' in c.stages and _has_checkpoints(workdir):
        return _widths_of(_run_meta(workdir))
    start = (c.pretrained or c.init_from) if 'train' in c.stages else c.init_from
    if not start:
        return {}
    if is_run_dir(start):
        return _widths_of(_run_meta(start))
    shape = model_shape(c)
    widths = other_widths(everywhere(lambda: checkpoint_shapes(start, shape['num_heads']),
                                     lambda i: _not_read(i, start)), shape)
    if widths:
        log(f'model widths from {start}: heads per block {list(widths["num_heads"])}, MLP '
            f'units per block {list(widths["mlp_dim"])}')
    return widths


def _has_checkpoints(workdir: Any) -> bool:
    """Whether a run directory holds a finished checkpoint step (not only a partial one)."""
    d = checkpoint_dir(workdir)
    return from_process0(d.is_dir() and any(p.name.isdigit() for p in d.iterdir()))


def _run_meta(path: Any) -> dict[str, Any]:
    """The newest readable checkpoint meta of a run ({} if none: restoring says why)."""
    try:
        return latest_meta(path)[1]
    except UserError:
        return {}


def _widths_of(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in meta.get('widths', {}).items()}


def _not_read(process: int, path: Any) -> UserError:
    """The others' error when one process could not read its copy of a weights file."""
    return UserError(f'process {process} could not read {path} (see its error); each host reads '
                     'its own copy of a weights file: put it at this path on every host')


def is_run_dir(path: Any) -> bool:
    """Whether weights come from a run directory (its checkpoints; read collectively) or a
    file (read by each process). Process 0's reading of the filesystem is every process's, so
    that all take the same path through their collectives: a process that does not see the
    run then lists other checkpoints and every process stops with one line. A directory
    holding no checkpoints but weights files is refused (one line, every process)."""
    p = epath.Path(path)
    kind = from_process0(0 if not p.is_dir() else
                         2 if not any(checkpoint_dir(p).glob('[0-9]*')) and any(p.glob('*.*'))
                         else 1)
    if kind == 2:
        raise UserError(directory_message(p))
    return kind == 1


MEMORY_ADVICE = ('lower config.batch_size (config.optimizer.accumulate=N keeps the effective '
                 'batch), set config.model.remat=dots or full, or config.mesh.fsdp=True')


def _pool(c: Any) -> list[str]:
    return list(c.prune.include) or list(PAPER_POOL)


@dataclass(frozen=True)
class TrainParts:
    """The train step `main` runs for a config, and what builds its state: no data needed
    (the GPU check times exactly this on synthetic batches)."""

    tx: Any
    init_params: Any          # rng -> params
    abstract: Any             # the TrainState's shapes (jax.eval_shape)
    shardings: Any
    step: Any                 # jitted (state, batch) -> (state, TrainMetrics)


def train_parts(c: Any, model: VisionTransformer, mesh: Mesh, total_steps: int,
                tx: Any = None) -> TrainParts:
    """The optimizer chain of `c` (or `tx`), the loss with the attention penalty, the step."""
    tx = tx if tx is not None else build_optimizer(c, total_steps // c.optimizer.accumulate)
    init = lambda rng: _init_params(model, c, rng)  # noqa: E731
    abstract = abstract_state(init, tx)
    shardings = state_shardings(abstract, mesh, c.mesh.fsdp)
    loss_fn = make_loss_fn(model, c.sparsity.attention.weight, c.sparsity.attention.layers)
    return TrainParts(tx, init, abstract, shardings,
                      make_train_step(loss_fn, tx, TrainMetrics, shardings, mesh))


@dataclass
class Experiment:
    """What every stage needs; the train stage builds its data and optimizer itself."""

    config: Any
    workdir: epath.Path
    mesh: Mesh
    model: VisionTransformer
    numerics: str
    source: Source
    abstract_params: Any
    param_shardings: Any
    widths: dict[str, tuple[int, ...]]
    _counts: dict[str, int] = field(default_factory=dict)  # examples per split read so far
    _eval: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, c: Any, workdir: Any) -> Experiment:
        impl = c.model.attention_impl
        backend, device = KERNEL_BACKENDS.get(impl, (jax.default_backend(), ''))
        if jax.default_backend() != backend:
            raise UserError(f'model.attention_impl={impl} needs {device}; this run is on '
                            f'{jax.default_backend()}: use model.attention_impl=xla')
        if impl == 'cudnn' and (why := cudnn_refusal(head_width(c))):
            raise UserError(f'model.attention_impl=cudnn: cuDNN\'s fused attention {why}; use '
                            'model.attention_impl=auto or xla')
        use_rng_impl(c.rng_impl)
        use_compile_cache(c.compile_cache)
        mesh = make_mesh()
        source = get_source(c.data)
        numerics = resolve_numerics(c)
        widths = start_widths(c, workdir)
        model = build_model(c, source.num_classes, numerics, mesh, widths)
        abstract = jax.eval_shape(lambda: _init_params(model, c, jax.random.PRNGKey(0)))
        # Selection regexes that match nothing fail here, on shapes, before any compute.
        used = {'prune.include': _pool(c),
                'sparsity.l1.include': c.sparsity.l1.weight > 0 and c.sparsity.l1.include,
                'sparsity.gradual.include': (c.sparsity.gradual.sparsity > 0
                                             and c.sparsity.gradual.include)}
        for key, patterns in used.items():
            try:
                if patterns:
                    select(abstract, list(patterns))
            except UserError as e:
                raise UserError(f'config {key}: {e}') from None
        for pattern in nm_patterns(c) if 'prune' in c.stages else ():  # fan-ins, on shapes
            n, m = parse_nm(pattern)
            try:
                jax.eval_shape(lambda p, n=n, m=m: nm_masks(
                    p, n, m, select=list(c.prune.include) or None), abstract)
            except UserError as e:
                raise UserError(f'config prune.nm {pattern}: {e}') from None
        shardings = state_shardings(abstract, mesh, c.mesh.fsdp)
        # An empty validation split fails here, not at the first evaluation hours later.
        counts = {source.val_split: split_size(source, source.val_split)} \
            if source.val_split else {}
        return cls(c, epath.Path(workdir), mesh, model, numerics, source, abstract, shardings,
                   widths, counts)

    def meta(self) -> dict[str, Any]:
        widths = {'widths': {k: list(v) for k, v in self.widths.items()}} if self.widths else {}
        return {'config': json.loads(self.config.to_json()), 'numerics': self.numerics,
                'num_classes': self.source.num_classes, **widths}

    # ---- parameters ----------------------------------------------------------------------
    def load_params(self, path: str, reinit_head: bool = False) -> Any:
        """Weights from a run directory (its checkpoints) or a weights file, onto the mesh."""
        p = epath.Path(path)
        if is_run_dir(p):
            return restore_params(p, with_shardings(self.abstract_params, self.param_shardings))
        params, fmt = everywhere(
            lambda: load_pretrained(p, self.abstract_params, reinit_head=reinit_head),
            lambda i: _not_read(i, p))
        log(f'loaded {p} ({fmt} format, model numerics {self.numerics!r})')
        return jax.device_put(params, self.param_shardings)

    # ---- stages --------------------------------------------------------------------------
    def train(self) -> tuple[Any, dict[str, Any]]:
        """Fine-tunes (resuming from the workdir's checkpoints); returns params and a summary."""
        c = self.config
        data = TrainData.create(c.data, c.batch_size, self.mesh, source=self.source)
        total = steps_for(c, data.steps_per_epoch)
        parts = train_parts(c, self.model, self.mesh, total)
        ckpt = Checkpointer(self.workdir, every_steps=c.checkpoint_every_steps,
                            keep=c.keep_checkpoints, timeout_s=c.checkpoint_timeout_s)
        try:
            return self._train(ckpt, data, parts, total)
        finally:
            ckpt.close()

    def _train(self, ckpt: Checkpointer, data: TrainData, parts: TrainParts, total: int
               ) -> tuple[Any, dict[str, Any]]:
        c = self.config
        check_fits('the train state (parameters and optimizer state)',
                   state_bytes(parts.abstract, parts.shardings),
                   'a smaller model, or config.mesh.fsdp=True to shard it over the devices')
        restored = ckpt.restore_latest(with_shardings(parts.abstract, parts.shardings),
                                       self._same_run)
        resumed_scalars = {}
        if restored is None:
            start = c.pretrained or c.init_from
            params = self.load_params(start, c.reinit_head and bool(c.pretrained)) \
                if start else None
            state = create_state(parts.init_params, parts.tx, c.seed, parts.shardings, params)
        else:
            state, meta = restored
            resumed_scalars = meta.get('scalars', {})
        step0 = int(state.step)
        step_fn = parts.step
        pool = select(self.abstract_params, _pool(c))
        zero_fraction = jax.jit(lambda p: _zero_fraction(p, pool))
        if c.sparsity.keep_zeros:
            log(f'the pool\'s zeros stay zero (sparsity.keep_zeros): pool sparsity '
                f'{float(to_host(zero_fraction(state.params))):.4f}')

        def extra(s: TrainState) -> dict[str, float]:
            hp = {k: float(v) for k, v in current_hparams(s.opt_state).items()}
            return {'pool_sparsity': float(to_host(zero_fraction(s.params))), **hp}

        from clu import metric_writers  # imports TensorFlow, which the data needs anyway
        writer = metric_writers.create_default_writer(
            str(self.workdir / 'tensorboard'), just_logging=jax.process_index() > 0)
        batches = data.batches(c.data, c.model.image_size, c.seed, step0, self.mesh)
        n, depth = jax.device_count(), self.model.num_layers
        log(f'training {total} steps ({data.steps_per_epoch} per epoch), batch {c.batch_size}, '
            f'{n} device{"s" * (n != 1)}, {depth} block{"s" * (depth != 1)}')
        try:
            state, scalars = train_loop(
                state, step_fn, batches, LoopConfig(total, c.log_every_steps, c.batch_size,
                                                    self.meta(), MEMORY_ADVICE,
                                                    c.eval_every_steps, self.during_name),
                ckpt, writer, extra, self.evaluate_during)
        finally:
            batches.close()
            writer.close()
        return state.params, {'steps': total, 'resumed_from': step0,
                              **(scalars or resumed_scalars)}

    def _same_run(self, meta: dict[str, Any]) -> None:
        """Refuses to continue a workdir's run with other training settings."""
        diffs = training_differences(meta.get('config', {}), self.config)
        if diffs:
            raise UserError(f'{self.workdir} holds a run with other training settings: '
                            f'{", ".join(diffs)}; re-run with its values, or use a new '
                            '--workdir')

    @property
    def during_name(self) -> str:
        """What evaluations during training read: 'val' (the held-out split) or 'eval' (the
        test split), the name of their log lines and tensorboard scalars."""
        return 'val' if self.source.val_split else 'eval'

    def evaluate_during(self, state: TrainState) -> dict[str, float]:
        """The scalars of an evaluation between training steps (`train_loop`'s `evaluate`):
        on the validation split if the config holds one out, else on the test split."""
        ev = self._evaluate(state.params, self.source.val_split)
        return {k: ev[k] for k in ('accuracy', 'top5_accuracy', 'loss')}

    def evaluate(self, params: Any, validation: bool = False) -> dict[str, float]:
        """Accuracy, top-5 accuracy and loss over every example of the test split (or of the
        validation split; padding not counted)."""
        signals.check('before an evaluation (training is checkpointed; evaluations are redone)')
        return self._evaluate(params, self.source.val_split if validation else '')

    def _evaluate(self, params: Any, split: str = '') -> dict[str, float]:
        c = self.config
        if not self._eval:
            n = self.mesh.size  # any eval batch works on any device count
            self._eval['batch'] = math.ceil(c.eval_batch_size / n) * n
            self._eval['step'] = make_eval_step(make_loss_fn(self.model), EvalMetrics,
                                                self.mesh)
        split = split or self.source.eval_split
        batches, self._counts[split] = eval_batches(
            c.data, c.model.image_size, self._eval['batch'], self.mesh, self.source,
            self._counts.get(split), split)
        m = evaluate(self._eval['step'], params, batches, 'lower config.eval_batch_size')
        return {'accuracy': float(m.accuracy.compute()),
                'top5_accuracy': float(m.top5_accuracy.compute()), 'loss': float(m.loss.compute()),
                'examples': int(m.accuracy.count)}

    def prune(self, params: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Prunes the same (unpruned) params at every ratio, then at every N:M pattern, and
        evaluates each; returns (the ratios' rows, the patterns' rows)."""
        c = self.config
        include = list(c.prune.include) or None
        rows, report = evaluate_at_ratios(params, c.prune.ratios, self.evaluate,
                                          scope=c.prune.scope, include=include,
                                          to_host=to_host, log=log)
        patterns = nm_patterns(c)
        nm_rows, nm_report = evaluate_nm(params, patterns, self.evaluate, include=include,
                                         to_host=to_host, log=log) if patterns else ([], '')
        results_io.write_text(self.workdir / 'sparsity_report.md',
                              report + (f'\n{nm_report}' if nm_rows else ''))
        return rows, nm_rows


def _init_params(model: VisionTransformer, c: Any, rng: jax.Array) -> Any:
    images = jnp.zeros((1, c.model.image_size, c.model.image_size, 3), jnp.float32)
    return model.init(rng, images)['params']


def _zero_fraction(params: Any, pool: Any) -> jax.Array:
    chosen = [w for w, s in zip(jax.tree.leaves(params), jax.tree.leaves(pool)) if s]
    return sum(jnp.sum(w == 0) for w in chosen) / sum(w.size for w in chosen)


def run(c: mlc.ConfigDict, workdir: Any) -> dict[str, Any]:
    """The stages of a validated config, in order; returns (and writes) the results."""
    validate(c)
    workdir = check_workdir(workdir)  # local or gs://
    exp = Experiment.create(c, workdir)
    with WorkdirLock(workdir, log):
        return stages(exp, c, workdir)


def stages(exp: Experiment, c: Any, workdir: Any, write: bool = True) -> dict[str, Any]:
    """train -> eval -> prune as `c.stages` says; results.json/.csv written if `write`."""
    workdir = epath.Path(workdir)
    out: dict[str, Any] = {k: v for k, v in exp.meta().items() if k != 'num_classes'}
    t0 = time.time()
    if 'train' in c.stages:
        params, out['train'] = exp.train()
        host_params = to_host(params)  # every process takes part in the gather
        on_process0(lambda: save_params(workdir / 'params.npz', host_params))
    else:
        params = exp.load_params(c.init_from)
        host_params = to_host(params)
    out['weights'] = weight_stats(host_params, c.prune.include or None)
    if 'eval' in c.stages:
        out['eval'] = exp.evaluate(params)
        if exp.source.val_split:
            out['validation'] = exp.evaluate(params, validation=True)
        for key, name in (('eval', 'test'), ('validation', 'validation')):
            if ev := out.get(key):
                log(f'{name} accuracy {ev["accuracy"]:.4f} (top-5 {ev["top5_accuracy"]:.4f}) on '
                    f'{ev["examples"]} examples (loss {ev["loss"]:.4f})')
    if 'prune' in c.stages:
        out['prune'], nm_rows = exp.prune(params)
        if nm_rows:
            out['prune_nm'] = nm_rows
    out['seconds'] = time.time() - t0
    if not write:
        return out
    results_io.write_json(workdir / 'results.json', out)
    rows = [{'stage': k, 'ratio': 0.0, **out[k]} for k in ('eval', 'validation') if k in out] + \
        [{'stage': 'prune', **r} for r in out.get('prune', [])] + \
        [{'stage': 'prune_nm', **r} for r in out.get('prune_nm', [])]
    results_io.write_csv(workdir / 'results.csv', rows)
    return out

