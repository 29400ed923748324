"""The paper's experiment in one command: regularise, prune at every ratio, compare.

    python -m sparse_vit_jax.sweep --config=configs/digits.py --workdir=runs/sweep

For each seed, every variant (baseline; the paper's attention penalty; L1
subgradient; L1 proximal) is fine-tuned from the same initial weights with the
same data order, pruned by global magnitude at every ratio of
config.prune.ratios (each from its own unpruned weights) and evaluated on the
whole test split; with config.sweep.finetune_steps > 0 each pruned model is also
fine-tuned with its masks kept (reported as '<variant>+ft'). The 'gradual'
variant (not in the default list) trains one model per ratio instead, pruned
while training to that ratio (config.sparsity.gradual's schedule). Writes
results.csv, results.md (the paper's table with mean +- std over seeds) and
accuracy_vs_sparsity.png. Each (variant, seed) cell lives in
cells/<variant>_seed<seed>_<fingerprint of its training settings>/ and resumes
from its checkpoints; a cell finished for the same config is read, not
recomputed; a cell whose evaluation settings changed (ratios, fine-tuning) is
evaluated again without retraining.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from etils import epath

from sparse_vit_jax import cli
from sparse_vit_jax.configs import (
    SWEEP_VARIANTS,
    copy,
    fingerprint,
    training_fingerprint,
    training_keys,
)
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.multihost import from_process0, on_process0
from sparse_vit_jax.train.loop import log
from sparse_vit_jax.train.workdir import SHARED, check_workdir


def _attention(c: Any) -> None:
    c.sparsity.attention.weight = c.sweep.attention_weight
    c.sparsity.attention.layers = c.sweep.attention_layers


def _l1(mode: str) -> Callable[[Any], None]:
    def apply(c: Any) -> None:
        c.sparsity.l1.mode = mode
        c.sparsity.l1.weight = c.sweep.l1_proximal_weight if mode == 'proximal' else \
            c.sweep.l1_weight
    return apply


def _gradual(c: Any) -> None:
    """Pruned while training to the cell's one ratio; its prune stage evaluates that ratio."""
    ratio, = c.prune.ratios
    c.sparsity.gradual.sparsity = ratio
    c.sweep.finetune_steps = 0  # its masks were kept while it trained
    c.prune.nm = ''  # N:M from a model already pruned to its ratio compares with nothing


VARIANTS: dict[str, Callable[[Any], None]] = {
    'baseline': lambda c: None,
    'attention': _attention,
    'l1_subgradient': _l1('subgradient'),
    'l1_proximal': _l1('proximal'),
    'gradual': _gradual,
}
assert tuple(VARIANTS) == SWEEP_VARIANTS  # the schema's list, validated before any compute


def cells_of(c: Any, variant: str) -> list[tuple[str, float | None]]:
    """(cell name prefix, its ratio) for each model a variant trains per seed: one for the
    regularisers (every ratio pruned from it: ratio None), one per non-zero ratio for
    'gradual'."""
    if variant != 'gradual':
        return [(variant, None)]
    return [(f'gradual{r:g}', r) for r in c.prune.ratios if r > 0]


def cell_config(c: Any, variant: str, seed: int, ratio: float | None = None
                ) -> mlc.ConfigDict:
    cell = copy(c)
    cell.seed = seed
    cell.stages = ('train', 'eval', 'prune')
    cell.sparsity.attention.weight = 0.0
    cell.sparsity.l1.weight = 0.0
    if ratio is not None:
        cell.prune.ratios = (ratio,)
    VARIANTS[variant](cell)
    return cell


def cell_dir(root: epath.Path, cfg: Any, name: str) -> epath.Path:
    """cells/<name>_seed<seed>_<fingerprint of the training settings>: a changed training
    config is a new cell, trained from scratch; the old one stays as it was."""
    return root / 'cells' / f'{name}_seed{cfg.seed}_{training_fingerprint(cfg)}'


