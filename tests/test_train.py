"""The training engine end to end, through the main command in fresh processes."""

import json
import shutil

import numpy as np
import pytest
from helpers import SMOKE, params, results, run_main

from sparse_vit_jax.configs import base_config, from_saved, validate
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.optim import onecycle


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp('run1')
    run_main(wd, *SMOKE, devices=1, data_dir=data_dir)
    return wd


def test_loss_goes_down_and_outputs_written(one_device_run):
    r = results(one_device_run)
    assert (one_device_run / 'results.csv').read_text().startswith('stage,ratio,accuracy')
    assert r['eval']['examples'] == 360
    assert r['prune'][0]['pool_sparsity'] == pytest.approx(0.5, abs=1e-4)
    assert list((one_device_run / 'tensorboard').iterdir())
    assert {'4', '8'} <= {p.name for p in (one_device_run / 'checkpoints').iterdir()}


def test_training_lowers_loss(tmp_path, data_dir):
    out = run_main(tmp_path, *SMOKE, '--config.num_steps=120', '--config.log_every_steps=30',
                   '--config.checkpoint_every_steps=60', '--config.schedule.warmup_steps=5',
                   '--config.stages=train',
                   data_dir=data_dir).stdout
    losses = [float(line.split('loss ')[1].split()[0]) for line in out.splitlines()
              if line.startswith('step ')]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_eight_devices_and_fsdp_match_one_device(tmp_path, one_device_run, data_dir):
    ref = params(one_device_run)
    for name, extra in (('dp8', []), ('fsdp8', ['--config.mesh.fsdp=True'])):
        run_main(tmp_path / name, *SMOKE, *extra, devices=8, data_dir=data_dir)
        got = params(tmp_path / name)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, atol=2e-5, rtol=1e-4, err_msg=f'{name} {k}')


def test_resume_is_bit_identical(tmp_path, one_device_run, data_dir):
    import shutil
    wd = tmp_path / 'resume'
    shutil.copytree(one_device_run / 'checkpoints', wd / 'checkpoints')
    shutil.rmtree(wd / 'checkpoints' / '8')  # as if killed after the step-4 checkpoint
    out = run_main(wd, *SMOKE, data_dir=data_dir).stdout
    assert 'resuming from' in out and 'at step 4' in out
    ref, got = params(one_device_run), params(wd)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_init_from_in_fresh_process_on_other_device_count(tmp_path, one_device_run, data_dir):
    wd = tmp_path / 'eval'
    run_main(wd, *SMOKE, f'--config.init_from={one_device_run}', '--config.stages=eval,prune',
             devices=8, data_dir=data_dir)
    a, b = results(one_device_run), results(wd)
    assert b['eval']['accuracy'] == a['eval']['accuracy']
    assert b['prune'][0]['accuracy'] == a['prune'][0]['accuracy']
    wd2 = tmp_path / 'eval_npz'
    run_main(wd2, *SMOKE, f'--config.init_from={one_device_run / "params.npz"}',
             '--config.stages=eval', data_dir=data_dir)
    assert results(wd2)['eval']['accuracy'] == a['eval']['accuracy']


def test_checkpoint_of_an_older_config_schema_still_loads(tmp_path, one_device_run, data_dir):
    old = tmp_path / 'old_run'
    shutil.copytree(one_device_run, old)
    metas = list((old / 'checkpoints').glob('*/meta/metadata'))
    assert metas
    for m in metas:  # as written before model.attention_impl existed
        meta = json.loads(m.read_text())
        del meta['config']['model']['attention_impl']
        m.write_text(json.dumps(meta))
    wd = tmp_path / 'eval'
    run_main(wd, *SMOKE, f'--config.init_from={old}', '--config.stages=eval', data_dir=data_dir)
    assert results(wd)['eval']['accuracy'] == results(one_device_run)['eval']['accuracy']


def test_from_saved_fills_new_keys_and_rejects_unknown_ones():
    saved = base_config().to_dict()
    del saved['model']['attention_impl']
    saved['batch_size'] = 48
    c = from_saved(saved)
    assert c.model.attention_impl == 'xla' and c.batch_size == 48
    saved['model']['flux'] = 1
    with pytest.raises(UserError, match='model.flux, unknown to this version'):
        from_saved(saved)


def test_validate_in_process():
    c = base_config()
    validate(c)
    c.num_steps = -3
    with pytest.raises(UserError, match='num_steps must be >= 0'):
        validate(c)


def test_onecycle_matches_torch():
    import torch
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
    run_main(tmp_path, '--config=configs/digits.py', data_dir=data_dir)
    r = results(tmp_path)
    assert r['eval']['accuracy'] >= 0.95, r['eval']
    assert len(r['prune']) == 9


def test_gradient_accumulation_matches_full_batch_and_bf16_runs(tmp_path, data_dir):
    common = [*SMOKE, '--config.model.dropout_rate=0.0', '--config.stages=train']
    run_main(tmp_path / 'full', *common, '--config.num_steps=8', data_dir=data_dir)
    run_main(tmp_path / 'accum', *common, '--config.num_steps=16', '--config.batch_size=8',
             '--config.optimizer.accumulate=2', data_dir=data_dir)
    a, b = params(tmp_path / 'full'), params(tmp_path / 'accum')
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-6, rtol=1e-4, err_msg=k)
    out = run_main(tmp_path / 'bf16', *common, '--config.model.dtype=bfloat16',
                   data_dir=data_dir).stdout
    assert 'step 8/8' in out and all(np.isfinite(v).all() for v in params(tmp_path / 'bf16')
                                     .values())
