"""One readable trainer: fine-tune, evaluate, prune at every ratio, write results.

Everything runs as `jax.jit` steps over a device mesh ('data' axis): batches
are sharded over it, parameters replicated (or FSDP-sharded). State shapes come
from `jax.eval_shape` before anything is allocated. Checkpoints are orbax
CheckpointManager steps holding the TrainState (params, optimizer state with
any masks, step, rng) and the config as JSON; the data position is the step.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from sparse_vit_jax.checkpoints import load_pretrained, save_params
from sparse_vit_jax.configs import STAGES, from_saved, parse_layers, parse_ratios, validate
from sparse_vit_jax.data import TrainData, eval_batches, get_source
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.models import NUMERICS, VisionTransformer, create_model
from sparse_vit_jax.pruning import magnitude_masks, sparsity_report
from sparse_vit_jax.train import results as results_io
from sparse_vit_jax.train.cpu_threefry import use_unrolled_threefry_on_cpu
from sparse_vit_jax.train.loss import make_loss_fn
from sparse_vit_jax.train.optim import build_optimizer, current_hparams, steps_for
from sparse_vit_jax.train.sharding import (
    batch_sharding,
    make_mesh,
    replicated,
    state_shardings,
    to_host,
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # micro-steps taken; also the data position
    params: Any
    opt_state: Any
    rng: jax.Array        # raw uint32 key data, so orbax stores it as a plain array


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def build_model(c: Any, num_classes: int, numerics: str = 'jax') -> VisionTransformer:
    m = c.model
    overrides = {k: m[k] for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim',
                                   'patch_size') if m[k] > 0}
    return create_model(m.name, num_classes=num_classes, image_size=m.image_size,
                        dropout_rate=m.dropout_rate,
                        attention_dropout_rate=m.attention_dropout_rate,
                        dtype=jnp.bfloat16 if m.dtype == 'bfloat16' else jnp.float32,
                        attention_impl=m.attention_impl, **NUMERICS[numerics], **overrides)


def _prune_select(c: Any) -> Any:
    return c.prune.include.split(',') if c.prune.include else None


@dataclass
class Job:
    """What every stage needs: config, mesh, model, data, optimizer, jitted steps."""

    config: Any
    workdir: Path
    mesh: Any
    model: VisionTransformer
    data: TrainData
    total_steps: int
    tx: optax.GradientTransformation
    abstract_state: TrainState
    shardings: TrainState
    numerics: str
    _eval_step: Any = None

    @classmethod
    def create(cls, c: Any, workdir: Path, masks: Any = None) -> Job:
        use_unrolled_threefry_on_cpu()  # same random bits, ~5x faster dropout masks on CPU
        if c.model.attention_impl == 'cudnn' and jax.default_backend() != 'gpu':
            raise UserError(f'model.attention_impl=cudnn needs an NVIDIA GPU; this run is on '
                            f'{jax.default_backend()}: use model.attention_impl=xla')
        mesh = make_mesh()
        data = TrainData.create(c.data, c.batch_size, mesh)
        numerics = c.model.numerics
        if numerics == 'auto':
            numerics = 'jax'
            if c.pretrained:
                from sparse_vit_jax.checkpoints.io import read_checkpoint
                numerics = read_checkpoint(c.pretrained, 1)[1] if not c.pretrained.endswith(
                    '.npz') else 'jax'
        model = build_model(c, data.num_classes, numerics)
        total = steps_for(c, data.steps_per_epoch)
        tx = build_optimizer(c, total // c.optimizer.accumulate, masks)
        abstract = jax.eval_shape(lambda: _init_state(model, tx, c, jax.random.PRNGKey(0)))
        # Selection regexes that match nothing fail here, on shapes, before any compute.
        from sparse_vit_jax.selection import select as select_params
        if c.sparsity.l1.weight > 0 and c.sparsity.l1.include:
            select_params(abstract.params, c.sparsity.l1.include.split(','))
        _pool_selection(c, abstract.params)
        shardings = state_shardings(abstract, mesh, c.mesh.fsdp)
        return cls(c, workdir, mesh, model, data, total, tx, abstract, shardings, numerics)

    # ---- state ---------------------------------------------------------------------------
    def initial_state(self) -> TrainState:
        c = self.config
        rng = jax.random.PRNGKey(c.seed)
        init = jax.jit(lambda r: _init_state(self.model, self.tx, c, r),
                       out_shardings=self.shardings)
        state = init(rng)
        source = c.pretrained or c.init_from
        if source:
            params = self._params_from(source)
            params = jax.device_put(params, self.shardings.params)
            state = state.replace(params=params,
                                  opt_state=jax.jit(self.tx.init, out_shardings=self.shardings
                                                    .opt_state)(params))
        return state

    def _params_from(self, source: str) -> Any:
        c = self.config
        path = epath.Path(source)
        if path.is_dir():
            return restore_params(path, self.abstract_state.params, self.shardings.params)
        params, fmt = load_pretrained(path, self.abstract_state.params,
                                      reinit_head=c.reinit_head and bool(c.pretrained))
        log(f'loaded {path} ({fmt} format, model numerics {self.numerics!r})')
        return params

    def checkpoint_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            _absolute(self.workdir / 'checkpoints'),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.config.keep_checkpoints,
                                                 create=True))

    def restore(self, mngr: ocp.CheckpointManager, step: int) -> TrainState:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.abstract_state, self.shardings)
        return mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))['state']

    def save(self, mngr: ocp.CheckpointManager, state: TrainState) -> None:
        meta = {'config': json.loads(self.config.to_json()), 'step': int(state.step),
                'numerics': self.numerics, 'num_classes': self.data.num_classes}
        mngr.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    # ---- steps ---------------------------------------------------------------------------
    def train_step_fn(self) -> Any:
        c = self.config
        loss_fn = make_loss_fn(self.model, c.sparsity.attention.weight,
                               parse_layers(c.sparsity.attention.layers))
        tx = self.tx

        def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
            rng, drop = jax.random.split(state.rng)
            ones = jnp.ones(batch['label'].shape, jnp.float32)
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, aux), grads = grad_fn(state.params, batch['image'], batch['label'], ones, drop,
                                      True)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {'loss': aux['loss'] * aux['count'], 'correct': aux['correct'],
                       'count': aux['count'], 'attention_penalty': aux['attention_penalty'],
                       'grad_norm': optax.tree.norm(grads)}
            new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
            return new, metrics

        return jax.jit(step, in_shardings=(self.shardings, batch_sharding(self.mesh)),
                       out_shardings=(self.shardings, replicated(self.mesh)), donate_argnums=0)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Accuracy and loss over every example of the eval split (padding masked out)."""
        c = self.config
        if self._eval_step is None:
            loss_fn = make_loss_fn(self.model)

            def step(p: Any, b: dict[str, jax.Array]) -> dict[str, jax.Array]:
                m = loss_fn(p, b['image'], b['label'], b['mask'], None, False)[1]
                return {'loss': m['loss'] * m['count'], 'correct': m['correct'],
                        'count': m['count']}

            self._eval_step = jax.jit(step)
        batches, _ = eval_batches(c.data, c.model.image_size, c.eval_batch_size, self.mesh,
                                  self.data.source)
        total = None
        for batch in batches:
            m = self._eval_step(params, batch)
            total = m if total is None else jax.tree.map(jnp.add, total, m)
        total = to_host(total)
        n = float(total['count'])
        return {'accuracy': float(total['correct']) / n, 'loss': float(total['loss']) / n,
                'examples': int(n)}


