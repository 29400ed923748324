"""The engine and the main command end to end (in this process unless a process boundary or
another device count is the point)."""

import contextlib
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import metrics
from helpers import (
    ROOT,
    SMOKE,
    FakeDevice,
    config_file,
    main_here,
    needs_torch,
    params,
    pool_keys,
    results,
    run_main,
    tensorboard_scalars,
    torch,
)

from sparse_vit_jax.configs import apply_smoke, base_config, from_saved, validate
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.schedules import onecycle


@pytest.fixture(scope='module')
def run8(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp('run8')
    main_here(wd, *SMOKE, data_dir=data_dir)
    return wd


def test_outputs_written(run8):
    r = results(run8)
    assert (run8 / 'results.csv').read_text().startswith('stage,ratio,accuracy')
    assert r['eval']['examples'] == 360
    assert r['prune'][0]['pool_sparsity'] == pytest.approx(0.5, abs=1e-4)
    assert list((run8 / 'tensorboard').iterdir())
    assert {p.name for p in (run8 / 'checkpoints').iterdir()} == {'4', '8'}
    assert r['train']['steps'] == 8 and np.isfinite(r['train']['loss'])


@pytest.mark.slow
def test_training_lowers_loss(tmp_path, data_dir):
    out = main_here(tmp_path, *SMOKE, '--config.num_steps=120', '--config.log_every_steps=30',
                    '--config.checkpoint_every_steps=60', '--config.schedule.warmup_steps=5',
                    '--config.stages=train', data_dir=data_dir).stdout
    losses = [float(line.split('loss ')[1].split()[0]) for line in out.splitlines()
              if line.startswith('step ')]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


@pytest.mark.slow
def test_one_device_and_fsdp_match_eight(tmp_path, run8, data_dir):
    ref = params(run8)
    run_main(tmp_path / 'dp1', *SMOKE, devices=1, data_dir=data_dir)
    main_here(tmp_path / 'fsdp8', *SMOKE, '--config.mesh.fsdp=True', data_dir=data_dir)
    for name in ('dp1', 'fsdp8'):
        got = params(tmp_path / name)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, atol=2e-5, rtol=1e-4, err_msg=f'{name} {k}')


def test_resume_is_bit_identical(tmp_path, run8, data_dir):
    wd = tmp_path / 'resume'
    shutil.copytree(run8 / 'checkpoints', wd / 'checkpoints')
    shutil.rmtree(wd / 'checkpoints' / '8')  # as if killed after the step-4 checkpoint
    out = main_here(wd, *SMOKE, data_dir=data_dir).stdout
    assert 'resuming from' in out and 'at step 4' in out
    ref, got = params(run8), params(wd)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_rerun_of_a_finished_run_keeps_its_training_metrics(tmp_path, run8, data_dir):
    wd = tmp_path / 'again'
    shutil.copytree(run8, wd)
    main_here(wd, *SMOKE, data_dir=data_dir)
    a, b = results(run8)['train'], results(wd)['train']
    assert b['loss'] == a['loss'] and b['resumed_from'] == 8


@pytest.mark.slow
def test_eval_and_prune_in_another_process_without_the_training_split(tmp_path, run8,
                                                                        data_dir):
    """A finished run is evaluated on 1 device after its training split is deleted."""
    data = tmp_path / 'tfds'
    shutil.copytree(data_dir, data)
    train_files = [p for p in data.rglob('*train*') if p.is_file()]
    assert train_files
    for p in train_files:
        p.unlink()
    wd, cache = tmp_path / 'eval', tmp_path / 'xla'
    run_main(wd, *SMOKE, f'--config.init_from={run8}', '--config.stages=eval,prune',
             f'--config.compile_cache={cache}', devices=1, data_dir=data)
    assert len(list(cache.iterdir())) >= 2  # the eval step and more, kept for the next run
    a, b = results(run8), results(wd)
    assert b['eval']['accuracy'] == a['eval']['accuracy']
    assert b['prune'][0]['accuracy'] == a['prune'][0]['accuracy']
    r = run_main(tmp_path / 'needs_train', *SMOKE, devices=1, data_dir=data, check=False)
    assert r.returncode == 2 and 'error: ' in r.stderr  # training does need it


def numpy_top_k(workdir, data_dir, k):
    """Top-k accuracy of a run's params.npz by hand: the model's logits for the whole test
    split in one batch, then the label among the k largest of each row (numpy's sort)."""
    from sparse_vit_jax.checkpoints import unflatten
    from sparse_vit_jax.data import eval_batches
    from sparse_vit_jax.experiment import build_model
    from sparse_vit_jax.train.sharding import make_mesh
    c = from_saved(results(workdir)['config'])
    c.data.data_dir = str(data_dir)
    (batch,), n = eval_batches(c.data, c.model.image_size, 10 ** 6, make_mesh())
    assert n == 360 and np.asarray(batch['mask']).all()
    model = build_model(c, 10, 'jax')
    logits = np.asarray(model.apply({'params': unflatten(params(workdir))}, batch['image']))
    top = np.argsort(-logits, axis=1, kind='stable')[:, :k]
    return float(np.mean([y in row for y, row in zip(np.asarray(batch['label']), top)]))


def test_init_from_npz_and_odd_eval_batch(tmp_path, run8, data_dir):
    """Eval batches of 16 on 8 devices: 8 padded examples, counted in neither accuracy."""
    wd = tmp_path / 'eval_npz'
    main_here(wd, *SMOKE, f'--config.init_from={run8 / "params.npz"}', '--config.stages=eval',
              '--config.eval_batch_size=13', data_dir=data_dir)
    ev, ref = results(wd)['eval'], results(run8)['eval']
    assert ev['accuracy'] == ref['accuracy'] and ev['examples'] == 360
    top5 = numpy_top_k(run8, data_dir, 5)
    assert ev['top5_accuracy'] == pytest.approx(top5, abs=1e-6)
    assert ref['top5_accuracy'] == pytest.approx(top5, abs=1e-6)
    assert numpy_top_k(run8, data_dir, 1) == pytest.approx(ref['accuracy'], abs=1e-6)
    assert ev['accuracy'] < top5 < 1  # a smoke model: neither bound reached


