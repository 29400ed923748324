"""The sweep: table arithmetic from results.csv, resume, plot, and a mock-CIFAR smoke run."""

import csv
import io
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import config_file, pool_keys, tensorboard_scalars
from PIL import Image

from sparse_vit_jax.configs import apply_smoke
from sparse_vit_jax.sweep import run_sweep


def tiny_sweep_config(tmp_path):
    c = config_file('digits')
    c.model.hidden_size, c.model.num_layers, c.model.num_heads, c.model.mlp_dim = 32, 2, 2, 64
    c.num_steps, c.checkpoint_every_steps, c.log_every_steps = 16, 8, 8
    c.schedule.warmup_steps = 3
    c.prune.ratios = (0.2, 0.5, 0.8)
    c.sweep.variants = ('baseline', 'l1_proximal')
    c.sweep.seeds = 2
    c.data.data_dir = str(tmp_path / 'tfds')
    return c


@pytest.fixture(scope='module')
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('sweep')
    run_sweep(tiny_sweep_config(d), d / 'run', 'test')
    return d / 'run'


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the sweep of 4 cells
def test_table_averages_recomputed_from_csv(sweep_dir):
    rows = read_csv(sweep_dir / 'results.csv')
    assert len(rows) == 2 * 2 * 4  # variants x seeds x (unpruned + 3 ratios)
    acc = {}
    for r in rows:
        acc.setdefault((r['variant'], float(r['ratio'])), []).append(float(r['accuracy']))
    md = (sweep_dir / 'results.md').read_text()
    for v in ('l1_proximal',):
        diffs = [100 * (np.mean(acc[(v, q)]) - np.mean(acc[('baseline', q)]))
                 for q in (0.2, 0.5, 0.8)]
        assert f'**{np.mean(diffs):+.3f}**' in md, (v, np.mean(diffs), md)
    line = next(x for x in md.splitlines() if x.startswith('| 0.5 |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    m, s = (float(x) for x in re.findall(r'\d+\.\d+', cells[1])[:2])
    assert m == pytest.approx(100 * np.mean(acc[('baseline', 0.5)]), abs=0.006)
    assert s == pytest.approx(100 * np.std(acc[('baseline', 0.5)]), abs=0.006)
    sparsities = [float(r['pool_sparsity']) for r in rows
                  if r['variant'] == 'baseline' and float(r['ratio']) == 0.8]
    assert all(x == pytest.approx(0.8, abs=1e-4) for x in sparsities)


@pytest.mark.slow  # the sweep of 4 cells
def test_plot_is_png_with_one_curve_per_variant(sweep_dir):
    img = Image.open(io.BytesIO((sweep_dir / 'accuracy_vs_sparsity.png').read_bytes()))
    assert img.format == 'PNG' and img.size[0] > 300
    assert img.info['Description'] == 'curves: baseline, l1_proximal'


@pytest.mark.slow  # the sweep of 4 cells
def test_resume_recomputes_nothing_finished(sweep_dir, tmp_path):
    import shutil
    work = tmp_path / 'copy'
    shutil.copytree(sweep_dir, work)
    cells = sorted((work / 'cells').iterdir())
    before = {c.name: (c / 'results.json').stat().st_mtime_ns for c in cells}
    victim, = (work / 'cells').glob('l1_proximal_seed1_*')
    (victim / 'results.json').unlink()          # interrupted after its last checkpoint
    (work / 'results.csv').unlink()
    c = tiny_sweep_config(sweep_dir.parent)
    run_sweep(c, work, 'test')
    after = {c.name: (c / 'results.json').stat().st_mtime_ns for c in cells}
    assert {k for k in before if before[k] != after[k]} == {victim.name}
    assert read_csv(work / 'results.csv') == read_csv(sweep_dir / 'results.csv')


@pytest.mark.slow
def test_cifar10_config_smoke_on_mock_data(tmp_path):
    c = apply_smoke(config_file('cifar10'))
    c.data.data_dir = str(tmp_path / 'tfds')
    c.sweep.seeds, c.sweep.variants, c.prune.ratios = 1, ('attention',), (0.5,)
    c.sweep.finetune_steps = 2
    with tfds.testing.mock_data(num_examples=256):
        rows = run_sweep(c, tmp_path / 'run', 'test')
    variants = {r['variant'] for r in rows}
    assert variants == {'attention', 'attention+ft'}
    assert all(0 <= r['accuracy'] <= 1 for r in rows)


@pytest.mark.slow
def test_sweep_command_honours_smoke(tmp_path, data_dir):
    """`--config.smoke=True` turns the sweep into a few-step run of the tiny model."""
    from helpers import main_here
    r = main_here(tmp_path / 'run', '--config=configs/digits.py', '--config.smoke=True',
                  '--config.sweep.seeds=1', '--config.sweep.variants=baseline',
                  '--config.prune.ratios=(0.5,)', data_dir=data_dir, module='sweep')
    assert 'training 6 steps' in r.stdout and '| 0.5 |' in r.stdout
    rows = read_csv(tmp_path / 'run' / 'results.csv')
    assert [(x['variant'], float(x['ratio'])) for x in rows] == [('baseline', 0.0),
                                                                 ('baseline', 0.5)]


@pytest.mark.slow  # the sweep of 4 cells
def test_changed_config_recomputes_what_changed(sweep_dir, tmp_path):
    """Other ratios: cells evaluated again, not retrained. Other training steps: new cells."""
    import shutil
    work = tmp_path / 'copy'
    shutil.copytree(sweep_dir, work)
    old_cells = {p.name for p in (work / 'cells').iterdir()}
    c = tiny_sweep_config(sweep_dir.parent)
    c.prune.ratios, c.sweep.seeds = (0.3,), 1
    rows = run_sweep(c, work, 'test')
    assert {p.name for p in (work / 'cells').iterdir()} == old_cells  # same training
    assert sorted({float(r['ratio']) for r in rows}) == [0.0, 0.3]
    ckpts = {p.name for p in (work / 'cells').glob('*/checkpoints/*')}
    assert ckpts == {'8', '16'}  # nothing trained further
    c.num_steps = 8
    rows = run_sweep(c, work, 'test')
    new = {p.name for p in (work / 'cells').iterdir()} - old_cells
    assert len(new) == 2 and len(rows) == 2 * 1 * 2
    for d in new:
        assert {p.name for p in (work / 'cells' / d / 'checkpoints').iterdir()} == {'8'}


@pytest.mark.slow
def test_cell_killed_during_finetuning_is_finished_on_rerun(tmp_path):
    """A cell owes its '+ft' rows: results written without them do not count as done."""
    c = tiny_sweep_config(tmp_path)
    c.sweep.variants, c.sweep.seeds, c.prune.ratios = ('baseline',), 1, (0.5,)
    c.num_steps, c.sweep.finetune_steps = 8, 2
    run_sweep(c, tmp_path / 'run', 'test')
    cell, = (tmp_path / 'run' / 'cells').iterdir()
    r = json.loads((cell / 'results.json').read_text())
    assert len(r['prune_finetuned']) == 1
    del r['prune_finetuned']  # as if killed between training and fine-tuning
    (cell / 'results.json').write_text(json.dumps(r))
    rows = run_sweep(c, tmp_path / 'run', 'test')
    assert {x['variant'] for x in rows} == {'baseline', 'baseline+ft'}


@pytest.mark.slow  # two trainings, each compiled for its own ratio: ~40 s
def test_the_gradual_variant_trains_one_model_per_ratio_pruned_to_it(tmp_path, data_dir):
    """'gradual': a cell per non-zero ratio, each trained to that pool sparsity (counted in
    numpy over its params.npz), giving that ratio's row only; the config's own gradual
    target is refused, before any cell, with the variant to use instead."""
    from sparse_vit_jax.errors import UserError
    c = tiny_sweep_config(tmp_path)
    c.data.data_dir = str(data_dir)
    c.sweep.variants, c.sweep.seeds, c.prune.ratios = ('gradual',), 1, (0.0, 0.5, 0.8)
    c.num_steps, c.sparsity.gradual.every_steps = 8, 3
    rows = run_sweep(c, tmp_path / 'run', 'test')
    cells = {p.name.split('_')[0]: p for p in (tmp_path / 'run' / 'cells').iterdir()}
    assert sorted(cells) == ['gradual0.5', 'gradual0.8']
    assert [(r['ratio'], r['pool_sparsity']) for r in rows if r['variant'] == 'gradual'] == [
        (0.5, pytest.approx(0.5, abs=1e-4)), (0.8, pytest.approx(0.8, abs=1e-4))]
    for ratio in (0.5, 0.8):
        flat = dict(np.load(cells[f'gradual{ratio:g}'] / 'params.npz'))
        w = np.concatenate([flat[k].ravel() for k in pool_keys(flat)])
        np.testing.assert_allclose((w == 0).mean(), ratio, atol=1e-4)
    md = (tmp_path / 'run' / 'results.md').read_text()
    assert '| 0.5 |' in md and '| 0.0 |' not in md  # no unpruned model
    c.sparsity.gradual.sparsity = 0.5
    with pytest.raises(UserError, match='set sweep.variants=baseline,gradual'):
        run_sweep(c, tmp_path / 'other', 'test')
    assert not (tmp_path / 'other').exists()


def test_a_variant_that_conflicts_with_the_config_is_named_before_any_cell(tmp_path):
    """The gradual variant's pruning while training excludes keep_zeros: the refusal names the
    variant (the user set no gradual target), and nothing is written."""
    from sparse_vit_jax.errors import UserError
    c = tiny_sweep_config(tmp_path)
    c.pretrained, c.sparsity.keep_zeros = str(tmp_path / 'pruned.npz'), True
    c.sweep.variants = ('baseline', 'gradual')
    with pytest.raises(UserError, match=r"^sweep variant 'gradual' .*sparsity.keep_zeros and "
                       r'sparsity.gradual.sparsity > 0 both set'):
        run_sweep(c, tmp_path / 'run', 'test')
    assert not (tmp_path / 'run').exists()


def test_sweep_stops_between_cells_on_a_signal(tmp_path, monkeypatch):
    """A stop signal that arrived while a cell finished stops the sweep before the next."""
    from sparse_vit_jax.errors import Stopped
    from sparse_vit_jax.train import signals
    monkeypatch.setattr(signals, '_received', ['SIGTERM'])
    with pytest.raises(Stopped, match='stopped by SIGTERM between sweep cells'):
        run_sweep(tiny_sweep_config(tmp_path), tmp_path / 'run', 'test')
    assert not (tmp_path / 'run' / 'cells').exists()


@pytest.mark.slow  # two sweeps: ~45 s
def test_evaluations_during_masked_finetuning_match_a_shorter_finetuning(tmp_path, capsys):
    """eval_every_steps=2 with 4 fine-tuning steps logs one evaluation, at step 2, equal to the
    row of the same cell fine-tuned for 2 steps (a constant learning rate, the same batches and
    dropout keys: the same weights), in the log and in the fine-tuning's tensorboard events.
    That evaluations leave training alone is tested on the same loop in test_train.py."""
    c = tiny_sweep_config(tmp_path)
    c.sweep.variants, c.sweep.seeds, c.prune.ratios = ('baseline',), 1, (0.5,)
    c.num_steps, c.sweep.finetune_steps = 8, 2

    def ft_row(c):
        rows = run_sweep(c, tmp_path / 'run', 'test')  # trains once, then re-runs fine-tuning
        row, = [r for r in rows if r['variant'] == 'baseline+ft']
        return row

    two = ft_row(c)
    capsys.readouterr()
    c.sweep.finetune_steps, c.eval_every_steps = 4, 2
    ft_row(c)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith('eval at step')]
    assert len(lines) == 1 and lines[0].startswith('eval at step 2/4 | '), lines
    logged = dict(kv.rsplit(' ', 1) for kv in lines[0].split(' | ')[1:])
    assert set(logged) == {'accuracy', 'top5_accuracy', 'loss'}
    for k, v in logged.items():
        assert float(v) == pytest.approx(float(two[k]), abs=6e-5), k  # printed to 4 decimals
    # each fine-tuning (2 steps, 4 steps) in its own directory
    short, long = sorted((tensorboard_scalars(board) for board in
                          (tmp_path / 'run' / 'cells').glob('*/tensorboard/finetune_0.5_*')),
                         key=len)
    assert (2, 'loss') in short and not any(t.startswith('eval/') for _, t in short)
    assert (4, 'loss') in long and max(s for s, _ in long) == 4
    for k in logged:
        assert long[(2, f'eval/{k}')] == pytest.approx(float(two[k]), rel=1e-6), k


@pytest.mark.slow  # three sweeps (stopped, resumed, whole): ~26 s
def test_a_signal_during_masked_finetuning_stops_at_the_next_step_and_resumes(tmp_path,
                                                                            monkeypatch):
    """A stop signal while a pruned model is fine-tuned stops it after its next step, not after
    all of them, with one line and a checkpoint; the cell is not done, and the re-run keeps the
    ratios whose fine-tuning had finished and resumes the other at its checkpoint, to the
    rows of a run never stopped."""
    from sparse_vit_jax import sweep
    from sparse_vit_jax.errors import Stopped
    from sparse_vit_jax.train import signals
    c = tiny_sweep_config(tmp_path)
    c.sweep.variants, c.sweep.seeds, c.prune.ratios = ('baseline',), 1, (0.2, 0.5)
    c.num_steps, c.sweep.finetune_steps = 8, 6
    monkeypatch.setattr(signals, '_received', [])
    said = []

    def log(msg):
        said.append(msg)
        if msg.startswith('fine-tuning the model pruned at 0.50'):
            signals._received.append('SIGTERM')  # as the handler records it

    monkeypatch.setattr(sweep, 'log', log)
    with pytest.raises(Stopped) as stopped:
        run_sweep(c, tmp_path / 'run', 'test')
    assert str(stopped.value) == ('stopped by SIGTERM at step 1; checkpoint saved, re-run the '
                                  'same command to resume')
    cell, = (tmp_path / 'run' / 'cells').iterdir()
    assert not (cell / 'results.json').exists()
    first, = json.loads((cell / 'finetuned.json').read_text())['rows']
    assert first['ratio'] == 0.2
    resumable, = (cell / 'finetune').iterdir()  # 0.2's checkpoints went with its row
    assert resumable.name.startswith('0.5_')
    assert [p.name for p in (resumable / 'checkpoints').iterdir()] == ['1']
    signals._received.clear()
    said.clear()
    monkeypatch.setattr(sweep, 'log', said.append)  # no signal this time
    rows = run_sweep(c, tmp_path / 'run', 'test')
    assert [m for m in said if m.startswith('fine-tuning')] == [
        'fine-tuning the model pruned at 0.50 for 6 steps, masks kept (from step 1)']
    assert not any((cell / 'finetune').iterdir())
    ft = [r for r in rows if r['variant'] == 'baseline+ft']
    assert [r['ratio'] for r in ft] == [0.2, 0.5]
    assert json.loads((cell / 'results.json').read_text())['prune_finetuned'][0] == first
    # each ratio is fine-tuned from its own pruned weights: the same rows as a run not stopped
    assert [r for r in run_sweep(c, tmp_path / 'whole', 'test')
            if r['variant'] == 'baseline+ft'] == ft


def test_a_damaged_cell_file_is_said_and_computed_again(tmp_path, monkeypatch):
    from sparse_vit_jax import sweep
    said = []
    monkeypatch.setattr(sweep, 'log', said.append)
    path = tmp_path / 'results.json'
    path.write_text('{"cell_config": {"seed": ')  # cut short
    assert sweep._finished(path, tiny_sweep_config(tmp_path)) is None
    assert said == [f'{path} is damaged (Expecting value: line 1 column 26 (char 25)); '
                    'computing what it held again']


def test_table_rows_keep_each_ratio_and_say_diff_only_beside_a_baseline():
    """Ratios that one decimal would merge (0.25 and 0.3 both read '0.3') keep their digits;
    without a baseline column the table promises no diff."""
    from sparse_vit_jax.sweep import markdown
    rows = [{'variant': v, 'seed': 0, 'ratio': q, 'accuracy': a}
            for v, a in (('baseline', 0.5), ('attention', 0.75)) for q in (0.0, 0.25, 0.3)]
    md = markdown(rows, {}, 'cmd').splitlines()
    assert [x.split(' | ')[0] for x in md if x.startswith('| 0')] == ['| 0.0', '| 0.25', '| 0.3']
    assert '| 0.25 | 50.00 +- 0.00 | 75.00 +- 0.00 | +25.00 |' in md
    alone = markdown([r for r in rows if r['variant'] == 'attention'], {}, 'cmd')
    assert 'diff' not in alone and 'mean +- std over seeds. Ratio 0 is' in alone


def test_nm_rows_are_table_rows_of_their_own_outside_the_average_and_the_plot():
    from sparse_vit_jax.sweep import collect_rows, markdown, plot
    cell = {'eval': {'accuracy': 0.9, 'loss': 0.1}, 'weights': {'zero': 0.0},
            'prune': [{'ratio': 0.5, 'accuracy': 0.8, 'total_params': 10}],
            'prune_nm': [{'pattern': '2:4', 'ratio': 0.5, 'accuracy': 0.6}]}
    other = {**cell, 'prune': [{'ratio': 0.5, 'accuracy': 0.7, 'total_params': 10}],
             'prune_nm': [{'pattern': '2:4', 'ratio': 0.5, 'accuracy': 0.9}]}
    rows = collect_rows([('baseline', 0, cell), ('attention', 0, other)])
    assert [(r['variant'], r['ratio'], r.get('pattern')) for r in rows] == [
        ('baseline', 0.0, None), ('baseline', 0.5, None), ('baseline', 0.5, '2:4'),
        ('attention', 0.0, None), ('attention', 0.5, None), ('attention', 0.5, '2:4')]
    md = markdown(rows, {}, 'cmd').splitlines()
    assert '| 0.5 | 80.00 +- 0.00 | 70.00 +- 0.00 | -10.00 |' in md
    assert '| 2:4 | 60.00 +- 0.00 | 90.00 +- 0.00 | +30.00 |' in md
    assert '| **average diff over pruned ratios** |  |  | **-10.000** |' in md  # not N:M's
    assert b'curves: baseline, attention' in plot(rows)
