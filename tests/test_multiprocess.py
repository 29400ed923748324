"""Two JAX processes on 127.0.0.1 (gloo collectives) train exactly like one process."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import FAILING_WRITE, ROOT, SMOKE, params, results, run_main, xla_flags

from sparse_vit_jax.train.workdir import WorkdirLock

TRAIN = [*SMOKE, '--config.model.dropout_rate=0.0', '--config.stages=train']
ARGS = [*TRAIN[:-1], '--config.stages=train,eval']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start(argv, pid, port, data_dir=None, timeout_s=None):
    """Process `pid` of 2 (2 CPU devices each) running `python argv...`."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2),
               JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
               SPARSE_VIT_COORDINATOR=f'127.0.0.1:{port}', SPARSE_VIT_NUM_PROCESSES='2',
               SPARSE_VIT_PROCESS_ID=str(pid), PYTHONFAULTHANDLER='1')
    if data_dir:
        env['TFDS_DATA_DIR'] = str(data_dir)
    if timeout_s:
        env['SPARSE_VIT_HEARTBEAT_TIMEOUT'] = str(timeout_s)
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cli(workdir, *args, module='main'):
    return ['-m', f'sparse_vit_jax.{module}', f'--workdir={workdir}', *args]


def stacks(stderr):
    """The threads' Python stacks that faulthandler printed, without its module list."""
    start = stderr.find('Fatal Python error')
    return stderr[start:].split('\nExtension modules:')[0][-8000:] if start >= 0 else stderr[-3000:]


GLOO = re.compile(r'\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of '
                  r'connected peer ranks is : \d+\n?')


def said(out):
    """The lines a script printed as print('said:', ...): gloo writes its own lines to the
    same stdout, sometimes in pieces, sometimes inside one of ours."""
    return re.findall(r'said: (.*)', GLOO.sub('', out))


def ended(procs, timeout):
    """The processes' (stdout, stderr) once each has ended, waiting up to `timeout` s for
    each. A hang ends in SIGABRT, so that the failure shows every thread's Python stack
    (PYTHONFAULTHANDLER)."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        outs = [p.communicate(timeout=60) for p in procs]
        raise AssertionError(f'not ended within {timeout} s; the stacks:\n' + '\n'.join(
            f'--- process {i} (exit {p.returncode}): {out[-1500:]}\n{stacks(err)}'
            for i, (p, (out, err)) in enumerate(zip(procs, outs)))) from None


def run_both(argv, data_dir=None, timeout=420):
    """Both processes to the end; their (stdout, stderr), each exit checked."""
    port = free_port()
    procs = [start(argv, pid, port, data_dir, timeout_s=60) for pid in range(2)]
    outs = ended(procs, timeout)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow
def test_a_weights_file_that_one_host_lacks_stops_both_in_one_line(tmp_path):
    """Both start on an empty data dir (process 0 prepares it, process 1 waits); then a
    pretrained file that exists on one host only fails process 1, and process 0, which read
    its copy, stops too with one line naming it. (Each process's path stands for one path as
    each host sees it.)"""
    import shutil
    import time
    first = tmp_path / 'first'
    run_main(first, *TRAIN, data_dir=tmp_path / 'tfds_first')
    (tmp_path / 'host_0').mkdir()
    shutil.copy(first / 'params.npz', tmp_path / 'host_0' / 'weights.npz')
    port, t0 = free_port(), time.time()
    procs = [start(cli(tmp_path / 'w', *ARGS,
                       f'--config.pretrained={tmp_path}/host_{pid}/weights.npz'), pid, port,
                   tmp_path / 'tfds', timeout_s=100) for pid in range(2)]
    outs = ended(procs, 240)
    assert [p.returncode for p in procs] == [2, 2], [o[1][-1500:] for o in outs]
    last = [err.strip().splitlines()[-1] for _, err in outs]
    assert last[0] == (f'error: process 1 could not read {tmp_path}/host_0/weights.npz (see its '
                       'error); each host reads its own copy of a weights file: put it at this '
                       'path on every host'), outs[0][1][-1500:]
    assert last[1].startswith('error: ') and 'checkpoint not found' in last[1], last[1]
    assert time.time() - t0 < 100  # well within the heartbeat timeout: nobody waited for it
    assert 'FileExistsError' not in outs[0][1] + outs[1][1]


@pytest.mark.slow
def test_a_killed_process_ends_the_other_in_one_line_before_the_heartbeat_and_resumes(tmp_path):
    """A process killed mid-training (the OOM killer, a lost host) tells no one: its silence
    ends the other after a quarter of the heartbeat timeout (`FailureWatch`), with one line and
    exit 1, before JAX's coordination service would abort it with a C++ stack; the re-run
    resumes from the last checkpoint."""
    import time
    args = [*TRAIN, '--config.num_steps=60',
            '--config.log_every_steps=1']
    run_main(tmp_path / 'first', *TRAIN, '--config.num_steps=1',
             data_dir=tmp_path / 'tfds')  # the data, prepared once
    port = free_port()
    procs = [start(cli(tmp_path / 'w', *args), pid, port, tmp_path / 'tfds', timeout_s=40)
             for pid in range(2)]
    for line in procs[0].stdout:  # process 0 prints the progress lines
        if line.startswith('step 9/'):
            break
    procs[1].kill()
    t0 = time.time()
    _, err = procs[0].communicate(timeout=150)
    waited = time.time() - t0
    assert procs[0].returncode == 1, err[-1500:]
    assert err.strip().splitlines()[-1] == (
        'error: process 1 failed (it stopped answering for 10 s: killed, out of memory or its '
        'host lost? see its log); this process stops with it: fix that and re-run the same '
        'command to resume'), stacks(err)
    assert 'Check failure' not in err and 'Terminating process' not in err, err[-3000:]
    assert 10 < waited < 20, waited  # silent 10 s, + a 1 s poll and the 5 s grace; JAX: 20-40 s
    procs[1].communicate()
    done = max(int(p.name) for p in (tmp_path / 'w' / 'checkpoints').iterdir()
               if p.name.isdigit())
    again = run_both(cli(tmp_path / 'w', *args), tmp_path / 'tfds')
    assert f'checkpoints at step {done}\n' in again[0][0], again[0][0][-2000:]
    assert 'step 60/60' in again[0][0]


# main, with a bug that raises on one process only (SPARSE_VIT_TEST_BUG_ON) at step 6
BUG_ON_ONE_PROCESS = """
import os, sys
import jax
from sparse_vit_jax import cli, main
from sparse_vit_jax.train import loop
stop = loop._stop_requested
def failing(step, *rest):
    if step == 6 and jax.process_index() == int(os.environ['SPARSE_VIT_TEST_BUG_ON']):
        raise RuntimeError(f'a bug on process {jax.process_index()} at step 6')
    return stop(step, *rest)