def numpy_nm(flat, n, m):
    """N:M by hand: in each group of m consecutive inputs of each pool kernel, the n largest
    |w| stay (inputs: a q/k/v kernel's first axis, every other kernel's leading axes)."""
    out = dict(flat)
    for k in pool_keys(flat):
        w = flat[k]
        if w.ndim < 2:  # LayerNorm scales: N:M prunes kernels only
            continue
        k_in = 1 if k.split('/')[-2] in ('query', 'key', 'value') else w.ndim - 1
        g = w.reshape(-1, m, int(np.prod(w.shape[k_in:])))
        rank = np.argsort(np.argsort(-np.abs(g), axis=1, kind='stable'), axis=1, kind='stable')
        out[k] = np.where(rank < n, g, 0).reshape(w.shape)
    return out


def test_nm_patterns_are_evaluated_as_numpy_prunes_them(tmp_path, run8, data_dir):
    wd = tmp_path / 'nm'
    main_here(wd, *SMOKE, f'--config.init_from={run8}', '--config.stages=prune',
              '--config.prune.nm=2:4,1:4', data_dir=data_dir)
    r, dense = results(wd), params(run8)
    assert r['prune'] == results(run8)['prune']  # the ratios' rows are as they were
    assert [(x['pattern'], x['ratio']) for x in r['prune_nm']] == [('2:4', 0.5), ('1:4', 0.75)]
    for row, (n, m) in zip(r['prune_nm'], ((2, 4), (1, 4))):
        ref = numpy_nm(dense, n, m)
        assert row['nonzero_params'] == sum(int(np.count_nonzero(v)) for v in ref.values())
        assert row['pool_sparsity'] == pytest.approx(1 - n / m, abs=1e-9)
    # the 2:4 row's accuracy is the evaluation of the weights numpy pruned
    np.savez(tmp_path / 'nm24.npz', **numpy_nm(dense, 2, 4))
    ev = tmp_path / 'nm24'
    main_here(ev, *SMOKE, f'--config.init_from={tmp_path / "nm24.npz"}', '--config.stages=eval',
              data_dir=data_dir)
    assert results(ev)['eval']['accuracy'] == r['prune_nm'][0]['accuracy']
    assert results(ev)['eval']['loss'] == pytest.approx(r['prune_nm'][0]['loss'], abs=1e-6)
    csv = (wd / 'results.csv').read_text().splitlines()
    assert csv[0].endswith(',pattern') and csv[-1].startswith('prune_nm,0.75,')
    assert '## N:M 2:4' in (wd / 'sparsity_report.md').read_text()


def test_a_run_of_another_model_is_refused_naming_the_first_difference(tmp_path, run8,
                                                                       data_dir):
    """init_from a run whose model is not the config's: one line that names the first
    parameter whose shape differs, read from the checkpoint's metadata."""
    r = main_here(tmp_path / 'other', *SMOKE, '--config.model.hidden_size=64',
                  f'--config.init_from={run8}', '--config.stages=eval', data_dir=data_dir,
                  check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(
        'holds a different model than the config asks for: Transformer/encoder_norm/bias has '
        "shape (32,) there, shape (64,) in the config's model"), r.stderr[-2000:]
    assert not (tmp_path / 'other' / 'results.json').exists()


@pytest.mark.slow  # five runs of the main command
def test_a_structured_export_is_evaluated_fine_tuned_and_resumed_at_its_own_widths(
        tmp_path, run8, data_dir):
    """`export --structured` writes per-block widths; the main command builds that smaller
    model from the weights' shapes (no config change), evaluates it as the dense model with
    the zeros kept (the reference), fine-tunes it, and resumes it from its checkpoints'
    widths after the weights file is gone."""
    from sparse_vit_jax import export as export_cli
    flat = params(run8)  # testing ViT: 2 blocks of 2 heads and 64 MLP units
    for b, units in ((0, slice(0, 20)), (1, slice(10, 40))):  # per block: 20 and 30 units
        p = f'Transformer/encoderblock_{b}/MlpBlock_0/'
        flat[p + 'Dense_0/kernel'][:, units] = 0
        flat[p + 'Dense_1/kernel'][units] = 0  # their biases stay: removal must drop them
    att = 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/'
    for k in ('query', 'key', 'value'):
        flat[att + k + '/kernel'][:, 0] = 0
    flat[att + 'out/kernel'][0] = 0
    np.savez(tmp_path / 'dense.npz', **flat)
    export_cli.export(str(tmp_path / 'dense.npz'), 'npz', str(tmp_path / 'small'),
                      structured=True)
    small = tmp_path / 'small' / 'params.npz'
    with np.load(small) as f:
        assert f[att + 'query/kernel'].shape[1] == 1
    evals = {}
    for name, weights in (('dense', tmp_path / 'dense.npz'), ('small', small)):
        out = main_here(tmp_path / name, *SMOKE, f'--config.init_from={weights}',
                        '--config.stages=eval', data_dir=data_dir).stdout
        evals[name] = results(tmp_path / name)
    assert 'model widths from' in out and 'widths' not in evals['dense']
    assert evals['small']['widths'] == {'num_heads': [2, 1], 'mlp_dim': [44, 34]}
    assert evals['small']['eval']['accuracy'] == evals['dense']['eval']['accuracy']
    np.testing.assert_allclose(evals['small']['eval']['loss'], evals['dense']['eval']['loss'],
                               rtol=1e-5)

    ft = tmp_path / 'finetune'
    args = (*SMOKE, f'--config.pretrained={small}', '--config.reinit_head=False',
            '--config.num_steps=4', '--config.checkpoint_every_steps=2', '--config.stages=train')
    (ft / 'checkpoints' / '2.orbax-checkpoint-tmp-1').mkdir(parents=True)  # killed mid-write
    main_here(ft, *args, data_dir=data_dir)
    assert params(ft)[att + 'query/kernel'].shape[1] == 1
    shutil.rmtree(tmp_path / 'small')  # a resume reads the widths from its checkpoints
    again = main_here(ft, *args[:-1], '--config.stages=train,eval', data_dir=data_dir).stdout
    assert 'resuming' in again and results(ft)['widths'] == evals['small']['widths']
    main_here(tmp_path / 'from_run', *SMOKE, f'--config.init_from={ft}', '--config.stages=eval',
              data_dir=data_dir)
    assert results(tmp_path / 'from_run')['eval'] == results(ft)['eval']


@pytest.mark.slow  # two runs of the main command
@needs_torch
def test_a_torch_file_with_narrower_mlps_is_evaluated_at_its_own_widths(tmp_path, data_dir):
    """A HuggingFace file whose MLPs are narrower than the config's (an `export --format hf
    --structured` model, say) is evaluated at its widths, without a config change: as the
    reference, the same weights with the missing units as zeros in the config's widths."""
    import transformers
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, image_size=32, patch_size=4, num_labels=10)
    torch.manual_seed(0)
    sd = transformers.ViTForImageClassification(cfg).state_dict()
    torch.save(sd, tmp_path / 'narrow.pth')
    padded = dict(sd)
    for k, t in sd.items():  # 16 units of zeros: fc1 rows and biases, fc2 columns (only
        if t.shape[0] == 48:  # the MLP has a dimension of 48)
            padded[k] = torch.cat([t, torch.zeros((16, *t.shape[1:]))])
        elif t.ndim == 2 and t.shape[1] == 48:
            padded[k] = torch.cat([t, torch.zeros((t.shape[0], 16))], dim=1)
    torch.save(padded, tmp_path / 'padded.pth')
    for name in ('narrow', 'padded'):
        out = main_here(tmp_path / name, *SMOKE, f'--config.init_from={tmp_path / name}.pth',
                        '--config.stages=eval', '--config.model.numerics=auto',
                        data_dir=data_dir).stdout
        assert ('MLP units per block [48, 48]' in out) == (name == 'narrow'), out
    narrow, padded = results(tmp_path / 'narrow'), results(tmp_path / 'padded')
    assert narrow['widths'] == {'num_heads': [2, 2], 'mlp_dim': [48, 48]}
    assert 'widths' not in padded
    assert narrow['eval']['accuracy'] == padded['eval']['accuracy']
    np.testing.assert_allclose(narrow['eval']['loss'], padded['eval']['loss'], rtol=1e-5)


