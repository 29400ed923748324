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
from typing import Any

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


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a command the tests start: `devices` CPU devices and the flags this
    process compiles with (conftest.py)."""
    return ' '.join([f'--xla_force_host_platform_device_count={devices}',
                     os.environ.get('SPARSE_VIT_TEST_XLA_FLAGS', '')]).strip()


def run_main(workdir: Path | None, *args: str, devices: int = 1, data_dir: Path | None = None,
             check: bool = True, timeout: int = 600, module: str = 'main') -> Result:
    """`python -m sparse_vit_jax.<module>` in a fresh process with `devices` CPU devices."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
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


def tensorboard_scalars(root: Path) -> dict[tuple[int, str], float]:
    """{(step, tag): value} of every event file under `root`, read with TensorFlow's reader."""
    import tensorflow as tf
    out = {}
    for f in root.rglob('events.out.tfevents.*'):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                out[(e.step, v.tag)] = float(tf.make_ndarray(v.tensor))
    return out


def pool_keys(flat: dict[str, np.ndarray]) -> list[str]:
    """The names of a flat parameter dict that the paper's pruning pool selects."""
    from sparse_vit_jax.selection import PAPER_POOL, select
    return [k for k, chosen in select({k: np.zeros(()) for k in flat}, PAPER_POOL).items()
            if chosen]


# The last process alone cannot write files over 100 kB from its second checkpoint on; it
# says what the Checkpointer reports, then resumes and saves once more without the limit.
FAILING_WRITE = '''
import resource, signal, sys
from pathlib import Path
import jax, jax.numpy as jnp, optax
from sparse_vit_jax.train.distributed import maybe_initialize
maybe_initialize()
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train.checkpointing import Checkpointer
from sparse_vit_jax.train.sharding import make_mesh, state_shardings
from sparse_vit_jax.train.state import abstract_state, create_state, with_shardings
root = Path(sys.argv[1])
init = lambda rng: {'w': jnp.arange(8.0 * 65536).reshape(8, 65536)}  # 1 MiB per process
tx = optax.sgd(0.1)
shardings = state_shardings(abstract_state(init, tx), make_mesh(), fsdp=True)
step = jax.jit(lambda s: s.replace(step=s.step + 1, params=jax.tree.map(
    lambda w: w + jnp.mean(w), s.params)))  # a collective, as a train step has
log = lambda line: print('said:', line, flush=True)
ckpt = Checkpointer(root, every_steps=1, keep=3, log=log)
state = step(create_state(init, tx, 0, shardings))
ckpt.save(state, {})
ckpt.wait()
if jax.process_index() == jax.process_count() - 1:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    for _ in range(3):  # step 2 fails in the background; the next save says so
        state = step(state)
        ckpt.save(state, {})
    ckpt.close()
except UserError as e:
    log(f'error at step {int(state.step)}: {e}')
    ckpt.close()
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
ckpt = Checkpointer(root, every_steps=1, keep=3, log=log)
state, _ = ckpt.restore_latest(with_shardings(abstract_state(init, tx), shardings))
ckpt.save(step(state), {})
ckpt.close()
log(f'saved {int(state.step) + 1}')
'''


@dataclass
class FakeDevice:
    """A described device (what a JAX device reports), for the choices and checks made for
    GPUs and TPUs that no machine here has."""

    platform: str
    device_kind: str
    compute_capability: str = ''
    stats: dict[str, Any] | None = None

    def memory_stats(self) -> dict[str, Any] | None:
        return self.stats