loop._stop_requested = failing
sys.exit(cli.run(['main.py', *sys.argv[1:]], main.job, main.__doc__))
"""


@pytest.mark.slow
@pytest.mark.parametrize('failing', [1, 0])
def test_a_bug_on_one_process_stops_the_others_in_one_line_and_the_run_resumes(
        tmp_path, monkeypatch, failing):
    """A bug inside training on one process (not an exchange: the others know nothing of it
    and wait in their next collective) ends the others within seconds with its line and its
    exit code (`FailureWatch`), not at the heartbeat timeout (100 s here) with JAX's C++
    stack; process 0, which hosts the coordination service, leaves last; the re-run resumes."""
    import time
    script = tmp_path / 'bug_on_one_process.py'
    script.write_text(BUG_ON_ONE_PROCESS)
    monkeypatch.setenv('SPARSE_VIT_TEST_BUG_ON', str(failing))
    args = [*TRAIN, '--config.num_steps=12']
    port = free_port()
    procs = [start([str(script), *cli(tmp_path / 'w', *args)[2:]], pid, port, tmp_path / 'tfds',
                   timeout_s=100) for pid in range(2)]
    other = procs[1 - failing]
    procs[failing].wait(timeout=240)
    t_failed = time.time()
    other.wait(timeout=120)
    waited = time.time() - t_failed
    outs = ended(procs, 420)
    assert [p.returncode for p in procs] == [1, 1], [stacks(o[1]) for o in outs]
    bug = f'RuntimeError: a bug on process {failing} at step 6'
    assert outs[failing][1].strip().splitlines()[-1] == bug
    assert outs[1 - failing][1].strip().splitlines()[-1] == (
        f'error: process {failing} failed ({bug}); this process stops with it: fix that and '
        're-run the same command to resume')
    # the watch polls each second and gives the process 5 s to fail by itself
    assert waited < 30, waited
    assert [p.name for p in (tmp_path / 'w' / 'checkpoints').iterdir()] == ['4']
    again = run_both(cli(tmp_path / 'w', *args), tmp_path / 'tfds')
    assert 'checkpoints at step 4\n' in again[0][0], again[0][0][-2000:]  # resumed there
    assert 'step 12/12' in again[0][0]


# main, where process 1's storage stops answering at the checkpoint of step 4: it never
# finishes that write (never reaches the barrier that ends it)
HUNG_WRITE = """
import sys, time
import jax
from sparse_vit_jax import cli, main
from sparse_vit_jax.train import checkpointing, distributed
save, barrier, hung = checkpointing.Checkpointer.save, distributed.FailFastBarrier.__call__, []
def saving(self, state, meta, *, step=None, force=False):
    if jax.process_index() == 1 and step >= 4:
        hung.append(step)
    return save(self, state, meta, step=step, force=force)
def hanging(self, *, key, timeout_ms):
    if hung:
        time.sleep(3600)
    return barrier(self, key=key, timeout_ms=timeout_ms)