def _absolute(path: Any) -> Any:
    return path if str(path).startswith('gs://') else epath.Path(path).absolute()


def _init_state(model: VisionTransformer, tx: optax.GradientTransformation, c: Any,
                rng: jax.Array) -> TrainState:
    init_rng, rng = jax.random.split(rng)
    images = jnp.zeros((1, c.model.image_size, c.model.image_size, 3), jnp.float32)
    params = model.init(init_rng, images)['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)


def restore_params(workdir_or_ckpt: Path, abstract_params_: Any, shardings: Any) -> Any:
    """Params of the latest checkpoint under DIR (or DIR/checkpoints), onto `shardings`."""
    d = workdir_or_ckpt
    if (d / 'checkpoints').is_dir():
        d = d / 'checkpoints'
    with ocp.CheckpointManager(_absolute(d)) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise UserError(f'no checkpoint found in {d}; pass a run directory or a .npz')
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
        saved = from_saved(meta['config'])
        saved.model.numerics = meta['numerics']  # as trained; never re-read the weights file
        saved.model.attention_impl = 'xla'  # any device may read the params
        state = Job.create(saved, d).restore(mngr, step)  # the saved run's own state layout
    got = jax.tree.map(lambda x: x.shape, state.params)
    want = jax.tree.map(lambda x: x.shape, abstract_params_)
    if got != want:
        raise UserError(f'checkpoint in {d} holds a different model than the config asks for')
    return jax.device_put(state.params, shardings)


def restore_latest_usable(job: Job, mngr: ocp.CheckpointManager) -> TrainState | None:
    """The newest checkpoint that restores; a damaged one is reported and skipped.

    Orbax writes each step to a temporary directory and renames it when complete,
    so a write interrupted by a kill is never listed; files truncated or deleted
    afterwards fail to restore and we fall back to the previous step.
    """
    where = job.workdir / 'checkpoints'
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            state = job.restore(mngr, step)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
            msg = str(e).splitlines()[0][:160] if str(e) else ''
            aside = job.workdir / 'damaged_checkpoints' / f'{step}-{int(time.time())}'
            log(f'warning: checkpoint {where / str(step)} is damaged ({type(e).__name__}: '
                f'{msg}); moved to {aside}, trying the previous one')
            if jax.process_index() == 0:
                aside.parent.mkdir(parents=True, exist_ok=True)
                (where / str(step)).rename(aside)
            mngr.reload()
            continue
        log(f'resuming from {where} at step {step}')
        return state
    if steps:
        raise UserError(f'no usable checkpoint in {where} (all {len(steps)} damaged, moved to '
                        f'{job.workdir / "damaged_checkpoints"}); re-run to start over')
    return None


class _Preempted:
    """SIGTERM (what preemption sends) asks the loop to checkpoint and stop."""

    def __init__(self) -> None:
        self.flag = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            pass

    def _handler(self, *_: Any) -> None:
        self.flag = True


def train(job: Job) -> tuple[TrainState, dict[str, Any]]:
    c = job.config
    mngr = job.checkpoint_manager()
    state = restore_latest_usable(job, mngr)
    if state is None:
        state = job.initial_state()
    step0 = int(state.step)
    batches = job.data.batches(c.data, c.model.image_size, c.seed, step0, job.mesh)
    train_step = job.train_step_fn()
    pool = _pool_selection(c, job.abstract_state.params)
    zero_fraction = jax.jit(lambda p: sum(jnp.sum(w == 0) for w, s in zip(
        jax.tree.leaves(p), jax.tree.leaves(pool)) if s) / sum(
            w.size for w, s in zip(jax.tree.leaves(p), jax.tree.leaves(pool)) if s))
    writer = _tensorboard(job.workdir)
    preempted = _Preempted()
    acc, t_last, steps_last = None, time.time(), 0
    last_log: dict[str, float] = {}
    log(f'training {job.total_steps} steps ({job.data.steps_per_epoch} per epoch), batch '
        f'{c.batch_size}, {jax.device_count()} devices, {job.model.num_layers} blocks')
    step = step0
    while step < job.total_steps:
        state, m = train_step(state, next(batches))
        step += 1
        acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
        steps_last += 1
        boundary = step % c.log_every_steps == 0 or step == job.total_steps
        save_now = step % c.checkpoint_every_steps == 0 or step == job.total_steps
        if boundary or save_now or preempted.flag:
            host = to_host(acc)
            loss = float(host['loss'] / host['count'])
            if not math.isfinite(loss) or not math.isfinite(float(host['grad_norm'])):
                raise UserError(f'loss became {loss} by step {step}; stopped without saving: the '
                                f'last good checkpoint (step {mngr.latest_step()}) is kept; '
                                'lower optimizer.lr or set optimizer.grad_clip')
            dt = time.time() - t_last
            hp = {k: float(v) for k, v in current_hparams(state.opt_state).items()}
            last_log = {'loss': loss, 'accuracy': float(host['correct'] / host['count']),
                        'attention_penalty': float(host['attention_penalty'] / steps_last),
                        'pool_sparsity': float(to_host(zero_fraction(state.params))),
                        'images_per_s': steps_last * c.batch_size / max(dt, 1e-9), **hp}
            eta = time.strftime('%H:%M:%S', time.gmtime((job.total_steps - step) * dt / steps_last))
            log(f'step {step}/{job.total_steps} | loss {loss:.4f} | acc '
                f'{last_log["accuracy"]:.3f} | {last_log["images_per_s"]:.0f} img/s | lr '
                f'{hp.get("learning_rate", 0):.2e} | ETA {eta}')
            _scalars(writer, step, last_log)
            acc, t_last, steps_last = None, time.time(), 0
        if save_now or preempted.flag:
            job.save(mngr, state)
        if preempted.flag:
            mngr.wait_until_finished()
            raise UserError(f'stopped by SIGTERM at step {step}; checkpoint saved, re-run the '
                            'same command to resume')
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
        writer.close()
    return state, {'steps': job.total_steps, 'resumed_from': step0, **last_log}


def _tensorboard(workdir: Path) -> Any:
    """TensorBoard event files (tensorboardX: TensorFlow's writer needs the tensorboard wheel)."""
    if jax.process_index() != 0:
        return None
    if str(workdir).startswith('gs://'):
        log('note: TensorBoard files are written locally to ./tensorboard for a gs:// workdir')
        workdir = Path('.')
    from tensorboardX import SummaryWriter
    return SummaryWriter(str(workdir / 'tensorboard'))


def _scalars(writer: Any, step: int, values: dict[str, float]) -> None:
    if writer is not None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)


