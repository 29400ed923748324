"""The workdir lock on an object store: a lease through tensorstore's conditional writes,
checked here through tensorstore's file driver (the gs:// driver takes the same calls)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT

from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.workdir import WorkdirLock, _Lease

FAST = {'lease': True, 'renew_s': 0.1, 'wait_s': 1.0}


def lock_file(workdir):
    return json.loads((workdir / '.lock').read_text())


def write_lock(workdir, **owner):
    (workdir / '.lock').write_text(json.dumps(owner))


def test_gs_workdirs_take_a_lease_and_local_ones_a_file():
    assert WorkdirLock('gs://bucket/runs/a')._lease is not None
    assert WorkdirLock('/tmp/runs/a')._lease is None


def test_a_renewed_lease_is_refused_and_a_released_one_taken_at_once(tmp_path):
    notes = []
    with WorkdirLock(tmp_path, **FAST) as held:
        owner = lock_file(tmp_path)
        assert owner['pid'] == os.getpid() and owner['token'] > 0
        first = owner['renewed']
        t0 = time.monotonic()
        with pytest.raises(UserError, match=f'is in use by process {os.getpid()} on '
                           f'{socket.gethostname()} \\(it renewed its lock'):
            WorkdirLock(tmp_path, notes.append, **FAST).__enter__()
        assert time.monotonic() - t0 < FAST['wait_s']  # seen renewed, not waited out
        assert lock_file(tmp_path)['renewed'] > first
        assert held.held
    assert not (tmp_path / '.lock').exists()  # released
    t0 = time.monotonic()
    with WorkdirLock(tmp_path, notes.append, **FAST):
        assert time.monotonic() - t0 < FAST['wait_s']  # not watched: watching takes wait_s
    assert len(notes) == 1 and 'waiting up to 1 s' in notes[0]


def test_a_lease_nobody_renews_is_taken_over_after_watching_it(tmp_path):
    write_lock(tmp_path, host='another-host', pid=1, token=7, renewed=time.time())
    notes = []
    t0 = time.monotonic()
    with WorkdirLock(tmp_path, notes.append, **FAST):
        assert time.monotonic() - t0 >= FAST['wait_s']
        assert lock_file(tmp_path)['pid'] == os.getpid()
    assert notes[-1] == ('note: taking over the lock of process 1 on another-host (not '
                         'renewed in 1 s)')


@pytest.mark.parametrize('whose', ['stale', 'orphaned'])
def test_a_stale_or_orphaned_lease_is_taken_at_once(tmp_path, whose):
    """A lease last written long ago by its own clock, or by a process of this host that has
    ended, needs no watching."""
    if whose == 'stale':
        owner = {'host': 'another-host', 'pid': 1, 'renewed': time.time() - 901}
        why = '(last renewed 90'  # 901 or 902 s ago by now
    else:
        ended = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                               capture_output=True, text=True).stdout
        owner = {'host': socket.gethostname(), 'pid': int(ended), 'renewed': time.time()}
        why = 'its process is gone'
    write_lock(tmp_path, **owner)
    notes = []
    t0 = time.monotonic()
    with WorkdirLock(tmp_path, notes.append, **FAST):
        assert time.monotonic() - t0 < FAST['wait_s']  # not watched: watching takes wait_s
    assert len(notes) == 1 and why in notes[0] and 'taking over' in notes[0]


def test_runs_that_start_together_get_one_lease(tmp_path, monkeypatch):
    """Four runs all read the lock as absent before any writes it: one write wins."""
    won, refused, first_read = [], [], set()
    barrier, read = threading.Barrier(4, timeout=20), _Lease.read

    def read_together(self):
        got = read(self)
        if threading.get_ident() not in first_read:
            first_read.add(threading.get_ident())
            barrier.wait()
        return got

    monkeypatch.setattr(_Lease, 'read', read_together)

    def take():
        lock = WorkdirLock(tmp_path, lambda _: None, **FAST)
        try:
            lock.__enter__()
        except UserError as e:
            refused.append(str(e))
            return
        won.append(lock)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    assert lock_file(tmp_path)['token'] == won[0].token
    won[0].__exit__()
    assert not (tmp_path / '.lock').exists()


def test_a_run_whose_lease_is_taken_over_learns_it_and_leaves_the_new_lock(tmp_path):
    lost = []
    with WorkdirLock(tmp_path, on_lost=lost.append, **FAST):
        write_lock(tmp_path, host='another-host', pid=9, token=3, renewed=time.time())
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lost == [f'the lock of {tmp_path} was taken over by process 9 on another-host, '
                    'which found it not renewed; this run stops: let one run own the workdir']
    assert lock_file(tmp_path)['token'] == 3  # the new owner's lock stays


LOSES_ITS_LEASE = '''
import sys, time
from sparse_vit_jax.train.workdir import WorkdirLock, _Lease
with WorkdirLock(sys.argv[1], lease=True, renew_s=0.1, wait_s=1.0):
    print('held', flush=True)
    time.sleep(30)
print('never here')
'''


def test_by_default_a_run_whose_lease_is_taken_over_exits_with_one_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, '-c', LOSES_ITS_LEASE, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == 'held\n'
    t0 = time.monotonic()
    write_lock(tmp_path, host='another-host', pid=9, token=3, renewed=time.time())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and time.monotonic() - t0 < 5 and out == ''
    assert err.strip().splitlines() == [
        f'error: the lock of {tmp_path} was taken over by process 9 on another-host, which '
        'found it not renewed; this run stops: let one run own the workdir']
    assert lock_file(tmp_path)['token'] == 3