@pytest.mark.slow  # a training run with its mask updates
def test_gradual_pruning_while_training_leaves_its_sparsity_in_the_trained_weights(
        tmp_path, data_dir):
    """sparsity.gradual through the main command: the trained pool is at the final sparsity
    (counted in numpy over the written params.npz), and the train log's pool sparsity says so
    (the schedule itself: tests/test_pruning.py)."""
    wd = tmp_path / 'gradual'
    main_here(wd, *SMOKE, '--config.sparsity.gradual.sparsity=0.6',
              '--config.sparsity.gradual.end=0.5', '--config.sparsity.gradual.every_steps=1',
              '--config.stages=train', data_dir=data_dir)
    flat = params(wd)
    w = np.concatenate([flat[k].ravel() for k in pool_keys(flat)])
    np.testing.assert_allclose((w == 0).mean(), 0.6, atol=1e-4)
    r = results(wd)
    assert r['train']['pool_sparsity'] == pytest.approx((w == 0).mean(), abs=1e-6)


@pytest.mark.slow  # the masks through optimizer steps: test_pruning.py
def test_a_pruned_model_is_fine_tuned_with_its_zeros_kept(tmp_path, run8, data_dir):
    """sparsity.keep_zeros through the main command: run8's weights pruned at 60% of the pool
    in numpy (init_from), trained on: every pruned weight is still exactly zero in the written
    params.npz and the pool's sparsity is unchanged; without it, the zeros move."""
    from sparse_vit_jax.checkpoints.io import save_npz
    flat = params(run8)
    pool = [k for k in pool_keys(flat) if k != 'head/kernel']
    cut = np.quantile(np.abs(np.concatenate([flat[k].ravel() for k in pool])), 0.6)
    pruned = {k: np.where(np.abs(v) <= cut, 0, v) if k in pool else v for k, v in flat.items()}
    save_npz(tmp_path / 'pruned.npz', pruned)
    for keep in (True, False):
        wd = tmp_path / f'keep_{keep}'
        out = main_here(wd, *SMOKE, f'--config.init_from={tmp_path / "pruned.npz"}',
                        f'--config.sparsity.keep_zeros={keep}', '--config.stages=train',
                        data_dir=data_dir).stdout
        trained = params(wd)
        kept = all((trained[k][pruned[k] == 0] == 0).all() for k in pool)
        assert kept == keep and (trained['head/kernel'] != pruned['head/kernel']).any()
        assert ('pool sparsity 0.' in out) == keep
    assert not any((trained[k] == 0).any() for k in pool)  # the control: all of them moved


def test_checkpoint_of_an_older_config_schema_still_loads(tmp_path, run8, data_dir):
    old = tmp_path / 'old_run'
    shutil.copytree(run8, old)
    metas = list((old / 'checkpoints').glob('*/meta/metadata'))
    assert metas
    for m in metas:  # as written before model.attention_impl and tuples existed
        meta = json.loads(m.read_text())
        del meta['config']['model']['attention_impl']
        meta['config']['stages'] = 'train,eval,prune'
        meta['config']['prune']['ratios'] = '0.5'
        meta['config']['sparsity']['attention']['layers'] = 'last'
        meta['config']['sweep']['variants'] = 'baseline,attention'
        m.write_text(json.dumps(meta))
    wd = tmp_path / 'eval'
    main_here(wd, *SMOKE, f'--config.init_from={old}', '--config.stages=eval',
              data_dir=data_dir)
    assert results(wd)['eval']['accuracy'] == results(run8)['eval']['accuracy']


