"""Two JAX processes on 127.0.0.1 (gloo collectives) train exactly like one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, SMOKE, params, results, run_main

ARGS = [*SMOKE, '--config.model.dropout_rate=0.0', '--config.stages=train,eval']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
    data_dir = tmp_path / 'tfds'
    single = tmp_path / 'single'
    run_main(single, *ARGS, devices=4, data_dir=data_dir)   # 1 process x 4 devices

    multi = tmp_path / 'multi'
    port = free_port()
    procs = []
    for pid in range(2):                                     # 2 processes x 2 devices
        env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
                   JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', TFDS_DATA_DIR=str(data_dir),
                   SPARSE_VIT_COORDINATOR=f'127.0.0.1:{port}', SPARSE_VIT_NUM_PROCESSES='2',
                   SPARSE_VIT_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, '-m', 'sparse_vit_jax.main', f'--workdir={multi}', *ARGS],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
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
