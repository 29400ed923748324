"""Running the commands as a user would: in this process, or in a fresh one where a process
boundary is the point (kills, signals, several processes, device counts other than 8)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

try:  # the independent PyTorch references; the [torch] extra (the main CI job has it)
    import torch
    import transformers
except ImportError:
    torch = transformers = None
needs_torch = pytest.mark.skipif(
    torch is None, reason='PyTorch reference: install the [torch] extra (the main CI job has it)')

SMOKE = ['--config=configs/digits.py', '--config.model.name=testing',
         '--config.model.hidden_size=32', '--config.model.num_layers=2',
         '--config.model.num_heads=2', '--config.model.mlp_dim=64',
         '--config.batch_size=16', '--config.eval_batch_size=40', '--config.num_steps=8',
         '--config.checkpoint_every_steps=4', '--config.log_every_steps=4',
         '--config.prune.ratios=(0.5,)', '--config.optimizer.name=sgd',
         '--config.optimizer.lr=0.1', '--config.schedule.warmup_steps=2']
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_main(workdir: Path | None, *args: str, devices: int = 1, data_dir: Path | None = None,
             check: bool = True, timeout: int = 600, module: str = 'main') -> Result:
    """`python -m sparse_vit_jax.<module>` in a fresh process with `devices` CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
    if data_dir is not None:
        env['TFDS_DATA_DIR'] = str(data_dir)
    wd = [f'--workdir={workdir}'] if workdir is not None else []
    r = subprocess.run([sys.executable, '-m', f'sparse_vit_jax.{module}', *wd, *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f'exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return Result(r.returncode, r.stdout, r.stderr)


def main_here(workdir: Path | None, *args: str, data_dir: Path | None = None,
              check: bool = True, module: str = 'main') -> Result:
    """The same command in this process (8 CPU devices, see conftest.py)."""
    import importlib

    from sparse_vit_jax import cli
    mod = importlib.import_module(f'sparse_vit_jax.{module}')
    args = list(args)
    if data_dir is not None:  # an override must follow its config file
        where = [i for i, a in enumerate(args) if a.startswith('--config=')]
        if not where:
            raise ValueError('main_here: data_dir needs a --config=FILE argument to follow')
        args.insert(where[0] + 1, f'--config.data.data_dir={data_dir}')
    argv = [f'{module}.py', *([f'--workdir={workdir}'] if workdir is not None else []), *args]
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.run(argv, mod.job, mod.__doc__)
    finally:
        os.chdir(cwd)
    r = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f'exit {code}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return r


def config_file(name: str):
    """configs/<name>.py's `get_config()`, the file loaded by path as `--config=` loads it."""
    spec = importlib.util.spec_from_file_location(f'config_{name}', ROOT / 'configs' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (remat, custom_vjp, pjit...)."""
    from jax.extend import core as jcore
    for e in jaxpr.eqns:
        yield e
        for sub in jcore.jaxprs_in_params(e.params):
            yield from equations(sub)


def results(workdir: Path) -> dict:
    return json.loads((workdir / 'results.json').read_text())


def params(workdir: Path) -> dict[str, np.ndarray]:
    with np.load(workdir / 'params.npz') as f:
        return {k: f[k] for k in f.files}