def _pool_selection(c: Any, params: Any) -> Any:
    from sparse_vit_jax.selection import PAPER_POOL
    from sparse_vit_jax.selection import select as select_params
    return select_params(params, _prune_select(c) or PAPER_POOL)


def weight_stats(params: Any, select: Any = None) -> dict[str, float]:
    """The |w| distribution over the pruning pool: exact zeros, small fractions, quantiles."""
    from sparse_vit_jax.selection import PAPER_POOL
    from sparse_vit_jax.selection import select as select_params
    sel = select_params(params, select or PAPER_POOL)
    w = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel()
                        for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(sel)) if s])
    q = np.quantile(w, [0.1, 0.5, 0.9])
    return {'zero': float((w == 0).mean()), 'below_1e-3': float((w < 1e-3).mean()),
            'below_1e-2': float((w < 1e-2).mean()), 'q10': float(q[0]), 'median': float(q[1]),
            'q90': float(q[2]), 'histogram_log10': np.histogram(
                np.log10(w[w > 0]), bins=np.arange(-8, 1.01, 0.5))[0].tolist()}


def prune_sweep(job: Job, params: Any) -> list[dict[str, Any]]:
    """Each ratio prunes the same (unpruned) params; one selection pass serves all ratios."""
    c = job.config
    ratios = parse_ratios(c.prune.ratios)
    masks = magnitude_masks(params, ratios, scope=c.prune.scope, select=_prune_select(c))
    from sparse_vit_jax.pruning import apply_masks, format_report
    rows, reports = [], []
    for ratio, m in zip(ratios, masks):
        pruned = apply_masks(params, m)
        host = to_host(pruned)
        report = sparsity_report(host, _prune_select(c))
        ev = job.evaluate(pruned)
        leaves = jax.tree.leaves(host)
        rows.append({'ratio': ratio, **ev, 'pool_sparsity': report['fraction'],
                     'nonzero_params': sum(int(np.count_nonzero(x)) for x in leaves),
                     'total_params': sum(int(x.size) for x in leaves)})
        reports.append(f'## ratio {ratio} ({c.prune.scope})\n\n```\n{format_report(report)}\n```\n')
        log(f'prune {ratio:.2f} ({c.prune.scope}) | accuracy {ev["accuracy"]:.4f} | loss '
            f'{ev["loss"]:.4f} | pool sparsity {report["fraction"]:.4f}')
    results_io.write_text(job.workdir / 'sparsity_report.md',
                          '# Per-tensor sparsity after pruning\n\n' + '\n'.join(reports))
    return rows