def _written_for(path: epath.Path, cfg: Any) -> dict[str, Any] | None:
    """What the JSON file `path` holds if it was written for exactly this cell config (its
    'cell_config'); None if it is missing, for another config (other ratios, fine-tuning
    steps...: evaluated again, not retrained) or damaged (said; then computed again)."""
    if not path.exists():
        return None
    try:
        r = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log(f'{path} is damaged ({e}); computing what it held again')
        return None
    return r if isinstance(r, dict) and r.get('cell_config') == json.loads(cfg.to_json()) \
        else None


def _not_shared(path: epath.Path) -> UserError:
    return UserError(f'process {jax.process_index()} cannot read {path}, which process 0 '
                     f'reads; {SHARED}')


def _finished(path: epath.Path, cfg: Any) -> dict[str, Any] | None:
    """The cell's results if they were written for exactly this config, with all it owes."""
    r = _written_for(path, cfg)
    if r is None or (cfg.sweep.finetune_steps > 0 and 'prune_finetuned' not in r):
        return None
    return r


def run_cell(cfg: Any, workdir: epath.Path) -> dict[str, Any]:
    """One (variant, seed): read if finished for this config, else train (resuming) and prune.

    results.json is written once, when everything the cell owes (fine-tuning included) is
    done; a cell killed before that resumes from its checkpoints.
    """
    from sparse_vit_jax.experiment import Experiment, stages
    from sparse_vit_jax.train import results as results_io
    from sparse_vit_jax.train.workdir import WorkdirLock
    done = workdir / 'results.json'
    r = _finished(done, cfg)
    if from_process0(r is not None):  # every process reads the cell, or every one runs it
        if r is None:
            raise _not_shared(done)
        return r
    exp = Experiment.create(cfg, workdir)
    with WorkdirLock(workdir):
        out = stages(exp, cfg, workdir, write=False)
        if cfg.sweep.finetune_steps > 0:
            out['prune_finetuned'] = finetune_pruned(cfg, workdir, exp)
        out['cell_config'] = json.loads(cfg.to_json())
        results_io.write_json(done, out)
    return out