checkpointing.Checkpointer.save, distributed.FailFastBarrier.__call__ = saving, hanging
sys.exit(cli.run(['main.py', *sys.argv[1:]], main.job, main.__doc__))
"""


@pytest.mark.slow
def test_a_checkpoint_write_that_hangs_on_one_host_ends_both_in_one_line_and_resumes(
        tmp_path):
    """One host's checkpoint write never ends (storage that stops answering): after
    config.checkpoint_timeout_s (8 s here; 20 minutes by default) the other host stops with
    one line, the hung one stops with it (`FailureWatch`), no partial step is left, and the
    re-run resumes from the newest complete step."""
    script = tmp_path / 'hung_write.py'
    script.write_text(HUNG_WRITE)
    args = [*TRAIN, '--config.num_steps=8', '--config.checkpoint_every_steps=2',
            '--config.checkpoint_timeout_s=8']
    port = free_port()
    procs = [start([str(script), *cli(tmp_path / 'w', *args)[2:]], pid, port, tmp_path / 'tfds',
                   timeout_s=100) for pid in range(2)]
    outs = ended(procs, 240)
    assert [p.returncode for p in procs] == [2, 2], [stacks(o[1]) for o in outs]
    ckpt = tmp_path / 'w' / 'checkpoints'
    line = (rf'could not write a checkpoint to {ckpt} \(TimeoutError: not every process '
            r'reached \S+ within 8 s \(storage that hangs or is slow\?\)\); the newest '
            r'complete checkpoint is step 2; fix that and re-run the same command to resume')
    last = [o[1].strip().splitlines()[-1] for o in outs]
    assert re.fullmatch(f'error: {line}', last[0]), last
    assert re.fullmatch(rf'error: process 0 failed \({line}\); this process stops with it: fix '
                        r'that and re-run the same command to resume', last[1]), last
    assert [p.name for p in ckpt.iterdir()] == ['2']
    again = run_both(cli(tmp_path / 'w', *args), tmp_path / 'tfds')
    assert 'checkpoints at step 2\n' in again[0][0], again[0][0][-2000:]  # resumed there
    assert 'step 8/8' in again[0][0]


@pytest.mark.slow
@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_a_signal_to_one_host_stops_both_at_the_same_step(tmp_path, sig):
    """Preemption is agreed: the process that got SIGTERM (JAX's preemption notifier), or
    Ctrl-C (passed on to that notifier), and the other one stop at one step, save its
    checkpoint together, and the re-run resumes from it."""
    port = free_port()
    # signalled at step 5, the processes agreed on step 13 or 14 (2-core CPU): 100 leaves room
    args = [*TRAIN, '--config.num_steps=100', '--config.log_every_steps=1']
    procs = [start(cli(tmp_path / 'w', *args), pid, port, tmp_path / 'tfds', timeout_s=40)
             for pid in range(2)]
    for line in procs[0].stdout:
        if line.startswith('step 5/'):
            break
    procs[1].send_signal(getattr(signal, sig))
    outs = ended(procs, 240)
    codes = [p.returncode for p in procs]
    assert codes == [3, 3], [o[1][-1500:] for o in outs]
    lines = [o[1].strip().splitlines()[-1] for o in outs]
    steps = {int(x.split('at step ')[1].split(';')[0]) for x in lines}
    assert len(steps) == 1
    stop = steps.pop()
    by = 'a stop signal to one of the processes'  # JAX's notice does not say which
    assert lines == [f'error: stopped by {b} at step {stop}; checkpoint saved, re-run the same '
                     'command to resume' for b in (by, sig if sig == 'SIGINT' else by)], lines
    assert str(stop) in {p.name for p in (tmp_path / 'w' / 'checkpoints').iterdir()}
    again = run_both(cli(tmp_path / 'w', *args), tmp_path / 'tfds')
    assert f'checkpoints at step {stop}\n' in again[0][0], again[0][0][-2000:]  # resumed there


NOTICE = """
import signal, time
import jax
jax.distributed.initialize('127.0.0.1:%d', num_processes=1, process_id=0)
from sparse_vit_jax.train.distributed import preemption_noticed
before = preemption_noticed()
signal.raise_signal(signal.SIGTERM)  # JAX's preemption notifier holds SIGTERM
deadline = time.monotonic() + 20
while not preemption_noticed() and time.monotonic() < deadline:
    time.sleep(0.1)
print('said:', before, preemption_noticed())
"""


def test_jax_leaves_its_preemption_notice_where_the_safe_points_read_it():
    """`preemption_noticed` reads a key that jaxlib's preemption notifier writes, by an
    internal name: checked with whichever jax is installed (both CI jobs)."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, '-c', NOTICE % free_port()], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert said(r.stdout) == ['False True'], (r.returncode, r.stderr[-2000:])


AGREED_CHECK = """
import signal, sys, time
import jax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.errors import Stopped
from sparse_vit_jax.train import signals
restore = signals.install(sigterm=False)
for point in ('at a first point', 'at a second point'):
    try:
        signals.check(point)
        print('said:', 'passed', point)
    except Stopped as e:
        print('said:', 'stopped', e)
        break
    if jax.process_index() == 1:  # on this host only
        signal.raise_signal(getattr(signal, sys.argv[1]))
        time.sleep(3)  # JAX's notifier posts its notice within a second
restore()
"""


@pytest.mark.slow
@pytest.mark.parametrize('sig', ['SIGINT', 'SIGTERM'])
def test_a_safe_point_stops_every_process_once_any_got_a_signal(tmp_path, sig):
    """The safe points outside the step loop (before an evaluation, between sweep cells) are
    agreed: Ctrl-C, or SIGTERM (which JAX's preemption notifier takes), on one host stops
    every process at the same point, instead of one process leaving the others in a
    collective, or none stopping."""
    script = tmp_path / 'agreed_check.py'
    script.write_text(AGREED_CHECK)
    outs = [said(out) for out, _ in run_both([str(script), sig], timeout=150)]
    end = 'at a second point; re-run the same command to resume'
    by = 'a stop signal to one of the processes'
    assert outs == [['passed at a first point', f'stopped stopped by {by} {end}'],
                    ['passed at a first point',
                     f'stopped stopped by {sig if sig == "SIGINT" else by} {end}']], outs


UNSAVED_LOOP = """
import itertools, signal, sys, time
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.errors import Stopped
from sparse_vit_jax.train import signals
from sparse_vit_jax.train.loop import LoopConfig, train_loop
from sparse_vit_jax.train.sharding import batch_sharding, make_mesh, state_shardings
from sparse_vit_jax.train.state import abstract_state, create_state
from sparse_vit_jax.train.steps import make_train_step


@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output('loss')


mesh = make_mesh()
tx, init = optax.sgd(0.1), lambda rng: {'w': jnp.zeros(4)}
shardings = state_shardings(abstract_state(init, tx), mesh, fsdp=False)
loss_fn = lambda p, b, rng, train: (jnp.mean((b['x'] @ p['w'] - b['y']) ** 2), {})
step = make_train_step(loss_fn, tx, Metrics, shardings, mesh)
restore = signals.install(sigterm=False)


def batches():
    rng = np.random.default_rng(jax.process_index())
    for i in itertools.count(1):
        if i == 3 and jax.process_index() == 1:  # while step 3's batch is read, on this host
            signal.raise_signal(getattr(signal, sys.argv[1]))
            time.sleep(3)  # JAX's notifier posts its notice within a second
        x = rng.normal(size=(8, 4)).astype(np.float32)
        yield jax.tree.map(lambda a: jax.make_array_from_process_local_data(
            batch_sharding(mesh), a), {'x': x, 'y': x.sum(1)})


try:
    train_loop(create_state(init, tx, 0, shardings), step, batches(), LoopConfig(100, 4, 16))
    print('said:', 'finished')
except Stopped as e:
    print('said:', e)
restore()
"""


@pytest.mark.slow
@pytest.mark.parametrize('sig', ['SIGINT', 'SIGTERM'])
def test_a_loop_without_checkpoints_stops_every_process_at_the_next_log_step(tmp_path, sig):
    """A loop without a checkpointer (the engine allows one) has no preemption sync
    point of orbax's: a signal to one host stops every process at the next log step, where
    they agree, instead of none."""
    script = tmp_path / 'unsaved_loop.py'
    script.write_text(UNSAVED_LOOP)
    outs = [said(out) for out, _ in run_both([str(script), sig], timeout=150)]
    end = 'at step 4; not checkpointed: a re-run redoes these steps, re-run the same command ' \
        'to resume'
    by = 'a stop signal to one of the processes'
    assert outs == [[f'stopped by {by} {end}'],
                    [f'stopped by {sig if sig == "SIGINT" else by} {end}']], outs


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
    data_dir = tmp_path / 'tfds'
    single = tmp_path / 'single'
    run_main(single, *ARGS, devices=4, data_dir=data_dir)   # 1 process x 4 devices

    multi = tmp_path / 'multi'
    outs = run_both(cli(multi, *ARGS), data_dir, timeout=600)  # 2 processes x 2 devices
    assert 'training 8 steps' in outs[0][0] and 'training' not in outs[1][0]  # process 0 logs
    assert '4 devices' in outs[0][0]

    a, b = params(single), params(multi)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=1e-5, err_msg=k)
    ev_multi, ev_single = results(multi)['eval'], results(single)['eval']
    assert ev_multi['accuracy'] == ev_single['accuracy']  # the gradient all-reduce order differs
    assert ev_multi['loss'] == pytest.approx(ev_single['loss'], rel=1e-6)  # (gloo vs in-process)

    again = tmp_path / 'reload'
    run_main(again, *SMOKE, f'--config.init_from={multi}', '--config.stages=eval',
             devices=1, data_dir=data_dir)
    assert results(again)['eval']['accuracy'] == results(multi)['eval']['accuracy']