def test_from_saved_fills_new_keys_converts_old_forms_and_rejects_unknown_ones():
    saved = base_config().to_dict()
    del saved['model']['attention_impl']
    saved['batch_size'] = 48
    saved['prune']['ratios'] = '0.1,0.3'
    saved['sparsity']['attention']['layers'] = 'all'
    saved['sparsity']['l1']['include'] = ''
    c = from_saved(saved)
    assert c.model.attention_impl == 'auto' and c.batch_size == 48
    assert c.prune.ratios == (0.1, 0.3) and c.sparsity.attention.layers == tuple(range(12))
    assert c.sparsity.l1.include == ()
    validate(c)
    del saved['model']['dropout_impl']
    for bits, impl in ((32, 'flax'), (8, 'bytes')):  # its older name and values
        saved['model']['dropout_bits'] = bits
        assert from_saved(saved).model.dropout_impl == impl
    assert 'dropout_bits' in saved['model']  # the caller's dict is left as it was
    saved['model']['flux'] = 1
    with pytest.raises(UserError, match='model.flux, unknown to this version'):
        from_saved(saved)


def test_more_steps_continue_a_run_only_where_nothing_depends_on_the_total():
    """Constant schedules: more steps go on. A cosine schedule, a linear L1 ramp or gradual
    pruning (its start and end are fractions of the total) would change steps already
    taken: refused, naming num_steps."""
    from sparse_vit_jax.configs import copy, training_differences
    saved = base_config()
    saved.num_steps, saved.schedule.name = 8, 'constant'
    more = copy(saved)
    more.num_steps = 12
    assert training_differences(saved.to_dict(), more) == []
    for key, value in (('schedule.name', 'warmup_cosine'), ('sparsity.l1.schedule', 'linear'),
                       ('sparsity.gradual.sparsity', 0.5)):
        before, after = copy(saved), copy(more)
        for c in (before, after):
            *groups, leaf = key.split('.')
            for g in groups:
                c = c[g]
            c[leaf] = value
        assert training_differences(before.to_dict(), after) == ['num_steps (8 -> 12)'], key


def test_config_is_locked_and_typed():
    c = base_config()
    with pytest.raises(AttributeError):
        c.no_such_key = 1
    with pytest.raises(TypeError):
        c.batch_size = 'big'
    c.prune.include = (r'encoderblock_\d{1,2}/.*',)  # a comma inside a regex stays one regex
    validate(c)
    assert len(c.prune.include) == 1


def test_smoke_turns_a_valid_config_into_a_valid_one():
    """Smoke drops the pretrained weights, and with them the zeros a fine-tuning of a pruned
    model keeps (unless the run starts from init_from, which smoke keeps)."""
    c = config_file('digits')
    c.pretrained, c.sparsity.keep_zeros = 'pruned/params.npz', True
    validate(c)
    smoke = apply_smoke(c)
    validate(smoke)
    assert (smoke.pretrained, smoke.sparsity.keep_zeros) == ('', False)
    c.pretrained, c.init_from = '', 'pruned/params.npz'
    assert apply_smoke(c).sparsity.keep_zeros


@needs_torch
def test_onecycle_matches_torch():
    total, warmup, peak = 60, 13, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total,
                                                pct_start=warmup / total)
    lr = onecycle(total, warmup, peak / 25, peak, peak / 25 / 1e4)
    mom = onecycle(total, warmup, 0.95, 0.85, 0.95)
    for step in range(total):
        g = opt.param_groups[0]
        assert float(lr(step)) == pytest.approx(g['lr'], rel=1e-4), step  # float32 vs 64
        assert float(mom(step)) == pytest.approx(g['momentum'], rel=1e-5), step
        opt.step()
        sched.step()


@pytest.mark.slow
def test_digits_default_reaches_95_percent(tmp_path, data_dir):
    run_main(tmp_path, '--config=configs/digits.py', data_dir=data_dir)  # 1 device, as README
    r = results(tmp_path)
    assert r['eval']['accuracy'] >= 0.95, r['eval']
    assert len(r['prune']) == 9


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch_and_bf16_runs(tmp_path, data_dir):
    common = [*SMOKE, '--config.model.dropout_rate=0.0', '--config.stages=train']
    main_here(tmp_path / 'full', *common, '--config.num_steps=8', data_dir=data_dir)
    main_here(tmp_path / 'accum', *common, '--config.num_steps=16', '--config.batch_size=8',
              '--config.optimizer.accumulate=2', data_dir=data_dir)
    a, b = params(tmp_path / 'full'), params(tmp_path / 'accum')
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-6, rtol=1e-4, err_msg=k)
    out = main_here(tmp_path / 'bf16', *common, '--config.model.dtype=bfloat16',
                    data_dir=data_dir).stdout
    assert 'step 8/8' in out and all(np.isfinite(v).all() for v in params(tmp_path / 'bf16')
                                     .values())


# ---- the engine without any data pipeline ------------------------------------------------------

def test_engine_steps_on_synthetic_batches(tmp_path):
    """State, steps, loop and checkpoints with a linear model: no TFDS, no ViT, no paper."""
    import flax

    from sparse_vit_jax.train.checkpointing import Checkpointer
    from sparse_vit_jax.train.loop import LoopConfig, train_loop
    from sparse_vit_jax.train.sharding import make_mesh, state_shardings
    from sparse_vit_jax.train.state import abstract_state, create_state, with_shardings
    from sparse_vit_jax.train.steps import evaluate, make_eval_step, make_train_step

    @flax.struct.dataclass
    class Metrics(metrics.Collection):
        loss: metrics.Average.from_output('per_example')

    w_true = jnp.arange(4.0)

    def loss_fn(p, batch, rng, train):
        err = (batch['x'] @ p['w'] - batch['y']) ** 2
        return jnp.mean(err), {'per_example': err}

    def batches(seed):
        key = jax.random.key(seed)
        while True:
            key, k = jax.random.split(key)
            x = jax.random.normal(k, (16, 4))
            yield {'x': x, 'y': x @ w_true, 'mask': jnp.ones(16)}

    mesh = make_mesh()
    tx = optax.sgd(0.2)
    init = lambda rng: {'w': jnp.zeros(4)}
    shardings = state_shardings(abstract_state(init, tx), mesh, fsdp=False)
    state = create_state(init, tx, 0, shardings)
    step = make_train_step(loss_fn, tx, Metrics, shardings, mesh)
    ckpt = Checkpointer(tmp_path, every_steps=10, keep=1)
    state, scalars = train_loop(state, step, batches(0), LoopConfig(60, 20, 16), ckpt)
    ckpt.close()
    np.testing.assert_allclose(state.params['w'], w_true, atol=1e-3)
    assert scalars['loss'] < 1e-5
    # eval: the metrics count only mask-1 examples
    data = next(batches(1))
    data['mask'] = jnp.arange(16) < 10
    data['y'] = jnp.where(data['mask'], data['y'], 1e6)  # padding that would ruin the mean
    m = evaluate(make_eval_step(loss_fn, Metrics, mesh), state.params, [data])
    assert int(m.loss.count) == 10 and float(m.loss.compute()) < 1e-4
    # restore onto the abstract state's shardings
    again, meta = Checkpointer(tmp_path, every_steps=10, keep=1).restore_latest(
        with_shardings(abstract_state(init, tx), shardings))
    assert int(again.step) == 60 and meta['scalars']['loss'] == scalars['loss']
    np.testing.assert_array_equal(again.params['w'], state.params['w'])