def finetune_pruned(c: Any, workdir: epath.Path, exp: Any) -> list[dict[str, Any]]:
    """Prunes the cell's trained params at every ratio, fine-tunes each with masks kept.

    config.sweep.finetune_steps steps at a constant tenth of the learning rate, through the
    engine's loop (progress, a NaN loss and a stop signal end it with one line); the pruned
    weights stay exactly zero (keep_masks in the optimizer state). A ratio's fine-tuning is
    checkpointed at the run's cadence in finetune/<ratio>_<fingerprint>/ (a stopped cell
    resumes it at its last checkpoint); when it is done, its row goes into the cell's
    finetuned.json and those checkpoints are removed. Its metrics go to the cell's
    tensorboard/finetune_<ratio>_<fingerprint>/; config.eval_every_steps evaluates during
    fine-tuning too.
    """
    from clu import metric_writers  # imports TensorFlow, which the data needs anyway

    from sparse_vit_jax.data import TrainData
    from sparse_vit_jax.experiment import MEMORY_ADVICE, train_parts
    from sparse_vit_jax.optimizer import build_optimizer
    from sparse_vit_jax.pruning import apply_masks, magnitude_masks, ratio_text, sparsity_report
    from sparse_vit_jax.train import results as results_io
    from sparse_vit_jax.train.checkpointing import Checkpointer
    from sparse_vit_jax.train.loop import LoopConfig, train_loop
    from sparse_vit_jax.train.sharding import to_host
    from sparse_vit_jax.train.state import create_state, with_shardings

    ft = copy(c)
    ft.num_steps, ft.schedule.name = c.sweep.finetune_steps, 'constant'
    ft.optimizer.lr, ft.optimizer.accumulate = c.optimizer.lr / 10, 1
    ft.sparsity.gradual.sparsity = 0.0  # each ratio's masks are fixed (keep_masks)
    ft.sparsity.keep_zeros = False
    params = exp.load_params(str(workdir / 'params.npz'))
    include = list(c.prune.include) or None
    all_masks = magnitude_masks(params, list(c.prune.ratios), scope=c.prune.scope,
                                select=include)
    tx = build_optimizer(ft, ft.num_steps, all_masks[0])  # one compiled step serves every ratio
    parts = train_parts(ft, exp.model, exp.mesh, ft.num_steps, tx)
    shardings, step = parts.shardings, parts.step
    data = TrainData.create(ft.data, ft.batch_size, exp.mesh, source=exp.source)
    loop = LoopConfig(ft.num_steps, ft.log_every_steps, ft.batch_size,
                      memory_advice=MEMORY_ADVICE, eval_every=ft.eval_every_steps,
                      eval_name=exp.during_name)
    kept = workdir / 'finetuned.json'
    rows = _finetuned(kept, c)
    target = with_shardings(parts.abstract, shardings)
    for ratio, masks in list(zip(c.prune.ratios, all_masks))[len(rows):]:
        where = workdir / 'finetune' / f'{ratio:g}_{finetune_fingerprint(ft, ratio)}'
        ckpt = Checkpointer(where, every_steps=c.checkpoint_every_steps, keep=1,
                            timeout_s=c.checkpoint_timeout_s)
        try:
            restored = ckpt.restore_latest(target)
            if restored is not None:
                state = restored[0]
            else:  # copies: the step donates its state, every ratio starts from `params`
                # (whose unpruned leaves apply_masks passes on), tx's init read all_masks[0]
                state = create_state(parts.init_params, tx, c.seed + 1, shardings,
                                     jax.device_put(apply_masks(params, masks),
                                                    shardings.params, may_alias=False))
                state = state.replace(opt_state=state.opt_state._replace(masks=jax.device_put(
                    masks, shardings.opt_state.masks, may_alias=False)))
            step0 = int(state.step)
            log(f'fine-tuning the model pruned at {ratio_text(ratio)} for {ft.num_steps} steps, '
                f'masks kept' + (f' (from step {step0})' if step0 else ''))
            batches = data.batches(ft.data, ft.model.image_size, c.seed + 1, step0, exp.mesh)
            writer = metric_writers.create_default_writer(
                str(workdir / 'tensorboard' / f'finetune_{where.name}'),
                just_logging=jax.process_index() > 0)
            try:
                state, _ = train_loop(state, step, batches, loop, ckpt, writer,
                                      evaluate=exp.evaluate_during)
            finally:
                batches.close()
                writer.close()
        finally:
            ckpt.close()
        report = sparsity_report(to_host(state.params), include)
        ev = exp.evaluate(state.params)
        rows.append({'ratio': ratio, **ev, 'pool_sparsity': report['fraction']})
        log(f'prune {ratio_text(ratio)} + {ft.num_steps} fine-tuning steps | accuracy '
            f'{ev["accuracy"]:.4f} | pool sparsity {report["fraction"]:.4f}')
        results_io.write_json(kept, {'cell_config': json.loads(c.to_json()), 'rows': rows})
        on_process0(where.rmtree)  # its row is kept: the state served only to resume it
    return rows


def finetune_fingerprint(ft: Any, ratio: float) -> str:
    """What a ratio's fine-tuning depends on besides the cell's trained weights: its training
    settings and the masks' (ratio, scope, pool). Checkpoints under another fingerprint are
    never resumed."""
    keys = {'train': training_keys(ft), 'ratio': ratio, 'scope': ft.prune.scope,
            'include': list(ft.prune.include)}
    return fingerprint(keys)


def _finetuned(path: epath.Path, cfg: Any) -> list[dict[str, Any]]:
    """The rows of the ratios that a stopped run of this cell (same config) finished
    fine-tuning, in ratio order, as process 0 reads them."""
    r = _written_for(path, cfg)
    rows = r['rows'] if r is not None else []
    n = from_process0(len(rows))
    if len(rows) < n:
        raise _not_shared(path)
    return rows[:n]