MASKED_STATE = '''
import sys
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.pruning import keep_masks, magnitude_masks
from sparse_vit_jax.train.sharding import make_mesh, state_shardings, to_host
from sparse_vit_jax.train.state import abstract_state, create_state
mesh = make_mesh()
init = lambda rng: {'head': {'kernel': jax.random.normal(rng, (64, 32))}}
sgd = optax.sgd(0.1, momentum=0.9)
fsdp = lambda tx: state_shardings(abstract_state(init, tx), mesh, fsdp=True)
params = create_state(init, sgd, 0, fsdp(sgd)).params
masks = jax.jit(lambda p: magnitude_masks(p, 0.5))(params)
assert not masks['head']['kernel'].is_fully_addressable  # spans both hosts
tx = keep_masks(sgd, masks)
for state in (create_state(init, tx, 0, fsdp(tx), params=params),
              create_state(init, tx, 0, fsdp(tx))):
    kept = to_host(state.opt_state.masks)['head']['kernel']
    np.testing.assert_array_equal(kept, to_host(masks)['head']['kernel'])
print('masked state', jax.process_index(), kept.mean())
'''


@pytest.mark.slow
def test_a_masked_optimizer_state_over_two_hosts(tmp_path):
    """keep_masks' masks span both processes' devices: the state is created with them as
    arguments of its init program (JAX refuses such arrays as constants)."""
    script = tmp_path / 'masked_state.py'
    script.write_text(MASKED_STATE)
    outs = run_both([str(script)])
    assert [o[0].split()[-1] for o in outs] == ['0.5', '0.5']


