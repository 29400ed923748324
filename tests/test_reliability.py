"""Kills, damaged checkpoints, preemption, NaN, and a catalogue of bad inputs."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    FAILING_WRITE,
    ROOT,
    SMOKE,
    main_here,
    needs_torch,
    params,
    run_main,
    torch,
    xla_flags,
)

RUN = [*SMOKE, '--config.num_steps=24', '--config.checkpoint_every_steps=4',
       '--config.log_every_steps=1', '--config.keep_checkpoints=2', '--config.stages=train']


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp('reference')
    main_here(wd, *RUN, data_dir=data_dir)  # 8 devices, as the killed processes below
    return params(wd)


def start(workdir, data_dir, args=RUN):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               TFDS_DATA_DIR=str(data_dir))
    return subprocess.Popen([sys.executable, '-m', 'sparse_vit_jax.main', f'--workdir={workdir}',
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, step):
    for line in proc.stdout:
        if line.startswith(f'step {step}/'):
            return
    raise AssertionError(f'the run ended before step {step}: {proc.stderr.read()[-2000:]}')


def assert_same(got, ref):
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.slow
def test_sigkill_at_several_steps_resumes_bit_identical(tmp_path, data_dir, reference):
    wd = tmp_path / 'killed'
    for step in (8, 17):  # 8 is a checkpoint step: killed while it is being written
        proc = start(wd, data_dir)
        wait_for_step(proc, step)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    out = main_here(wd, *RUN, data_dir=data_dir).stdout
    assert 'resuming from' in out
    assert_same(params(wd), reference)


@pytest.mark.slow
def test_signals_stop_training_and_pruning_with_one_line_and_resume_bit_identical(
        tmp_path, data_dir, reference):
    """SIGTERM while training: checkpoint, one line, exit 3. Ctrl-C while pruning: the same.
    The re-run finishes the job with the weights of an uninterrupted run."""
    wd = tmp_path / 'preempted'
    proc = start(wd, data_dir)
    wait_for_step(proc, 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and 'Traceback' not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith('error: stopped by SIGTERM at step ') and 'checkpoint saved' in line
    stopped = int(line.split('at step ')[1].split(';')[0])
    assert str(stopped) in {p.name for p in (wd / 'checkpoints').iterdir()}
    args = [a for a in RUN if not a.startswith(('--config.stages', '--config.prune.ratios'))] + [
        '--config.prune.ratios=(0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9)']
    proc = start(wd, data_dir, args)
    for out in proc.stdout:
        if out.startswith('prune 0.10'):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and 'Traceback' not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith('error: stopped by SIGINT before an eval')
    assert not (wd / 'results.json').exists()
    main_here(wd, *args, data_dir=data_dir)
    assert len(json.loads((wd / 'results.json').read_text())['prune']) == 9
    assert_same(params(wd), reference)


@pytest.mark.slow
def test_rerun_with_other_training_settings_is_refused_and_nothing_moved(tmp_path, data_dir):
    wd = tmp_path / 'run'
    short = [*RUN[:-1], '--config.num_steps=8', '--config.stages=train']
    main_here(wd, *short, data_dir=data_dir)
    before = sorted(p.name for p in (wd / 'checkpoints').iterdir())
    for extra, says in ((['--config.model.num_layers=3'], 'model.num_layers (2 -> 3)'),
                        (['--config.optimizer.accumulate=2'], 'optimizer.accumulate (1 -> 2)'),
                        (['--config.num_steps=4'], 'num_steps (8 -> 4)'),
                        (['--config.num_steps=12'], 'num_steps (8 -> 12)')):  # schedule: cosine
        r = main_here(wd, *short, *extra, data_dir=data_dir, check=False)
        assert r.returncode == 2, r.stdout[-1000:]
        line = r.stderr.strip().splitlines()[-1]
        assert 'holds a run with other training settings' in line and says in line, line
        assert sorted(p.name for p in (wd / 'checkpoints').iterdir()) == before
        assert not (wd / 'damaged_checkpoints').exists()
    out = main_here(wd, *short, data_dir=data_dir).stdout
    assert 'at step 8' in out
    # With a constant schedule more steps change nothing already done: accepted, recorded.
    const = [*short, '--config.schedule.name=constant']
    main_here(tmp_path / 'const', *const, data_dir=data_dir)
    main_here(tmp_path / 'const', *const, '--config.num_steps=12', data_dir=data_dir)
    r = json.loads((tmp_path / 'const' / 'results.json').read_text())
    assert r['train']['steps'] == 12 and r['config']['num_steps'] == 12
    assert r['train']['resumed_from'] == 8


@pytest.mark.slow  # a training run
def test_a_workdir_belongs_to_one_process(tmp_path, data_dir):
    wd = tmp_path / 'run'
    wd.mkdir()
    (wd / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}))
    r = main_here(wd, *RUN, data_dir=data_dir, check=False)
    assert r.returncode == 2 and f'is in use by process {os.getpid()}' in r.stderr
    assert not (wd / 'checkpoints').exists()
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    (wd / '.lock').write_text(json.dumps({'host': socket.gethostname(), 'pid': int(gone)}))
    r = main_here(wd, *RUN[:-1], '--config.num_steps=4', '--config.stages=train',
                  data_dir=data_dir)
    assert 'taking over the lock' in r.stdout and not (wd / '.lock').exists()


def flip_bytes(step_dir):
    """Bytes changed inside every array data file, sizes kept (no truncation)."""
    files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
        f.write_bytes(bytes(data))


def damage(step_dir):
    """Truncates every array data file of a step (orbax's OCDBT `d/` files) to a third; which
    of them a restore reads varies between saves, so all are cut."""
    files = [p for p in step_dir.rglob('*')
             if p.is_file() and p.parent.name == 'd' and p.stat().st_size > 64]
    assert files, f'no array data files under {step_dir}'
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.slow  # a training run and reads of damaged checkpoints
def test_damaged_latest_checkpoint_falls_back(tmp_path, data_dir, reference):
    wd = tmp_path / 'damaged'
    main_here(wd, *RUN, data_dir=data_dir)
    (wd / 'params.npz').unlink()
    ckpt = wd / 'checkpoints'
    assert {p.name for p in ckpt.iterdir() if p.name.isdigit()} == {'20', '24'}
    damage(ckpt / '24')
    r = run_main(wd, *RUN, data_dir=data_dir, devices=8)  # a fresh process: the user's stderr
    assert 'checkpoint' in r.stdout and 'is damaged' in r.stdout and 'at step 20' in r.stdout
    # the warning line says it all: not tensorstore's complaints about the damaged read
    assert 'Traceback' not in r.stderr and 'Event loop' not in r.stderr, r.stderr[-2000:]
    assert_same(params(wd), reference)
    assert len(list((wd / 'damaged_checkpoints').iterdir())) == 1
    (wd / 'params.npz').unlink()
    for step in ('20', '24'):
        damage(ckpt / step)
    r = main_here(wd, *RUN, data_dir=data_dir, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith('error: no usable checkpoint in')
    assert not (wd / 'params.npz').exists()


@pytest.mark.slow  # a training run and three reads of damaged checkpoints
def test_flipped_bytes_are_caught_and_init_from_falls_back(tmp_path, data_dir, reference):
    wd = tmp_path / 'flipped'
    main_here(wd, *RUN, data_dir=data_dir)
    ev = tmp_path / 'eval'
    flip_bytes(wd / 'checkpoints' / '24')
    r = run_main(ev, *RUN[:-1], '--config.stages=eval', f'--config.init_from={wd}',
                 data_dir=data_dir)  # a fresh process: the user's stderr
    assert 'checkpoint' in r.stdout and 'is damaged' in r.stdout  # falls back to step 20
    assert 'Traceback' not in r.stderr and 'Event loop' not in r.stderr, r.stderr[-2000:]
    assert (wd / 'checkpoints' / '24').exists()  # not ours to move
    (wd / 'params.npz').unlink()
    r = main_here(wd, *RUN, data_dir=data_dir)
    assert 'is damaged' in r.stdout and 'at step 20' in r.stdout
    assert_same(params(wd), reference)


@pytest.mark.slow  # the engine's own test of a NaN state is in test_train.py
def test_nan_loss_stops_with_one_line_and_keeps_good_checkpoint(tmp_path, data_dir):
    wd = tmp_path / 'nan'
    r = main_here(wd, *RUN, '--config.optimizer.lr=1e12', '--config.schedule.name=warmup_cosine',
                 '--config.schedule.warmup_steps=20', data_dir=data_dir, check=False)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert re.match(r'error: (loss|the train state) became .* by step', line), r.stderr[-1500:]
    assert len([x for x in r.stderr.splitlines() if x.startswith(('error', 'Traceback'))]) == 1
    assert not (wd / 'params.npz').exists() and not (wd / 'results.json').exists()
    bad_step = int(line.split('by step ')[1].split(';')[0])
    saved = [int(p.name) for p in (wd / 'checkpoints').iterdir() if p.name.isdigit()]
    assert all(s < bad_step for s in saved)


# ---- a catalogue of bad inputs: one line, non-zero exit, nothing half-written ------------------

class Payload:
    """A class a checkpoint pickles beside its tensors: loading it would run its module's code."""


def write_bad_files(d):
    np.savez(d / 'pickled.npz', cls=np.array([object()], dtype=object))
    (d / 'random.npz').write_bytes(b'\x17' + np.random.default_rng(0).bytes(4095))
    (d / 'lfs.npz').write_text('version https://git-lfs.github.com/spec/v1\noid sha256:'
                               f'{"ab" * 32}\nsize 346000000\n')
    (d / 'hf_model').mkdir()
    (d / 'no_run').mkdir()
    (d / 'hf_model' / 'config.json').write_text('{}')
    (d / 'hf_model' / 'model.safetensors').write_bytes(b'')
    np.savez(d / 'good.npz', cls=np.zeros((1, 1, 8)))
    (d / 'truncated.npz').write_bytes((d / 'good.npz').read_bytes()[:50])
    (d / 'weights.txt').write_text('not weights')
    if torch is not None:
        torch.save({'state_dict': {'a': torch.zeros(1)}, 'extra': Payload()}, d / 'code.pth')
        torch.save({'state_dict': {'blocks.0.x': torch.zeros(1)}}, d / 'unknown_layout.pth')
    (d / 'bad_classes.txt').write_text('n1234\n')
    (d / 'a_file').write_text('x')
    for name, text in (('syntax', 'def get_config(:\n'), ('no_get', 'x = 1\n'),
                       ('raises', 'def get_config():\n    raise ValueError("boom")\n'),
                       ('number', 'def get_config():\n    return 3\n'),
                       ('own', 'import ml_collections as m\ndef get_config():\n'
                               '    return m.ConfigDict({"seed": 1})\n')):
        (d / f'{name}.py').write_text(text)


CATALOGUE = [  # (arguments, what the one line must say)
    (['--config.no_such_key=1'], 'unknown config key no_such_key'),
    (['--config.batch_size=abc'], "--config.batch_size=abc: invalid literal for int() with "
     "base 10: 'abc'; see the keys"),
    (['--config.batch_size=0'], 'batch_size must be > 0'),
    (['--config.optimizer.lr=-1.0'], 'optimizer.lr must be > 0'),
    (['--config.optimizer.lr=nan'], 'optimizer.lr must be a finite number'),
    (['--config.num_epochs=inf'], 'num_epochs must be a finite number'),
    (['--config.num_epochs=nan'], 'num_epochs must be a finite number'),
    (['--config.seed=-1'], 'seed must be >= 0'),
    (['--config.eval_every_steps=-4'], 'eval_every_steps must be >= 0'),
    (['--config.data.val_fraction=0.7'], 'data.val_fraction (the share of the training split '
     'held out for validation) must be in [0, 0.5], got 0.7'),
    (['--config.model.num_heads=3', '--config.model.hidden_size=32'],
     'num_heads 3 does not divide model.hidden_size 32'),
    (['--config.model.hidden_size=-8'], 'model.hidden_size must be >= 0'),
    (['--config.schedule.div_factor=0'], 'schedule.div_factor must be > 0'),
    (['--config.schedule.final_div_factor=0'], 'schedule.final_div_factor must be > 0'),
    (['--config.sparsity.attention.weight=nan'], 'sparsity.attention.weight must be a finite'),
    (['--config.prune.ratios=(0.5,1.5)'], 'prune.ratios must be a non-empty tuple'),
    (['--config.prune.ratios=()'], 'prune.ratios must be a non-empty tuple'),
    (['--config.prune.include=("[",)'], 'is not a valid regex'),
    (['--config.model.name=ViT-X_3'], 'model.name must be one of'),
    (['--config.sparsity.l1.mode=magic'], 'sparsity.l1.mode must be one of'),
    (['--config.sparsity.attention.layers=first'], 'sparsity.attention.layers'),
    (['--config.sparsity.attention.layers=(5,)'], 'sparsity.attention.layers must be block'),
    (['--config.sparsity.attention.weight=-0.1'], 'sparsity.attention.weight must be >= 0'),
    (['--config.model.image_size=15'], 'not divisible by the patch size'),
    (['--config.stages=eval'], 'init_from must name a checkpoint'),
    (['--config.stages=evaluate'], 'config stages must be some of'),
    (['--config.stages=prune,train'], 'config stages run in the order train, eval, prune; write '
     '--config.stages=train,prune'),
    (['--config.stages=train,train'], "config stages holds 'train' twice"),
    (['--config.prune.nm=4:2'], 'config prune.nm: N:M pattern \'4:2\' is not "n:m"'),
    (['--config.prune.nm=2:4,02:04'], "config prune.nm holds 2:4 twice, got '2:4,02:04'"),
    (['--config.prune.nm=1:5'], 'config prune.nm 1:5: Transformer/encoderblock_0/MlpBlock_0/'
     'Dense_0/kernel: input size 32 is not divisible by m=5'),
    (['--config.sweep.variants=baseline,magic'], 'sweep.variants must be some of'),
    (['--config.sweep.variants=baseline,attention,baseline'],
     "config sweep.variants holds 'baseline' twice"),
    (['--config.prune.ratios=(0.0,0.5,0.0)'], 'config prune.ratios holds 0.0 twice, got (0.0, '
     '0.5, 0.0) (a tuple override given twice on one command line is concatenated)'),
    (['--config.stages=eval', '--config.init_from={d}/nowhere.npz'], 'checkpoint not found'),
    (['--config.pretrained={d}/pickled.npz'], 'holds an array of Python objects'),
    (['--config.pretrained={d}/random.npz'], 'is not an .npz archive (no zip header'),
    (['--config.pretrained={d}/lfs.npz'], 'is a git-LFS pointer (134 bytes), not the weights'),
    (['--config.pretrained={d}/hf_model'], 'is a directory, not a run with checkpoints; give the '
     'weights file itself (it holds model.safetensors)'),
    (['--config.stages=eval', '--config.init_from={d}/hf_model'], 'is a directory, not a run '
     'with checkpoints; give the weights file itself (it holds model.safetensors)'),
    (['--config.stages=eval', '--config.init_from={d}/no_run'], 'no checkpoint found in'),
    pytest.param(['--config.pretrained={d}/code.pth'],
                 'Payload), which torch.load(weights_only=True) refuses: loading them could run '
                 'arbitrary code. If you trust its source', marks=needs_torch),
    (['--workdir=gs://sparse-vit-jax-no-such-bucket/run'], 'cannot reach --workdir gs://'),
    (['--config.pretrained={d}/truncated.npz'], 'truncated or not an .npz'),
    (['--config.pretrained={d}/good.npz'], 'missing parameter'),
    (['--config.pretrained={d}/weights.txt'], 'unsupported checkpoint format'),
    pytest.param(['--config.pretrained={d}/unknown_layout.pth'],
                 'unrecognised PyTorch ViT layout', marks=needs_torch),
    (['--config.data.name=cifar10', '--config.data.data_dir={d}/empty'], 'is not prepared'),
    (['--config.data.name=imagenet100'], 'data.class_list is required'),
    (['--config.data.name=imagenet100', '--config.data.class_list={d}/bad_classes.txt'],
     'is not a WordNet ID'),
    (['--config.batch_size=12'], 'not divisible by the 8'),
    (['--config.sparsity.l1.weight=0.1', '--config.sparsity.l1.include=("nothing",)'],
     "config sparsity.l1.include: parameter selection ['nothing'] matches no parameter"),
    (['--config.prune.include=("nothing/.*",)'], 'config prune.include: parameter selection'),
    (['--config.model.attention_impl=flash'], 'model.attention_impl must be one of'),
    (['--config.model.remat=everything'], 'model.remat must be one of'),
    (['--config.rng_impl=philox'], 'rng_impl must be one of'),
    (['--config.model.attention_impl=cudnn'], 'needs model.dtype=bfloat16'),
    (['--config.model.attention_impl=cudnn', '--config.model.dtype=bfloat16'],
     'needs an NVIDIA GPU'),
    (['--config.model.attention_impl=pallas'], 'pallas needs a TPU'),
    (['--config.optimizer.accumulate=9'], 'optimizer.accumulate 9 is more than num_steps 8'),
    (['--config.optimizer.accumulate=2147483648'], 'optimizer.accumulate must be < 2**31'),
    (['--config.checkpoint_timeout_s=0'], 'checkpoint_timeout_s must be > 0'),
    (['--config.sparsity.gradual.sparsity=1.0'], 'sparsity.gradual.sparsity must be in [0, 1)'),
    (['--config.sparsity.gradual.start=0.8'], 'must satisfy 0 <= start <= end <= 1'),
    (['--config.sparsity.gradual.every_steps=0'], 'sparsity.gradual.every_steps must be > 0'),
    (['--config.sparsity.gradual.sparsity=0.5', '--config.sparsity.gradual.include=("x/.*",)'],
     'config sparsity.gradual.include: parameter selection'),
    (['--config.sparsity.keep_zeros=True'], 'keeps the zeros of the starting weights: set'),
    (['--config.sparsity.keep_zeros=True', '--config.sparsity.gradual.sparsity=0.5',
      '--config.init_from={d}/w.npz'], 'choose one'),
    (['--config.checkpoint_timeout_s=2147484'], 'checkpoint_timeout_s must be <= 2147483'),
    (['--config.model.hidden_size=100000000000'], 'describe a ViT of about'),
    # 2 blocks x 2 x 32 x 1e8 weights and their SGD momentum: about 97 GiB on every device
    (['--config.model.mlp_dim=100000000'], 'the train state (parameters and optimizer state) '
     'needs 96.'),
    # 2 heads x 65,537^2 attention probabilities per image, 2 images: over 64 GiB per device
    pytest.param(['--config.model.image_size=1024'], 'the train step needs',  # compiles it
                 marks=pytest.mark.slow),
    (['positional'], 'unexpected arguments'),
    (['--workdir={d}/a_file'], 'is a file'),
    (['--config=configs/digits'], 'config file configs/digits not found'),
    (['--config={d}/syntax.py'], 'syntax.py does not load (SyntaxError: '),
    (['--config={d}/no_get.py'], 'no_get.py defines no get_config()'),
    (['--config={d}/raises.py'], 'raises.py does not load (ValueError: boom)'),
    (['--config={d}/number.py'], 'number.py: get_config() returned int 3, not a ConfigDict'),
    (['--config={d}/own.py'], 'own.py lacks the keys batch_size, checkpoint_every_steps, '
     'checkpoint_timeout_s, ...; start from sparse_vit_jax.configs.base_config()'),
]


@pytest.mark.parametrize('args,message', CATALOGUE, ids=[
    (c.values if hasattr(c, 'values') else c)[1] for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, data_dir, args, message):
    """In this process (8 CPU devices): one line, exit 2, nothing written."""
    write_bad_files(tmp_path)
    args = [a.replace('{d}', str(tmp_path)) for a in args]
    wd = None if any(a.startswith('--workdir=') for a in args) else tmp_path / 'work'
    configs = [a for a in args if a.startswith('--config=')] or SMOKE[:1]
    keys = {a.split('=')[0] for a in args}  # repeated tuple overrides would concatenate
    smoke = [a for a in SMOKE[1:] if a.split('=')[0] not in keys]
    argv = [*configs, *smoke, *[a for a in args if not a.startswith('--config=')]]
    r = main_here(wd, *argv, data_dir=data_dir, check=False)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith('error: ') and message in lines[-1], r.stderr[-2000:]
    assert len([x for x in lines if x.startswith(('error', 'Traceback', 'FATAL'))]) == 1
    if wd is not None and wd.exists():
        assert not (wd / 'results.json').exists() and not (wd / 'params.npz').exists()
        steps = [p for p in (wd / 'checkpoints').glob('*')] if (wd / 'checkpoints').exists() \
            else []
        assert not steps


def test_a_bad_heartbeat_timeout_is_one_line(tmp_path, data_dir, monkeypatch):
    """The multi-process settings come from the environment; a bad one is one line too."""
    monkeypatch.setenv('SPARSE_VIT_HEARTBEAT_TIMEOUT', '2m')
    r = main_here(tmp_path / 'w', *SMOKE, data_dir=data_dir, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: SPARSE_VIT_HEARTBEAT_TIMEOUT=2m is not a whole number of seconds >= 3; unset it "
        "for JAX's default (100)")


def test_cli_in_a_fresh_process_one_line_and_help(tmp_path, data_dir):
    """The real command line: a bad override, a config path from elsewhere, --help."""
    r = run_main(tmp_path / 'w', *SMOKE, '--config.optimizer.lr=nan', data_dir=data_dir,
                 check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith('error: config optimizer.lr must be')
    assert 'Traceback' not in r.stderr
    r = run_main(tmp_path / 'w', '--config=no/such/config.py', check=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('error: config file no/such/config.py')
    r = run_main(None, '--help', check=False)
    assert r.returncode == 0 and 'python -m sparse_vit_jax.main' in r.stdout
    r = run_main(None, '--help', module='sweep', check=False)
    assert r.returncode == 0 and 'python -m sparse_vit_jax.sweep' in r.stdout


def test_no_pickle_loading_anywhere():
    """Every np.load passes allow_pickle=False and every torch.load weights_only=True."""
    import re
    found = 0
    for path in (ROOT / 'sparse_vit_jax').rglob('*.py'):
        text = path.read_text()
        for call, safe in (('np.load', 'allow_pickle=False'), ('torch.load', 'weights_only=True')):
            for m in re.finditer(re.escape(call) + r'\(([^)]*)\)', text):
                assert safe in m.group(1), (path, m.group(0))
                found += 1
        assert 'import pickle' not in text and 'pickle.load' not in text
    assert found >= 2


def test_full_disk_is_one_line_and_leaves_old_file(tmp_path, monkeypatch, capsys):
    """A write that fails with ENOSPC: one line, exit 2, the previous file intact, no temp."""
    import errno

    from sparse_vit_jax.checkpoints.io import atomic_write_bytes
    from sparse_vit_jax.errors import run_cli

    target = tmp_path / 'results.json'
    target.write_text('previous results')
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, 'No space left on device', str(target))

    monkeypatch.setattr(os, 'fdopen', lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(SystemExit) as e:
        run_cli(atomic_write_bytes, target, b'new results')
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: cannot write') and 'No space' in err[0]
    assert target.read_text() == 'previous results'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason='mounting a small tmpfs needs root')
def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_step(tmp_path,
                                                                             data_dir):
    """A real full disk (a 300 KiB tmpfs): one line with the space needed, no temp step."""
    disk = tmp_path / 'small'
    disk.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=300k', 'tmpfs', str(disk)], check=True)
    try:
        r = main_here(disk / 'run', *RUN[:-1], '--config.num_steps=8', '--config.stages=train',
                      data_dir=data_dir, check=False)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith('error: no space left on the device of '), r.stderr[-2000:]
        assert 'MiB free' in lines[-1] and 'Traceback' not in r.stderr
        assert not [p for p in (disk / 'run' / 'checkpoints').iterdir() if not p.name.isdigit()]
    finally:
        subprocess.run(['umount', str(disk)], check=True)


def test_a_checkpoint_write_that_fails_is_one_line_and_the_run_resumes(tmp_path):
    """Orbax writes in the background; a write that the OS refuses (here a file-size limit)
    surfaces at the next save as one line with the OS's reason, removes the half-written step,
    and a re-run resumes from the last complete one (2 processes: test_multiprocess.py)."""
    script = tmp_path / 'failing_write.py'
    script.write_text(FAILING_WRITE)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / 'w')], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / 'w' / 'checkpoints'
    error, *rest = re.findall(r'said: (.*)', r.stdout)
    assert re.fullmatch(
        f'error at step 3: could not write a checkpoint to {re.escape(str(ckpt))} '
        r"\(Failed to write \d+ bytes to file \d+: File too large \[os_error_code='27'\]\); "
        'the newest complete checkpoint is step 1; fix that and re-run the same command to '
        'resume', error), error
    assert rest == [f'resuming from {ckpt} at step 1', 'saved 2']
    assert sorted(p.name for p in ckpt.iterdir()) == ['1', '2']
    # what orbax's threads, tensorstore and asyncio said about the failed write is dropped
    assert not re.search('Traceback|ERROR|Event loop|never awaited', r.stderr), r.stderr[-3000:]


def test_what_orbax_logs_is_held_until_the_writes_end_well_then_shown(tmp_path, caplog,
                                                                     monkeypatch):
    """Orbax's ERROR records wait for the Checkpointer: shown once every write ended well
    (or it closes), dropped only with a one-line write failure (tests above); other records
    pass at once."""
    import logging

    from sparse_vit_jax.train.checkpointing import HELD, Checkpointer

    # as in a process without a failed write (an in-process test before may have had one)
    monkeypatch.setattr(HELD, 'dropping', False)
    ckpt = Checkpointer(tmp_path, every_steps=1, keep=1)
    absl = logging.getLogger('absl')
    for path, msg in (('/site-packages/orbax/checkpoint/future.py', 'orbax says'),
                      ('/elsewhere/module.py', 'someone else says')):
        absl.handle(absl.makeRecord('absl', logging.ERROR, path, 1, msg, (), None))
    assert [r.getMessage() for r in caplog.records] == ['someone else says']
    ckpt.wait()
    assert [r.getMessage() for r in caplog.records] == ['someone else says', 'orbax says']
    ckpt.close()


def test_what_names_a_step_reported_damaged_is_dropped_whenever_it_comes(tmp_path):
    """asyncio logs a failed read's tasks when they are collected, which can be after the
    search for a usable step ended (seen under load in a fresh process): what names a step
    whose damage the warning line reported is dropped then too, held or late; what names
    another step is still held, to be shown."""
    import logging

    from sparse_vit_jax.train.checkpointing import _HeldWriteErrors

    held = _HeldWriteErrors()  # not installed: its filter is called directly
    held.directories.append(str(tmp_path))
    asyncio_log = logging.getLogger('asyncio')

    def task_log(step: int) -> logging.LogRecord:
        error = ValueError(f'DATA_LOSS: Error reading "w/.zarray" in OCDBT database at local '
                           f'file "{tmp_path}/checkpoints/{step}/state/"')
        return asyncio_log.makeRecord(
            'asyncio', logging.ERROR, '/usr/lib/python3/asyncio/base_events.py', 1,
            f'Task exception was never retrieved\nfuture: <Task finished exception={error!r}>',
            (), None)

    early = task_log(24)
    assert held.filter(early) is False and held.held == [early]
    held.read_failed(tmp_path / 'checkpoints' / '24')
    assert held.held == []
    held.end_reads()
    late, other = task_log(24), task_log(240)
    assert held.filter(late) is False and held.filter(other) is False
    assert held.held == [other]


def test_damaged_record_file_is_one_line_naming_it(tmp_path):
    """A prepared dataset whose record file was damaged on disk (bytes changed, size kept):
    one line that names the split and its directory and says to prepare it again."""
    from sparse_vit_jax.data.builders import Digits

    Digits(data_dir=str(tmp_path / 'tfds')).download_and_prepare()
    (record,) = (tmp_path / 'tfds').rglob('*-train.tfrecord-*')
    data = bytearray(record.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    record.write_bytes(bytes(data))
    wd = tmp_path / 'work'
    r = main_here(wd, *SMOKE, '--config.stages=train', data_dir=tmp_path / 'tfds', check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot read the prepared dataset (split 'train' in "
                           f'{record.parent}): corrupted record at '), line
    assert f'prepare it again: delete {record.parent}' in line and 'Traceback' not in r.stderr
    assert not (wd / 'params.npz').exists()