def finetune_pruned(c: Any, workdir: Path) -> list[dict[str, Any]]:
    """Prunes workdir/params.npz at every ratio, fine-tunes each with masks kept, evaluates.

    config.sweep.finetune_steps steps at a constant tenth of the learning rate;
    the pruned weights stay exactly zero (keep_masks in the optimizer state).
    """
    from sparse_vit_jax.pruning import apply_masks
    ft = mlc.ConfigDict(c.to_dict())
    ft.num_steps, ft.schedule.name = c.sweep.finetune_steps, 'constant'
    ft.optimizer.lr, ft.optimizer.accumulate = c.optimizer.lr / 10, 1
    base = Job.create(ft, workdir)
    params = base._params_from(str(workdir / 'params.npz'))
    ratios = parse_ratios(c.prune.ratios)
    all_masks = magnitude_masks(params, ratios, scope=c.prune.scope, select=_prune_select(c))
    job = Job.create(ft, workdir, masks=all_masks[0])  # one compiled step serves every ratio
    step = job.train_step_fn()
    init_opt = jax.jit(job.tx.init, out_shardings=job.shardings.opt_state)
    rows = []
    for ratio, masks in zip(ratios, all_masks):
        pruned = jax.device_put(apply_masks(params, masks), job.shardings.params)
        opt_state = init_opt(pruned)._replace(masks=jax.device_put(
            masks, job.shardings.opt_state.masks))
        state = TrainState(step=jnp.zeros([], jnp.int32), params=pruned, opt_state=opt_state,
                           rng=jax.random.PRNGKey(c.seed + 1))
        batches = job.data.batches(ft.data, ft.model.image_size, c.seed + 1, 0, job.mesh)
        for _ in range(ft.num_steps):
            state, _ = step(state, next(batches))
        report = sparsity_report(to_host(state.params), _prune_select(c))
        ev = job.evaluate(state.params)
        rows.append({'ratio': ratio, **ev, 'pool_sparsity': report['fraction']})
        log(f'prune {ratio:.2f} + {ft.num_steps} fine-tuning steps | accuracy '
            f'{ev["accuracy"]:.4f} | pool sparsity {report["fraction"]:.4f}')
    return rows


