"""Running the main command in a fresh process, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SMOKE = ['--config=configs/digits.py', '--config.model.name=testing',
         '--config.model.hidden_size=32', '--config.model.num_layers=2',
         '--config.model.num_heads=2', '--config.model.mlp_dim=64',
         '--config.batch_size=16', '--config.eval_batch_size=40', '--config.num_steps=8',
         '--config.checkpoint_every_steps=4', '--config.log_every_steps=4',
         '--config.prune.ratios=0.5', '--config.optimizer.name=sgd', '--config.optimizer.lr=0.1',
         '--config.schedule.warmup_steps=2']
ROOT = Path(__file__).resolve().parents[1]


def run_main(workdir: Path, *args: str, devices: int = 1, data_dir: Path | None = None,
             check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
    if data_dir is not None:
        env['TFDS_DATA_DIR'] = str(data_dir)
    r = subprocess.run([sys.executable, '-m', 'sparse_vit_jax.main', f'--workdir={workdir}',
                        *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f'exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return r


def results(workdir: Path) -> dict:
    return json.loads((workdir / 'results.json').read_text())


def params(workdir: Path) -> dict[str, np.ndarray]:
    with np.load(workdir / 'params.npz') as f:
        return {k: f[k] for k in f.files}