def test_global_norm_is_the_float64_norm_on_any_sharding():
    """The train step's grad_norm (train.steps.global_norm: large leaves summed over their last
    axis, all finished in one sum) against numpy's float64 norm: small, large, scalar and
    bf16 leaves, replicated and sharded as mesh.fsdp shards them, and an empty tree."""
    from jax.sharding import NamedSharding

    from sparse_vit_jax.train.sharding import fsdp_spec, make_mesh
    from sparse_vit_jax.train.steps import global_norm
    rng = np.random.default_rng(0)
    tree = {'w': rng.normal(size=(96, 1024)), 'k': rng.normal(size=(8, 16, 768)) * 1e-3,
            'b': rng.normal(size=(768,)), 's': np.float64(3.0),
            'h': rng.normal(size=(256, 512)) * 50}
    want = np.sqrt(sum(np.sum(np.square(x)) for x in tree.values()))
    leaves = {k: jnp.asarray(x, jnp.float32) for k, x in tree.items()}
    mesh = make_mesh()
    sharded = {k: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x.shape, mesh.size)))
               for k, x in leaves.items()}
    assert sharded['w'].sharding.spec != jax.sharding.PartitionSpec()  # really sharded
    for t in (leaves, sharded):
        np.testing.assert_allclose(float(jax.jit(global_norm)(t)), want, rtol=2e-6)
    bf16 = {'x': jnp.asarray(tree['h'], jnp.bfloat16)}
    np.testing.assert_allclose(float(global_norm(bf16)),
                               np.linalg.norm(np.asarray(bf16['x'], np.float64)), rtol=2e-6)
    assert float(global_norm({})) == 0.0


def test_the_loop_reads_nothing_back_between_log_steps(tmp_path, monkeypatch):
    """The host never waits for the device inside the step loop: device-to-host reads (all go
    through jax.Array._value) happen at log and checkpoint steps only, so 30 steps read
    exactly as much as 10 with one log and one checkpoint each."""
    import threading

    import flax
    from jax._src import array

    from sparse_vit_jax.train.checkpointing import Checkpointer
    from sparse_vit_jax.train.loop import LoopConfig, train_loop
    from sparse_vit_jax.train.sharding import make_mesh, state_shardings
    from sparse_vit_jax.train.state import abstract_state, create_state
    from sparse_vit_jax.train.steps import make_train_step

    @flax.struct.dataclass
    class Metrics(metrics.Collection):
        loss: metrics.Average.from_output('loss')

    def loss_fn(p, batch, rng, train):
        return jnp.mean((batch['x'] @ p['w']) ** 2), {}

    tx = optax.sgd(0.1)
    init = lambda rng: {'w': jnp.ones(4)}  # noqa: E731
    mesh = make_mesh()
    shardings = state_shardings(abstract_state(init, tx), mesh, fsdp=False)
    step = make_train_step(loss_fn, tx, Metrics, shardings, mesh)
    batch = {'x': jnp.ones((16, 4))}
    reads = []
    value = array.ArrayImpl._value

    def counted(self):
        if threading.current_thread() is threading.main_thread():
            reads.append(self.shape)
        return value.fget(self)

    def run(steps):
        state = create_state(init, tx, 0, shardings)
        ckpt = Checkpointer(tmp_path / str(steps), every_steps=1000, keep=1)
        reads.clear()
        with monkeypatch.context() as m:
            m.setattr(array.ArrayImpl, '_value', property(counted))
            train_loop(state, step, iter(lambda: batch, None), LoopConfig(steps, 1000, 16), ckpt)
        ckpt.close()
        return len(reads)

    run(3)  # compiled
    short, long = run(10), run(30)
    assert short > 0  # the spy sees the final log and checkpoint
    assert long == short


