"""Host settings: the two CPU speed fixes change speed only (same random bits, same results,
memory kept), and the commands start without other libraries' noise."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import config_file

from sparse_vit_jax import cli
from sparse_vit_jax.cli import step_activation_bytes
from sparse_vit_jax.configs import base_config
from sparse_vit_jax.errors import UserError
from sparse_vit_jax.train import host_memory
from sparse_vit_jax.train.cpu_threefry import threefry2x32

ROOT = Path(__file__).resolve().parents[1]

# Random123's known-answer vectors for Threefry-2x32 with 20 rounds: key, counter -> output.
KAT = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
       ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
       ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0))]


def test_threefry_matches_random123_known_answers():
    u = np.uint32
    for key, ctr, out in KAT:
        got = threefry2x32(u(key[0]), u(key[1]), np.array([ctr[0]], u), np.array([ctr[1]], u))
        assert (int(got[0][0]), int(got[1][0])) == out


_DRAWS = '''
import json, sys, numpy as np, jax
if sys.argv[1] == 'unrolled':
    from sparse_vit_jax.train.cpu_threefry import use_unrolled_threefry_on_cpu
    use_unrolled_threefry_on_cpu()
from jax.extend.random import threefry_2x32
k = jax.random.key(7)
draws = dict(
    bits=jax.random.bits(k, (301, 7)),
    dropout=jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (64, 33)))(jax.random.fold_in(k, 3)),
    normal=jax.random.normal(jax.random.split(k)[1], (257,)),
    kat=threefry_2x32(np.array([0x13198a2e, 0x03707344], np.uint32),
                      np.array([0x243f6a88, 0x85a308d3], np.uint32)))
hlo = jax.jit(lambda k: jax.random.bits(k, (8,))).lower(k).as_text()
print(json.dumps({'loop': 'while' in hlo,
                  **{n: np.asarray(v).astype(np.int64).tolist() for n, v in draws.items()}}))
'''


def _draws(mode):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    r = subprocess.run([sys.executable, '-c', _DRAWS, mode], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_unrolled_lowering_draws_the_same_bits_as_jax():
    default, unrolled = _draws('default'), _draws('unrolled')
    assert default.pop('loop') and not unrolled.pop('loop')  # the lowering really changed
    assert default == unrolled
    assert unrolled['kat'] == [0xc4923a9c, 0x483df7a0]


def test_host_malloc_mode_from_environment(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, 'system')
    assert host_memory.retain_freed_memory() is False
    monkeypatch.setenv(host_memory.ENV, 'bogus')
    with pytest.raises(UserError, match='auto, retain or system'):
        host_memory.retain_freed_memory()
    monkeypatch.setenv(host_memory.ENV, 'retain')
    assert host_memory._wanted(1)
    monkeypatch.setenv(host_memory.ENV, 'auto')
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    big, small = host_memory.AUTO_MIN_STEP_BYTES, host_memory.AUTO_MIN_STEP_BYTES - 1
    assert host_memory._wanted(None) and host_memory._wanted(big)
    assert not host_memory._wanted(small)
    monkeypatch.setenv('JAX_PLATFORMS', 'tpu')
    assert not host_memory._wanted(big)


class _Hardware:
    """Stands in for jax/_src/hardware_utils.py: what is attached."""

    def __init__(self, tpus=0, nvidia=False, amd=0):
        self.tpus, self.nvidia, self.amd = tpus, nvidia, amd

    def num_available_tpu_chips_and_device_id(self):
        return self.tpus, None

    def has_visible_nvidia_gpu(self):
        return self.nvidia

    def num_available_amd_gpus(self, stop_at=None):
        return self.amd


def test_auto_keeps_memory_where_a_plugin_has_no_device(monkeypatch):
    """libtpu (the test extra) or a CUDA plugin on a CPU machine leaves JAX on the CPU, so
    the heavy steps run on the host: keep its memory there, not where a device is attached."""
    monkeypatch.delenv('JAX_PLATFORMS', raising=False)
    monkeypatch.setenv(host_memory.ENV, 'auto')
    monkeypatch.setattr(host_memory, '_accelerator_plugin_installed', lambda: True)
    for attached, want in [(_Hardware(), True), (_Hardware(tpus=4), False),
                           (_Hardware(nvidia=True), False), (_Hardware(amd=1), False),
                           (None, False)]:  # no checks to ask: assume an accelerator
        monkeypatch.setattr(host_memory, '_jax_hardware_utils', lambda a=attached: a)
        assert host_memory._wanted(None) is want, attached and vars(attached)
    monkeypatch.setattr(host_memory, '_accelerator_plugin_installed', lambda: False)
    monkeypatch.setattr(host_memory, '_jax_hardware_utils', lambda: _Hardware(nvidia=True))
    assert host_memory._wanted(None)  # a GPU without a plugin: JAX runs on the CPU


_BACKEND = """
import sys
from sparse_vit_jax.train import host_memory
hw = host_memory._jax_hardware_utils()
loaded_jax = 'jax' in sys.modules
wanted = host_memory._wanted(None)
import jax
print(hw is not None, loaded_jax, wanted, jax.default_backend())
"""


def test_auto_foresees_jax_backend_with_jax_own_checks():
    """The checks are JAX's real ones, read without importing jax (whose import starts a
    thread, and the malloc options precede every thread), and foresee the backend it picks."""
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
    env[host_memory.ENV] = 'auto'
    r = subprocess.run([sys.executable, '-c', _BACKEND], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    found, loaded_jax, wanted, backend = r.stdout.split()[-4:]
    assert (found, loaded_jax) == ('True', 'False')
    assert wanted == str(backend == 'cpu'), (wanted, backend)


def test_tpu_backend_is_left_out_only_without_chips_and_without_a_choice(monkeypatch):
    from jax._src import hardware_utils, xla_bridge

    def registration():
        return xla_bridge.BackendRegistration(factory=lambda: None, priority=300)

    monkeypatch.delenv('JAX_PLATFORMS', raising=False)
    monkeypatch.delenv('JAX_FORCE_TPU_INIT', raising=False)
    for chips, env, left_out in [(0, {}, True), (4, {}, False),
                                 (0, {'JAX_PLATFORMS': 'cpu'}, False),
                                 (0, {'JAX_FORCE_TPU_INIT': '1'}, False)]:
        tpu = registration()
        factories = {'cpu': registration(), 'tpu': tpu}
        monkeypatch.setattr(xla_bridge, '_backend_factories', factories)
        monkeypatch.setattr(hardware_utils, 'num_available_tpu_chips_and_device_id',
                            lambda c=chips: (c, None))
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert cli.skip_tpu_without_chips() is left_out, (chips, env)
        # Left out: still registered (a platform JAX knows), its factory failing quietly.
        assert (factories['tpu'] is not tpu) is left_out and 'cpu' in factories
        if left_out:
            assert factories['tpu'].fail_quietly and factories['tpu'].priority == 300
            with pytest.raises(RuntimeError, match='no TPU chip on this host'):
                factories['tpu'].factory()

    def broken():
        raise OSError('no PCI bus here')
    factories = {'cpu': registration(), 'tpu': (tpu := registration())}
    monkeypatch.setattr(xla_bridge, '_backend_factories', factories)
    monkeypatch.setattr(hardware_utils, 'num_available_tpu_chips_and_device_id', broken)
    assert cli.skip_tpu_without_chips() is False and factories['tpu'] is tpu  # a failing check


_TPU_NOISE = """
import sys
from sparse_vit_jax import cli
skipped = cli.skip_tpu_without_chips() if sys.argv[1] == 'skip' else None
import flax.linen  # imported after the skip: registers lowering rules for TPUs
import jax
print(skipped, jax.default_backend())
"""


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu is not installed (its wheels are for Linux x86-64 only)')
def test_commands_on_a_host_without_tpu_chips_do_not_start_libtpu():
    """With libtpu installed (the test extra) and no TPU chip, JAX would start libtpu, which
    prints errors about TPU hosts before JAX falls back to the CPU; the commands skip it."""
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
    out = {}
    for mode in ('skip', 'jax'):
        r = subprocess.run([sys.executable, '-c', _TPU_NOISE, mode], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[mode] = r.stdout.split()[-2:], r.stderr
    assert out['skip'][0] == ['True', 'cpu'] and out['jax'][0] == ['None', 'cpu']
    assert 'TPU_WORKER_HOSTNAMES' in out['jax'][1]  # what the skip is for (else: test nothing)
    assert 'TPU' not in out['skip'][1], out['skip'][1][-2000:]


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu is not installed (its wheels are for Linux x86-64 only)')
def test_export_and_convert_do_not_start_libtpu_either(tmp_path):
    """The weights commands use JAX too (masks, shapes): on a host without TPU chips they
    skip libtpu as main does, and still do their work."""
    from sparse_vit_jax.checkpoints import flatten
    from sparse_vit_jax.checkpoints.io import save_npz
    from sparse_vit_jax.models import create_model, init_params
    src = tmp_path / 'testing.npz'
    params = init_params(create_model('testing', num_classes=10), 32)
    save_npz(src, {k: np.asarray(v) for k, v in flatten(params).items()})
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
    for cmd in (['export', str(src), str(tmp_path / 'out'), '--format', 'npz', '--prune', '0.5'],
                ['convert', str(src), str(tmp_path / 'converted.npz'), '--model', 'testing']):
        r = subprocess.run([sys.executable, '-m', f'sparse_vit_jax.{cmd[0]}', *cmd[1:]],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0 and r.stdout.startswith('wrote '), r.stderr[-2000:]
        assert 'TPU' not in r.stderr, r.stderr[-2000:]


def test_import_noise_is_left_out_and_other_output_passed_on(tmp_path, monkeypatch, capfd):
    """Lines with a noise string written to file descriptor 2 during an import are dropped,
    the others kept, also when the import fails; TF_CPP_MIN_LOG_LEVEL=0 keeps them all."""
    for name, tail in (('noisy_ok', ''), ('noisy_bad', 'raise ValueError("broken")\n')):
        (tmp_path / f'{name}.py').write_text(
            'import os\n'
            f'os.write(2, b"I port.cc] NOISE one\\nreal warning from {name}\\nNOISE two\\n")\n'
            + tail)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
    cli.import_quietly('noisy_ok', noise=('NOISE',))
    with pytest.raises(ValueError, match='broken'):
        cli.import_quietly('noisy_bad', noise=('NOISE',))
    err = capfd.readouterr().err
    assert err == 'real warning from noisy_ok\nreal warning from noisy_bad\n', err
    monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '0')
    sys.modules.pop('noisy_ok')
    cli.import_quietly('noisy_ok', noise=('NOISE',))
    assert capfd.readouterr().err.count('NOISE') == 2


@pytest.mark.slow  # two fresh TensorFlow imports: ~20 s
def test_tensorflow_imports_without_its_info_lines():
    """TensorFlow prints info lines at import that TF_CPP_MIN_LOG_LEVEL does not reach (on
    some x86-64 hosts: oneDNN's, each twice; on others none); the commands' import leaves
    them out and passes every other line on (the filter itself, on a module that prints
    them everywhere: test_import_noise_is_left_out_and_other_output_passed_on)."""
    code = ('import os, sys; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"\n'
            'from sparse_vit_jax import cli\n'
            'if sys.argv[1] == "quiet": cli.import_quietly("tensorflow")\n'
            'else: import tensorflow')
    err = {}
    for mode in ('plain', 'quiet'):
        r = subprocess.run([sys.executable, '-c', code, mode], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        err[mode] = r.stderr
    others = [x for x in err['plain'].splitlines() if not any(n in x for n in cli.IMPORT_NOISE)]
    assert not any(n in err['quiet'] for n in cli.IMPORT_NOISE), err['quiet']
    assert len(err['quiet'].splitlines()) == len(others), (err['quiet'], err['plain'])


def test_auto_keeps_memory_for_vit_steps_not_for_the_digits_default():
    digits = config_file('digits')
    vit = base_config()
    vit.model.name, vit.model.image_size, vit.batch_size = 'ViT-Ti_16', 224, 32
    # ~2.3 GB of temporaries measured for this step (benchmarks/profile_step.py, strace)
    assert 1.5e9 < step_activation_bytes(vit) < 3e9
    assert step_activation_bytes(digits) < host_memory.AUTO_MIN_STEP_BYTES


_REUSE = '''
import ctypes, ctypes.util, resource
from sparse_vit_jax.train.host_memory import retain_freed_memory
applied = retain_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_fresh_256mb():  # plain malloc, as XLA:CPU allocates (numpy asks for huge pages)
    p = libc.malloc(256 * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 1, 256 * 2**20)  # touch every page
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(p)
    return after - before
faults_of_fresh_256mb()
print(applied, faults_of_fresh_256mb())  # the second block reuses the first one's pages if kept
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc options')
def test_retained_memory_is_reused_without_page_faults():
    env = dict(os.environ, **{host_memory.ENV: 'retain'})
    r = subprocess.run([sys.executable, '-c', _REUSE], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    applied, faults = r.stdout.split()
    assert applied == 'True'
    assert int(faults) < 655  # < 1% of the 65,536 pages of 4 KiB: freed memory was kept


@pytest.mark.slow
def test_main_runs_with_host_memory_kept(tmp_path, monkeypatch, data_dir):
    """The trainer, TF input threads included, under the single-arena malloc settings."""
    from helpers import SMOKE, main_here, results, run_main
    monkeypatch.setenv(host_memory.ENV, 'retain')
    out = run_main(tmp_path, *SMOKE, '--config.stages=train,eval', data_dir=data_dir).stdout
    assert 'freed host memory is kept' in out
    assert results(tmp_path)['eval']['examples'] == 360
    monkeypatch.setenv(host_memory.ENV, 'auto')  # a smoke step is small: nothing kept
    out = main_here(tmp_path / 'auto', *SMOKE, '--config.stages=train', data_dir=data_dir).stdout
    assert 'freed host memory' not in out