def run(c: Any, workdir: str | Path) -> dict[str, Any]:
    """The whole job for a validated config; returns (and writes) the results."""
    validate(c)
    workdir = epath.Path(workdir)  # local or gs://
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f'--workdir {workdir} is a file; choose a directory')
    workdir.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in c.stages.split(',') if s.strip()]
    assert set(stages) <= set(STAGES)
    get_source(c.data)  # fail early on missing data
    job = Job.create(c, workdir)
    out: dict[str, Any] = {'config': json.loads(c.to_json()), 'numerics': job.numerics}
    t0 = time.time()
    if 'train' in stages:
        state, out['train'] = train(job)
        params = state.params
        host_params = to_host(params)  # every process takes part in the gather
        if jax.process_index() == 0:
            save_params(workdir / 'params.npz', host_params)
    else:
        params = job._params_from(c.init_from)
    out['weights'] = weight_stats(to_host(params), _prune_select(c))
    if 'eval' in stages:
        out['eval'] = job.evaluate(params)
        log(f'test accuracy {out["eval"]["accuracy"]:.4f} on {out["eval"]["examples"]} '
            f'examples (loss {out["eval"]["loss"]:.4f})')
    if 'prune' in stages:
        out['prune'] = prune_sweep(job, params)
    out['seconds'] = time.time() - t0
    results_io.write_json(workdir / 'results.json', out)
    rows = ([{'stage': 'eval', 'ratio': 0.0, **out['eval']}] if 'eval' in out else []) + \
        [{'stage': 'prune', **r} for r in out.get('prune', [])]
    results_io.write_csv(workdir / 'results.csv', rows)
    return out