def test_a_diverged_state_is_never_checkpointed(tmp_path):
    """Checkpoints every step, the loss checked only at the end: the step whose update
    overflowed the weights is refused with one line naming it, and the newest checkpoint
    (the one a re-run resumes from) is the step before, finite."""
    import flax

    from sparse_vit_jax.train.checkpointing import Checkpointer
    from sparse_vit_jax.train.loop import LoopConfig, train_loop
    from sparse_vit_jax.train.sharding import make_mesh, state_shardings
    from sparse_vit_jax.train.state import abstract_state, create_state, with_shardings
    from sparse_vit_jax.train.steps import make_train_step

    @flax.struct.dataclass
    class Metrics(metrics.Collection):
        loss: metrics.Average.from_output('loss')

    def loss_fn(p, batch, rng, train):
        return jnp.mean((batch['x'] @ p['w'] - 1.0) ** 2), {}

    tx = optax.sgd(1e15)  # |w| grows ~1e16-fold a step: float32 overflows at the third
    init = lambda rng: {'w': jnp.zeros(4)}  # noqa: E731
    shardings = state_shardings(abstract_state(init, tx), make_mesh(), fsdp=False)
    step = make_train_step(loss_fn, tx, Metrics, shardings, make_mesh())
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=2)
    batch = {'x': jnp.ones((16, 4))}
    with pytest.raises(UserError) as e:
        train_loop(create_state(init, tx, 0, shardings), step, iter(lambda: batch, None),
                   LoopConfig(20, 1000, 16), ckpt)
    ckpt.close()
    # numpy: w_{t+1} = w_t - lr * 2 (4 w_t - 1) per coordinate, in float32
    w, lr, first_bad = np.float32(0), np.float32(1e15), None
    with np.errstate(over='ignore', invalid='ignore'):
        for t in range(1, 21):
            w = np.float32(w - lr * np.float32(2) * (np.float32(4) * w - np.float32(1)))
            if not np.isfinite(w):
                first_bad = t
                break
    assert first_bad is not None and first_bad < 20
    assert str(e.value) == (f'the train state became NaN or inf by step {first_bad}; stopped '
                            f'without saving (the last good checkpoint (step {first_bad - 1}) '
                            'is kept); lower optimizer.lr or set optimizer.grad_clip')
    assert ckpt.manager.all_steps() and max(ckpt.manager.all_steps()) == first_bad - 1
    again = Checkpointer(tmp_path, every_steps=1, keep=2)
    state, _ = again.restore_latest(with_shardings(abstract_state(init, tx), shardings))
    assert int(state.step) == first_bad - 1 and np.isfinite(np.asarray(state.params['w'])).all()
    again.close()


def test_eval_batch_and_device_count_independent_of_the_training_batch(tmp_path, run8, data_dir):
    """A training batch that 8 devices do not divide does not matter to evaluation."""
    wd = tmp_path / 'eval'
    main_here(wd, *SMOKE, f'--config.init_from={run8}', '--config.stages=eval',
              '--config.batch_size=12', '--config.eval_batch_size=10', data_dir=data_dir)
    assert results(wd)['eval']['accuracy'] == results(run8)['eval']['accuracy']


def test_evaluation_during_training_reports_the_checkpoint_and_leaves_training_alone(
        tmp_path, run8, data_dir):
    """eval_every_steps=4 of 8: one evaluation, at step 4, logged and written to tensorboard;
    it equals a later evaluation of the step-4 checkpoint, and the trained weights are run8's
    bit for bit (evaluating draws no randomness and changes no state)."""
    wd = tmp_path / 'during'
    out = main_here(wd, *SMOKE, '--config.eval_every_steps=4', '--config.stages=train,eval',
                    data_dir=data_dir).stdout
    lines = [x for x in out.splitlines() if x.startswith('eval at step')]
    assert len(lines) == 1 and lines[0].startswith('eval at step 4/8 | accuracy '), out
    logged = dict(kv.rsplit(' ', 1) for kv in lines[0].split(' | ')[1:])
    assert set(logged) == {'accuracy', 'top5_accuracy', 'loss'}
    ref, got = params(run8), params(wd)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert results(wd)['eval'] == results(run8)['eval']

    ck4 = tmp_path / 'ck4'
    shutil.copytree(run8 / 'checkpoints', ck4 / 'checkpoints')
    shutil.rmtree(ck4 / 'checkpoints' / '8')
    main_here(tmp_path / 'at4', *SMOKE, f'--config.init_from={ck4}', '--config.stages=eval',
              data_dir=data_dir)
    at4 = results(tmp_path / 'at4')['eval']
    for k, v in logged.items():
        assert float(v) == pytest.approx(at4[k], abs=6e-5), k  # printed to 4 decimals

    written = {k: v for k, v in tensorboard_scalars(wd / 'tensorboard').items()
               if k[1].startswith('eval/')}
    assert written.keys() == {(4, f'eval/{k}') for k in logged}
    for k in logged:
        assert written[(4, f'eval/{k}')] == pytest.approx(at4[k], rel=1e-6), k


def test_a_validation_split_takes_the_evaluations_during_training(tmp_path, run8, data_dir):
    """data.val_fraction=0.1: training reads the other 90% of the training split (other
    weights than run8's); the evaluation during training reads the 144 held-out examples
    ('val at step', tensorboard val/*) and equals the eval stage's validation row for the
    step-4 checkpoint; the eval stage reports both splits. The fraction enters the run's
    training keys only when set, and its workdir refuses another."""
    from sparse_vit_jax.configs import training_keys
    wd, val = tmp_path / 'val', '--config.data.val_fraction=0.1'
    out = main_here(wd, *SMOKE, val, '--config.eval_every_steps=4', '--config.stages=train,eval',
                    data_dir=data_dir).stdout
    lines = [x for x in out.splitlines() if ' at step ' in x]
    assert len(lines) == 1 and lines[0].startswith('val at step 4/8 | accuracy '), out
    logged = {k: float(v) for k, v in (kv.rsplit(' ', 1) for kv in lines[0].split(' | ')[1:])}
    res = results(wd)
    assert (res['eval']['examples'], res['validation']['examples']) == (360, 144)
    assert f'validation accuracy {res["validation"]["accuracy"]:.4f} (top-5 ' in out
    csv = (wd / 'results.csv').read_text().splitlines()
    assert [row.split(',')[0] for row in csv[1:3]] == ['eval', 'validation'], csv
    written = {k: v for k, v in tensorboard_scalars(wd / 'tensorboard').items() if '/' in k[1]}
    assert written.keys() == {(4, f'val/{k}') for k in logged}, written.keys()
    ours, ref = params(wd), params(run8)
    assert any(not np.array_equal(ours[k], ref[k]) for k in ours)

    ck4 = tmp_path / 'ck4'
    shutil.copytree(wd / 'checkpoints', ck4 / 'checkpoints')
    shutil.rmtree(ck4 / 'checkpoints' / '8')
    main_here(tmp_path / 'at4', *SMOKE, val, f'--config.init_from={ck4}', '--config.stages=eval',
              data_dir=data_dir)
    at4 = results(tmp_path / 'at4')['validation']
    for k, v in logged.items():
        assert v == pytest.approx(at4[k], abs=6e-5), k  # printed to 4 decimals

    r = main_here(wd, *SMOKE, '--config.data.val_fraction=0.2', data_dir=data_dir, check=False)
    assert r.returncode == 2 and 'data.val_fraction (0.1 -> 0.2)' in r.stderr, r.stderr
    c = base_config()
    assert 'data.val_fraction' not in training_keys(c)
    c.data.val_fraction = 0.1
    assert training_keys(c)['data.val_fraction'] == 0.1