def collect_rows(cells: list[tuple[str, int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (variant, seed, ratio) from each cell's (variant, seed, results); a
    'gradual' cell gives only its own ratio's row (its unpruned model is already that
    sparse)."""
    rows = []
    for variant, seed, r in cells:
        if variant == 'gradual':
            rows += [{'variant': 'gradual', 'seed': seed, **_cell(p)} for p in r['prune']]
            continue
        total = r['prune'][0]['total_params'] if r.get('prune') else None
        rows.append({'variant': variant, 'seed': seed, 'ratio': 0.0, **_cell(r['eval']),
                     'pool_sparsity': r['weights']['zero'], 'nonzero_params': None,
                     'total_params': total})
        for p in r.get('prune', []):
            rows.append({'variant': variant, 'seed': seed, **_cell(p)})
        for p in r.get('prune_nm', []):
            rows.append({'variant': variant, 'seed': seed, **_cell(p), 'pattern': p['pattern']})
        for p in r.get('prune_finetuned', []):
            rows.append({'variant': f'{variant}+ft', 'seed': seed, **_cell(p)})
    return rows


def _cell(r: dict[str, Any]) -> dict[str, Any]:
    keys = ('ratio', 'accuracy', 'top5_accuracy', 'loss', 'pool_sparsity', 'nonzero_params',
            'total_params')
    return {k: r[k] for k in keys if k in r}


def summarize(rows: list[dict[str, Any]]
              ) -> dict[str, dict[float | str, tuple[float, float, int]]]:
    """{variant: {ratio, or N:M pattern: (mean accuracy, std over seeds, seeds)}}."""
    acc: dict[str, dict[float | str, list[float]]] = {}
    for r in rows:
        key = r.get('pattern') or float(r['ratio'])
        acc.setdefault(r['variant'], {}).setdefault(key, []).append(r['accuracy'])
    return {v: {k: (float(np.mean(a)), float(np.std(a)), len(a)) for k, a in d.items()}
            for v, d in acc.items()}


def markdown(rows: list[dict[str, Any]], weights: dict[str, list[dict[str, float]]],
             command: str) -> str:
    s = summarize(rows)
    variants = list(s)
    base = 'baseline' if 'baseline' in s else None
    others = [v for v in variants if v != base]
    ratios: list[float | str] = sorted({float(r['ratio']) for r in rows if not r.get('pattern')})
    ratios += list(dict.fromkeys(r['pattern'] for r in rows if r.get('pattern')))
    head = ['ratio'] + ([f'{base} (prune only)'] if base else [])
    for v in others:
        head += [v, 'diff'] if base else [v]
    lines = [f'Command: `{command}`', '',
             'Top-1 test accuracy (%), mean +- std over seeds' + (
                 '; diff = variant - baseline (percentage points)' if base else '') +
             '. Ratio 0 is the unpruned model' + (
                 '; n:m, N:M pruning of the same model (n kept in every m inputs)'
                 if any(r.get('pattern') for r in rows) else '') + '.' + (
                 ' gradual: one model per ratio, pruned while training to that ratio (no '
                 'unpruned model).' if 'gradual' in s else ''), '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    fmt = lambda m: f'{100 * m[0]:.2f} +- {100 * m[1]:.2f}'  # noqa: E731
    diffs: dict[str, list[float]] = {v: [] for v in others}
    for ratio in ratios:
        cells = [ratio if isinstance(ratio, str) else  # an N:M pattern
                 f'{ratio:.1f}' if round(ratio, 1) == ratio else f'{ratio:g}']  # 0.25 stays
        cells += [fmt(s[base][ratio])] if base else []
        for v in others:
            if ratio not in s[v]:
                cells += ['', ''] if base else ['']
                continue
            cells.append(fmt(s[v][ratio]))
            if base:
                d = 100 * (s[v][ratio][0] - s[base][ratio][0])
                cells.append(f'{d:+.2f}')
                if not isinstance(ratio, str) and ratio > 0:
                    diffs[v].append(d)
        lines.append('| ' + ' | '.join(cells) + ' |')
    if base:
        avg = ['**average diff over pruned ratios**', '']
        for v in others:
            avg += ['', f'**{np.mean(diffs[v]):+.3f}**' if diffs[v] else '']
        lines.append('| ' + ' | '.join(avg) + ' |')
    lines += ['', 'Weight magnitudes over the pruning pool after training (mean over seeds):', '',
              '| variant | exact zeros | abs(w) < 1e-3 | abs(w) < 1e-2 | median abs(w) |',
              '|---|---|---|---|---|']
    for v, ws in weights.items():
        m = {k: float(np.mean([w[k] for w in ws])) for k in ('zero', 'below_1e-3', 'below_1e-2',
                                                             'median')}
        lines.append(f'| {v} | {100 * m["zero"]:.2f}% | {100 * m["below_1e-3"]:.2f}% | '
                     f'{100 * m["below_1e-2"]:.2f}% | {m["median"]:.4f} |')
    return '\n'.join(lines) + '\n'


def plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    curves = summarize(rows)
    for v, d in curves.items():
        ratios = sorted(r for r in d if not isinstance(r, str))  # N:M patterns: the table
        m = np.array([d[r][0] for r in ratios]) * 100
        sd = np.array([d[r][1] for r in ratios]) * 100
        line, = ax.plot(ratios, m, marker='o', ms=3, label=v,
                        linestyle='--' if v.endswith('+ft') else '-')
        ax.fill_between(ratios, m - sd, m + sd, alpha=0.2, color=line.get_color())
    ax.set_xlabel('global magnitude pruning ratio (fraction of the pool zeroed)')
    ax.set_ylabel('top-1 test accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format='png', metadata={'Description': 'curves: ' + ', '.join(curves)})
    plt.close(fig)
    return buf.getvalue()


def run_sweep(c: Any, workdir: Any, command: str = '') -> list[dict[str, Any]]:
    from sparse_vit_jax.configs import validate
    from sparse_vit_jax.train import results as results_io
    validate(c)
    if c.sparsity.gradual.sparsity > 0:
        raise UserError('config sparsity.gradual.sparsity is one target for one run; the sweep '
                        'prunes while training to each ratio in its \'gradual\' variant: set '
                        'sweep.variants=baseline,gradual (any of them) and leave it 0')
    plan = [(v, name, cell_config(c, v, c.seed + i, ratio)) for i in range(c.sweep.seeds)
            for v in c.sweep.variants for name, ratio in cells_of(c, v)]
    for v, _, cfg in plan:  # every cell's config, before any compute
        try:
            validate(cfg)
        except UserError as e:  # what the variant set, with the user's settings
            raise UserError(f'sweep variant {v!r} (its settings with the config\'s): {e}') from None
    workdir = check_workdir(workdir)  # local or gs://
    cells, weights = [], {}
    from sparse_vit_jax.train import signals
    for v, name, cfg in plan:
        signals.check('between sweep cells (finished cells are kept)')
        r = run_cell(cfg, cell_dir(workdir, cfg, name))
        cells.append((v, cfg.seed, r))
        if v != 'gradual':  # not a gradual cell, whose weights are as sparse as its ratio
            weights.setdefault(v, []).append(r['weights'])
        log(f'[sweep] {name} seed {cfg.seed}: accuracy {r["eval"]["accuracy"]:.4f}')
    rows = collect_rows(cells)
    results_io.write_csv(workdir / 'results.csv', rows)
    results_io.write_text(workdir / 'results.md', markdown(rows, weights, command))
    results_io.write_bytes(workdir / 'accuracy_vs_sparsity.png', plot(rows))
    return rows


def job(config: Any, workdir: str, command: str) -> None:
    run_sweep(config, workdir, command)
    if jax.process_index() == 0:  # its writer: the other hosts may not see the file yet
        print((epath.Path(workdir) / 'results.md').read_text())


def main() -> None:
    cli.main(job, __doc__)


if __name__ == '__main__':
    main()