SWEEP = ['--config=configs/digits.py', '--config.smoke=True', '--config.model.dropout_rate=0.0',
         '--config.sweep.seeds=1', '--config.sweep.variants=baseline,l1_proximal',
         '--config.prune.ratios=(0.3,0.6)', '--config.sweep.finetune_steps=2']


@pytest.mark.slow
def test_a_sweep_over_two_hosts_matches_one_and_resumes(tmp_path):
    """The whole sweep (cells, pruning, masked fine-tuning, the tables) on 2 processes x 2
    devices: the rows of 1 process x 4 devices, each file written once, by process 0; the
    rerun reads the finished cells instead of training them again."""
    import csv
    data_dir, multi = tmp_path / 'tfds', tmp_path / 'multi'
    single = run_main(tmp_path / 'single', *SWEEP, devices=4, data_dir=data_dir,
                      module='sweep')
    outs = run_both(cli(multi, *SWEEP, module='sweep'), data_dir)
    assert 'training 6 steps' in outs[0][0] and '| 0.6 |' in outs[0][0]
    assert 'training' not in outs[1][0] and '| 0.6 |' not in outs[1][0]  # process 0 reports
    assert not list(multi.rglob('*.tmp'))

    def rows(d):
        with open(d / 'results.csv') as f:
            return {(r['variant'], r['ratio']): float(r['accuracy']) for r in csv.DictReader(f)}

    want, got = rows(tmp_path / 'single'), rows(multi)
    assert set(got) == set(want) and len(got) == 2 * 5  # (unpruned, 2 ratios, +ft) x variants
    examples = int(re.search(r'on (\d+) examples', single.stdout).group(1))
    for k in want:  # the gradient all-reduce order differs (gloo vs in-process)
        assert abs(got[k] - want[k]) <= 2 / examples, k
    first = (multi / 'results.csv').read_bytes()
    again = run_both(cli(multi, *SWEEP, module='sweep'), data_dir)
    assert not re.search(r'training \d+ steps', again[0][0] + again[1][0])
    assert '[sweep] l1_proximal seed 0' in again[0][0]
    assert (multi / 'results.csv').read_bytes() == first


FINISHED_CELL = '''
import json
import sys
from pathlib import Path
import jax
from sparse_vit_jax.train.distributed import maybe_initialize
from sparse_vit_jax.multihost import from_process0
maybe_initialize()
from sparse_vit_jax.configs import base_config
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.sweep import cell_config, run_cell
me = jax.process_index()
print('said:', 'decided', from_process0(me == 0), from_process0(me == 1), from_process0(7 + me))
cfg = cell_config(base_config(), 'baseline', 0)
cell = Path(sys.argv[1]) / f'view_of_process_{me}'  # process 1 does not see the file
cell.mkdir()
if me == 0:
    (cell / 'results.json').write_text(json.dumps({'cell_config': json.loads(cfg.to_json())}))
try:
    print('said:', 'read', sorted(run_cell(cfg, cell)))
except UserError as e:
    print('said:', 'error', e)
'''


@pytest.mark.slow
def test_the_processes_take_process_0s_view_of_a_finished_cell(tmp_path):
    """Whether a sweep cell is finished is read from a file; process 0's reading is every
    process's, so that no process trains a cell the others skip (their collectives would hang).
    A process that cannot read what process 0 reads says so in one line."""
    script = tmp_path / 'finished_cell.py'
    script.write_text(FINISHED_CELL)
    outs = [said(out) for out, _ in run_both([str(script), str(tmp_path)])]
    assert [o[0] for o in outs] == ['decided 1 0 7'] * 2
    assert outs[0][1:] == ["read ['cell_config']"]
    assert len(outs[1]) == 2 and outs[1][1].startswith(
        f'error process 1 cannot read {tmp_path}/view_of_process_1/results.json, which '
        'process 0 reads;'), outs[1]