def test_eta_counts_days():
    from sparse_vit_jax.train.loop import format_eta
    assert format_eta(59) == '00:00:59'
    assert format_eta(2 * 86_400 + 3 * 3_600 + 4 * 60 + 5) == '2d 03:04:05'


@pytest.mark.slow
@pytest.mark.parametrize('masks', ['flax', 'hash'])
def test_rbg_dropout_rng_trains_and_resumes_bit_identical(tmp_path, run8, data_dir, masks):
    """config.rng_impl (the accelerators' default is rbg; GPUs hash the dropout masks, TPUs
    draw them as flax does): a fresh process, as the choice is process-wide. Its own random
    stream (params differ from the Threefry run's); its 4-word key is checkpointed, so a run
    resumed from step 4 ends with the same weights."""
    import shutil
    wd = tmp_path / 'rbg'
    args = [*SMOKE, '--config.rng_impl=rbg', '--config.stages=train,eval',
            f'--config.model.dropout_impl={masks}']
    run_main(wd, *args, devices=8, data_dir=data_dir)
    assert results(wd)['eval']['accuracy'] > 0
    ours, threefry = params(wd), params(run8)
    assert any(not np.array_equal(ours[k], threefry[k]) for k in ours)
    (wd / 'params.npz').unlink()
    shutil.rmtree(wd / 'checkpoints' / '8')
    again = run_main(wd, *args, devices=8, data_dir=data_dir)
    assert 'resuming from' in again.stdout
    for k in ours:
        np.testing.assert_array_equal(params(wd)[k], ours[k], err_msg=k)


def test_the_accelerator_step_computes_in_bf16_and_never_calls_the_host():
    """configs/imagenet100.py's train step with model.dtype=bfloat16 (what 'auto' picks on a
    GPU or TPU): every matmul and convolution of forward and backward takes bf16 operands,
    and nothing inside the step waits for Python."""
    from helpers import config_file, equations

    from sparse_vit_jax.experiment import build_model, train_parts
    from sparse_vit_jax.train.sharding import make_mesh
    from sparse_vit_jax.train.state import with_shardings
    c = config_file('imagenet100')
    c.model.name, c.model.image_size, c.model.dtype, c.batch_size = 'testing', 32, 'bfloat16', 8
    assert c.sparsity.attention.weight > 0  # the paper's penalty is in this step
    mesh = make_mesh()
    parts = train_parts(c, build_model(c, 100, 'jax'), mesh, 100)
    batch = {'image': jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
             'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
    jaxpr = jax.make_jaxpr(parts.step)(with_shardings(parts.abstract, parts.shardings), batch)
    eqns = list(equations(jaxpr.jaxpr))
    matmuls = [e for e in eqns if e.primitive.name in ('dot_general', 'conv_general_dilated')]
    assert len(matmuls) > 30  # forward and backward of 2 blocks, the patches and the head
    assert {str(v.aval.dtype) for e in matmuls for v in e.invars} == {'bfloat16'}
    assert not [e.primitive.name for e in eqns if 'callback' in e.primitive.name]
    # the master weights stay float32
    assert {str(a.dtype) for a in jax.tree.leaves(parts.abstract.params)} == {'float32'}


def test_compile_cache_auto_is_per_user_on_accelerators_only(monkeypatch, tmp_path):
    from sparse_vit_jax.experiment import use_compile_cache
    before = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
    try:
        assert before and use_compile_cache('auto') == before  # CPU: left as it is
        monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
        assert use_compile_cache('auto') == before  # JAX_COMPILATION_CACHE_DIR wins
        jax.config.update('jax_compilation_cache_dir', None)
        assert use_compile_cache('') == ''
        monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
        assert use_compile_cache('auto') == str(tmp_path / 'sparse_vit_jax' / 'xla')
    finally:
        jax.config.update('jax_compilation_cache_dir', before)


def test_latest_meta_skips_a_step_whose_meta_is_damaged(tmp_path):
    """Reading a run's settings (init_from's numerics) falls back like restore_params: the
    newest step's meta.json truncated -> the previous step's meta, with a warning; nothing
    is moved (the run may belong to someone else). None readable -> one line."""
    import optax

    from sparse_vit_jax.train.checkpointing import Checkpointer, latest_meta
    from sparse_vit_jax.train.sharding import make_mesh, state_shardings
    from sparse_vit_jax.train.state import abstract_state, create_state

    init = lambda rng: {'w': jnp.zeros(4)}  # noqa: E731
    tx = optax.sgd(0.1)
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=3)
    state = create_state(init, tx, 0, state_shardings(abstract_state(init, tx), make_mesh(),
                                                       fsdp=False))
    for step in (1, 2):
        ckpt.save(state.replace(step=jnp.asarray(step, state.step.dtype)),
                  {'numerics': f'n{step}'}, force=True)
    ckpt.close()
    assert latest_meta(tmp_path)[0] == 2
    metas = sorted((tmp_path / 'checkpoints').glob('*/meta/metadata'))
    assert [m.parts[-3] for m in metas] == ['1', '2']
    metas[1].write_text(metas[1].read_text()[:5])
    said = []
    step, meta = latest_meta(tmp_path, log=said.append)
    assert (step, meta['numerics']) == (1, 'n1')
    assert len(said) == 1 and said[0].startswith(
        f'warning: checkpoint {tmp_path}/checkpoints/2 is damaged')
    assert (tmp_path / 'checkpoints' / '2').is_dir()
    metas[0].write_text('')
    with pytest.raises(UserError, match=r'^no usable checkpoint in .*checkpoints \(all 2 dam'):
        latest_meta(tmp_path, log=said.append)