LOCAL_WORKDIRS = '''
import sys
from pathlib import Path
import jax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.workdir import WorkdirLock
root = Path(sys.argv[1])
kw = {'lease': True, 'renew_s': 0.1, 'wait_s': 3.0} if sys.argv[2] == 'lease' else {}
for name in ('shared', f'local_to_process_{jax.process_index()}', 'held'):
    try:
        with WorkdirLock(root / name, **kw):
            inside = sorted(p.name for p in (root / name).iterdir())  # process 0's is sure
            seen = [inside] if jax.process_index() == 0 else []
            print('said:', 'locked', name.split('_')[0], *seen)
    except UserError as e:
        print('said:', 'error', e)
if jax.process_index() == 0:  # the one that took them
    print('said:', 'lock files left', sorted(str(p.relative_to(root)) for p in root.rglob('.lock')))
'''


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['file', 'lease'])
def test_a_workdir_that_is_not_shared_stops_every_process_in_one_line(tmp_path, kind):
    """With several hosts each writes its checkpoint shards into the workdir: a path local to
    each host is found out before any work (the other processes read the lock process 0
    wrote), and every process stops with the same line; process 0's lock is released. A lock
    that process 0 cannot take (held by a live process) stops every process with its line.
    The same with the lease that gs:// workdirs take (here through tensorstore's file
    driver), the held one renewed by this process meanwhile."""
    script = tmp_path / 'local_workdirs.py'
    script.write_text(LOCAL_WORKDIRS)
    held = tmp_path / 'runs' / 'held'  # by a live process (this one): process 0 cannot take it
    held.mkdir(parents=True)
    error = ('error process 1 does not see the lock that process 0 wrote in '
             f'{tmp_path}/runs/local_to_process_{{}}; with several hosts --workdir must be one '
             'shared directory (gs:// or a shared filesystem), not a local path on each host')
    if kind == 'file':
        (held / '.lock').write_text(json.dumps({'host': socket.gethostname(),
                                                'pid': os.getpid()}))
        holder = contextlib.nullcontext()
        in_use = (f'error {held} is in use by process {os.getpid()} on {socket.gethostname()}; '
                  f'wait for it to end, or delete {held}/.lock if it is gone')
    else:
        holder = WorkdirLock(held, lease=True, renew_s=0.1)
        in_use = (f'error {held} is in use by process {os.getpid()} on {socket.gethostname()} '
                  '(it renewed its lock while this run waited); wait for it to end')
    with holder:
        outs = [said(out) for out, _ in run_both([str(script), str(tmp_path / 'runs'), kind],
                                                 timeout=150)]
    assert outs[0] == ["locked shared ['.lock']", error.format(0), in_use,
                       "lock files left ['held/.lock']"]
    assert outs[1] == ['locked shared', error.format(1), in_use]


# main, with the workdir's lock a lease (as on gs://), here through tensorstore's file driver
MAIN_WITH_A_LEASE = """
import functools, os, sys
from sparse_vit_jax import cli, experiment, main
from sparse_vit_jax.train import distributed
from sparse_vit_jax.train.workdir import WorkdirLock
experiment.WorkdirLock = functools.partial(WorkdirLock, lease=True, renew_s=0.2, wait_s=2.0)
if os.environ['SPARSE_VIT_PROCESS_ID'] == '1':  # a loaded host: its watch decides late
    distributed.FailureWatch = functools.partial(distributed.FailureWatch, grace_s=15.0)
sys.exit(cli.run(['main.py', *sys.argv[1:]], main.job, main.__doc__))
"""


@pytest.mark.slow
def test_a_lease_taken_over_mid_run_ends_every_process_in_one_line(tmp_path):
    """Another run takes over the lease mid-training (the lock of gs:// workdirs): process 0,
    which renews it, ends with its line, and tells the other process (`FailureWatch`), which
    ends with one line naming it, instead of JAX's abort when process 0 leaves; exit 2 both;
    the new owner's lock stays. The other process is slow to decide (15 s, as on a loaded
    host): process 0, which hosts the coordination service, waits for its word while it ticks
    (had it left first, JAX would abort the other with a C++ stack)."""
    script = tmp_path / 'main_with_a_lease.py'
    script.write_text(MAIN_WITH_A_LEASE)
    run_main(tmp_path / 'first', *TRAIN, '--config.num_steps=1',
             data_dir=tmp_path / 'tfds')  # the data, prepared once
    workdir = tmp_path / 'w'
    args = [*TRAIN, '--config.num_steps=2000',
            '--config.log_every_steps=1', '--config.checkpoint_every_steps=1000']
    port = free_port()
    procs = [start([str(script), *cli(workdir, *args)[2:]], pid, port, tmp_path / 'tfds',
                   timeout_s=100) for pid in range(2)]
    for line in procs[0].stdout:  # process 0 prints the progress lines
        if line.startswith('step 5/'):
            break
    (workdir / '.lock').write_text(json.dumps({'host': 'another-host', 'pid': 9, 'token': 3}))
    outs = ended(procs, 60)
    assert [p.returncode for p in procs] == [2, 2], [stacks(err) for _, err in outs]
    line = (f'the lock of {workdir} was taken over by process 9 on another-host, which found '
            'it not renewed; this run stops: let one run own the workdir')
    assert outs[0][1].strip().splitlines()[-1] == f'error: {line}'
    assert outs[1][1].strip().splitlines()[-1] == (
        f'error: process 0 failed ({line}); this process stops with it: fix that and re-run '
        'the same command to resume')
    assert 'step 2000/' not in outs[0][0]
    assert json.loads((workdir / '.lock').read_text())['token'] == 3