def test_a_state_compiled_ahead_is_the_state_create_state_makes():
    """`lower_state` (compiled ahead, run later) gives `create_state`'s values and shardings,
    with an optimizer that closes over an array (as the mask-keeping one holds its masks):
    the closed-over array enters as an argument, bit for bit."""
    import optax

    from sparse_vit_jax.train.sharding import make_mesh, state_shardings
    from sparse_vit_jax.train.state import abstract_state, create_state, lower_state

    held = jnp.asarray([0.0, 1.0, 0.0, 1.0])
    tx = optax.GradientTransformation(lambda p: {'m': p['w'] * held + 1.0},
                                      lambda u, s, p=None: (u, s))
    init = lambda rng: {'w': jax.random.normal(rng, (4,))}  # noqa: E731
    shardings = state_shardings(abstract_state(init, tx), make_mesh(), fsdp=False)
    lowered, args = lower_state(init, tx, 3, shardings)
    assert any(a is held for a in jax.tree.leaves(args))
    ahead = lowered.compile()(*args)
    made = create_state(init, tx, 3, shardings)
    for a, b in zip(jax.tree.leaves(ahead), jax.tree.leaves(made), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.sharding == b.sharding
    np.testing.assert_array_equal(ahead.opt_state['m'], ahead.params['w'] * np.array(held) + 1)
    assert np.any(np.asarray(ahead.params['w']) != 0)


def test_what_a_state_takes_on_each_device_is_its_shards():
    """`state_bytes`: per device, the shard of each leaf (numpy formula), a typed key included."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sparse_vit_jax.train.memory import state_bytes
    from sparse_vit_jax.train.sharding import make_mesh
    mesh = make_mesh()
    shapes = {'w': jax.ShapeDtypeStruct((64, 12), jnp.float32),
              'b': jax.ShapeDtypeStruct((5,), jnp.bfloat16),
              'key': jax.eval_shape(lambda: jax.random.key(0))}
    layout = {'w': NamedSharding(mesh, P('data')), 'b': NamedSharding(mesh, P()),
              'key': NamedSharding(mesh, P())}
    n = mesh.shape['data']
    assert n == 8
    assert state_bytes(shapes, layout) == 64 // n * 12 * 4 + 5 * 2 + 2 * 4  # key: 2 x uint32


def test_a_need_beyond_the_free_memory_is_one_line_and_unknown_memory_no_check():
    from sparse_vit_jax.train.memory import GiB, check_fits
    gpu = FakeDevice('gpu', 'Fake GPU', stats={'bytes_limit': 10 * GiB,
                                                'bytes_in_use': 4 * GiB})
    check_fits('the step', 6 * GiB, 'lower the batch', gpu)  # exactly what is free: fits
    with pytest.raises(UserError) as e:
        check_fits('the step', 7 * GiB, 'lower the batch', gpu)
    assert str(e.value) == ('the step needs 7.00 GiB per device, more than the 6.00 GiB free '
                            'on each gpu device (Fake GPU): lower the batch')
    unknown = FakeDevice('gpu', 'Fake GPU')  # no statistics: no check
    check_fits('the step', 10 ** 15, 'lower the batch', unknown)


def test_running_out_of_memory_is_recognised_and_becomes_one_line(tmp_path, data_dir,
                                                                 monkeypatch):
    """A real allocation failure (XLA's CPU allocator, 16 TiB) inside a job: one line, exit 2,
    saying what to change."""
    from sparse_vit_jax import cli
    from sparse_vit_jax.train.memory import out_of_memory

    with pytest.raises(jax.errors.JaxRuntimeError) as e:
        jnp.zeros((1 << 42,), jnp.float32)
    assert out_of_memory(e.value) and not out_of_memory(ValueError('RESOURCE_EXHAUSTED'))
    with pytest.raises(jax.errors.JaxRuntimeError) as e:  # as the next step reads the last
        x = jnp.ones((1 << 21,), jnp.float32)  # one's outputs: an INTERNAL error on the CPU
        y = jax.jit(lambda x: jnp.sort(x[:, None] * x[None, :], axis=0)[0, 0])(x)
        (y + 1).item()
    assert out_of_memory(e.value), e.value

    def job(config, workdir, command):
        jnp.zeros((1 << 42,), jnp.float32)

    err = io.StringIO()
    monkeypatch.chdir(ROOT)
    with contextlib.redirect_stderr(err):
        code = cli.run(['main.py', f'--workdir={tmp_path}', *SMOKE,
                        f'--config.data.data_dir={data_dir}'], job)
    assert code == 2, err.getvalue()[-2000:]
    assert err.getvalue().strip().splitlines()[-1] == (
        'error: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating '
        '17592186044416 bytes.): lower config.batch_size (config.optimizer.accumulate=N keeps '
        'the effective batch), set config.model.remat=dots or full, or config.mesh.fsdp=True '
        '(in an evaluation: lower config.eval_batch_size)')


def test_an_eval_step_that_does_not_fit_is_one_line_before_it_runs(monkeypatch):
    """`evaluate` compiles the step for the first batch and asks before running it; here the
    device is said to have 64 bytes free, less than the batch's 16 x 256 float32 products."""
    import flax

    from sparse_vit_jax.train import memory
    from sparse_vit_jax.train.sharding import make_mesh
    from sparse_vit_jax.train.steps import evaluate, make_eval_step

    @flax.struct.dataclass
    class Metrics(metrics.Collection):
        loss: metrics.Average.from_output('per_example')

    def loss_fn(p, batch, rng, train):
        err = jnp.sum((batch['x'] @ p['w']) ** 2, axis=1)
        return jnp.mean(err), {'per_example': err}

    step = make_eval_step(loss_fn, Metrics, make_mesh())
    batch = {'x': jnp.ones((16, 8)), 'mask': jnp.ones(16)}
    params = {'w': jnp.ones((8, 256))}
    assert int(evaluate(step, params, [batch]).loss.count) == 16
    monkeypatch.setattr(memory, 'free_bytes', lambda device: 64)
    with pytest.raises(UserError, match=r'^the eval step needs .* GiB per device, more than the '
                       r'0.00 GiB free on each cpu device \(cpu\): lower it$'):
        evaluate(step, params, [batch], 'lower it')