STALE_LISTING = '''
import sys
from pathlib import Path
import jax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.checkpointing import Checkpointer, restore_params
root = Path(sys.argv[1])
target = {'w': jax.ShapeDtypeStruct((2,), 'float32')}
for name in ('same', f'view_of_process_{jax.process_index()}'):
    (root / name / 'checkpoints' / '3').mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0 and name != 'same':
        (root / name / 'checkpoints' / '5').mkdir()  # a step process 1 does not list
    ckpt = Checkpointer(root / name, every_steps=1, keep=3, log=lambda _: None)
    for restore in (ckpt.restore_latest, lambda t: restore_params(root / name, t)):
        try:
            restore(target)
        except UserError as e:
            print('said:', 'error', e)
        if name == 'same':
            break  # its only step is set aside now
'''


@pytest.mark.slow
def test_processes_that_list_other_checkpoints_stop_in_one_line(tmp_path):
    """Every read ends in an exchange between the processes, so every process must take the
    same step: a process whose listing differs from process 0's stops every process with one
    line, whether it resumes a run or reads its parameters. (Where the listings agree, both
    set the same unreadable step aside.)"""
    script = tmp_path / 'stale_listing.py'
    script.write_text(STALE_LISTING)
    outs = [said(out) for out, _ in run_both([str(script), str(tmp_path)])]
    same = (f'error no usable checkpoint in {tmp_path}/same/checkpoints (all 1 damaged, moved '
            f'to {tmp_path}/same/damaged_checkpoints); re-run to start over')
    for i, (out, newest) in enumerate(zip(outs, ([5], [3]))):
        other = (f'error process 1 lists other checkpoints in {tmp_path}/view_of_process_{i}/'
                 f'checkpoints than process 0 ({2 - i} steps here, newest {newest}); re-run '
                 'when every host sees the same files')
        assert out == [same, other, other], out  # resuming a run, and reading its params


ONE_HOST_DAMAGE = '''
import sys
from pathlib import Path
import jax, jax.numpy as jnp, optax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from jax.experimental import multihost_utils
from sparse_vit_jax.train.checkpointing import Checkpointer
from sparse_vit_jax.train.sharding import make_mesh, state_shardings
from sparse_vit_jax.train.state import abstract_state, create_state, with_shardings
root = Path(sys.argv[1])
init = lambda rng: {'w': jnp.arange(8.0 * 65536).reshape(8, 65536)}  # 2 MiB: in data files
tx = optax.sgd(0.1)
shardings = state_shardings(abstract_state(init, tx), make_mesh(), fsdp=True)
log = lambda line: print('said:', line, flush=True)
ckpt = Checkpointer(root, every_steps=1, keep=3, log=log)
state = create_state(init, tx, 0, shardings)
for step in (1, 2):
    ckpt.save(state.replace(step=state.step + step), {}, force=True)
ckpt.close()
multihost_utils.sync_global_devices('saved')
if jax.process_index() == 1:  # process 1's own shards of step 2 (process 0 never reads them)
    for f in (root / 'checkpoints' / '2' / 'state' / 'ocdbt.process_1' / 'd').iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
multihost_utils.sync_global_devices('damaged')
ckpt = Checkpointer(root, every_steps=1, keep=3, log=log)
state, _ = ckpt.restore_latest(with_shardings(abstract_state(init, tx), shardings))
log(f'resumed at {int(state.step)}')
ckpt.close()
'''


@pytest.mark.slow
def test_damage_that_only_one_process_reads_is_set_aside_by_all(tmp_path):
    """Each process reads only its own shards of a step. Process 1's shards of the newest step
    are damaged: process 0 reads its part fine, yet both set the step aside and resume from the
    one before (without the exchange after reading, the processes hang in mismatched
    collectives)."""
    script = tmp_path / 'one_host_damage.py'
    script.write_text(ONE_HOST_DAMAGE)
    both = run_both([str(script), str(tmp_path / 'w')], timeout=150)
    for _, err in both:  # the warning line says it: not tensorstore's complaints about the read
        assert 'Traceback' not in err and 'Event loop' not in err, err[-2000:]
    outs = [said(out) for out, _ in both]
    ckpt = tmp_path / 'w' / 'checkpoints'
    aside = list((tmp_path / 'w' / 'damaged_checkpoints').iterdir())
    assert [p.name.split('-')[0] for p in aside] == ['2']
    assert outs[0] == [f'warning: checkpoint {ckpt}/2 is damaged (Damaged: process 1 could not '
                       f'read its part of it); moved to {aside[0]}, trying the previous one',
                       f'resuming from {ckpt} at step 1', 'resumed at 1']
    assert outs[1][0].startswith(f'warning: checkpoint {ckpt}/2 is damaged (')
    assert outs[1][1:] == outs[0][1:]


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_on_one_process_stops_both_in_one_line(tmp_path):
    """Process 1 cannot write its shards of step 2 (a file-size limit; process 0's writes
    succeed). Both stop at the next save with the same line naming process 1's error, step 2
    is not left half-written, and a re-run resumes from step 1 (with JAX's barriers, both
    would wait for orbax's timeout, 20 minutes)."""
    script = tmp_path / 'one_host_write_failure.py'
    script.write_text(FAILING_WRITE)
    both = run_both([str(script), str(tmp_path / 'w')], timeout=150)
    for _, err in both:  # orbax's and tensorstore's own reports of it are dropped
        assert not re.search('Traceback|ERROR|Event loop|never awaited', err), err[-3000:]
    outs = [said(out) for out, _ in both]
    ckpt = tmp_path / 'w' / 'checkpoints'
    error = (f'error at step 3: could not write a checkpoint to {ckpt} (process 1: Failed to '
             'write ')
    for out in outs:
        assert len(out) == 3 and out[0].startswith(error), out
        assert out[0].endswith("File too large [os_error_code='27']); the newest complete "
                               'checkpoint is step 1; fix that and re-run the same command to '
                               'resume'), out
        assert out[1:] == [f'resuming from {ckpt} at step 1', 'saved 2']
    assert sorted(p.name for p in ckpt.iterdir()) == ['1', '2']


PROCESS0_FAILS = '''
import sys
from pathlib import Path
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.configs import base_config
from sparse_vit_jax.data.pipeline import get_source
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.multihost import on_process0


def raises(e):
    def fn():
        raise e
    return fn


for fn in (lambda: 7, raises(UserError('no dataset here; prepare it')),
           raises(OSError(28, 'No space left on device'))):
    try:
        print('said:', 'result', on_process0(fn))
    except Exception as e:
        print('said:', type(e).__name__, e)
c = base_config().data  # an ImageNet-100 folder that is neither prepared nor there
c.name, c.source, c.data_dir = 'imagenet100', 'folder', sys.argv[1]
c.root, c.class_list = sys.argv[1] + '/no_such_folder', sys.argv[1] + '/classes.txt'
try:
    get_source(c)
except UserError as e:
    print('said:', 'UserError', e)
'''


@pytest.mark.slow
def test_work_that_fails_on_process_0_stops_every_process_in_one_line(tmp_path):
    """Process 0 alone writes results and prepares datasets; when that fails, the others
    stop at once with its line (instead of waiting in their next collective until the
    heartbeat timeout)."""
    script = tmp_path / 'process0_fails.py'
    script.write_text(PROCESS0_FAILS)
    (tmp_path / 'classes.txt').write_text('n01440764\nn01443537\n')
    outs = [said(out) for out, _ in run_both([str(script), str(tmp_path)], timeout=150)]
    data = (f'UserError imagenet100 is not prepared in {tmp_path} and config.data.root='
            f"'{tmp_path}/no_such_folder' is not a folder; point it at "
            'root/{train,val}/<wnid>/*.JPEG')
    assert outs[0] == ['result 7', 'UserError no dataset here; prepare it',
                       'OSError [Errno 28] No space left on device', data]
    assert outs[1] == ['result None', 'UserError no dataset here; prepare it',
                       'UserError process 0 failed (OSError: [Errno 28] No space left on '
                       'device)', data]


UNSEEN_RUN = '''
import sys
from pathlib import Path
import jax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.configs import base_config
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.experiment import resolve_numerics
c = base_config()
c.model.numerics = 'auto'  # read from the run that init_from names
c.init_from = str(Path(sys.argv[1]) / f'view_of_process_{jax.process_index()}')
try:
    print('said:', 'numerics', resolve_numerics(c))
except UserError as e:
    print('said:', 'error', e)
'''


@pytest.mark.slow
def test_a_run_that_one_process_does_not_see_stops_every_process(tmp_path):
    """Whether init_from is a run (its checkpoints, read collectively) or a weights file (read
    by each process) is process 0's reading: process 1, which does not see the run, still
    takes the run's path through the collectives, and both stop with one line (instead of
    process 1 going on alone while process 0 waits for it)."""
    import jax.numpy as jnp
    import optax

    from sparse_vit_jax.train.checkpointing import Checkpointer
    from sparse_vit_jax.train.state import create_state

    init = lambda rng: {'w': jnp.zeros(2)}  # noqa: E731
    ckpt = Checkpointer(tmp_path / 'view_of_process_0', every_steps=1, keep=1)
    ckpt.save(create_state(init, optax.sgd(0.1), 0, None), {'numerics': 'timm'}, force=True)
    ckpt.close()
    script = tmp_path / 'unseen_run.py'
    script.write_text(UNSEEN_RUN)
    outs = [said(out) for out, _ in run_both([str(script), str(tmp_path)], timeout=150)]
    sees = {0: ('view_of_process_0/checkpoints', '1 steps here, newest [0]'),
            1: ('view_of_process_1', '0 steps here, newest []')}
    for i, (where, steps) in sees.items():
        assert outs[i] == [f'error process 1 lists other checkpoints in {tmp_path}/{where} than '
                           f'process 0 ({steps}); re-run when every host sees the same files']
