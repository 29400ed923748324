"""Test setup: 8 simulated CPU devices unless the caller chose a count, one persistent
JAX compilation cache for the whole run (this process and the commands it starts), so the
many runs of the same small models compile once, and one temporary directory (TMPDIR) for
the commands it starts, removed at the end: a command the tests kill leaves TensorFlow's
autograph files behind, which its normal exit would have removed."""

import atexit
import os
import shutil
import tempfile

# XLA's CPU code generation at LLVM's -O0: the tests' small programs compile several times
# faster, which matters more than how fast they run. It changes no HLO pass (what the tests of
# compiled programs read); the commands the tests start get the same flag (helpers.xla_flags),
# so their results can be compared bit for bit with this process's.
if 'XLA_FLAGS' not in os.environ:
    os.environ.setdefault('SPARSE_VIT_TEST_XLA_FLAGS', '--xla_backend_optimization_level=0')
    os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=8 '
                               + os.environ['SPARSE_VIT_TEST_XLA_FLAGS'])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'SPARSE_VIT_TEST_TMPDIR' not in os.environ:  # pytest's own tmp_path stays where it was
    _tmp = tempfile.mkdtemp(prefix='sparse-vit-jax-tests-')
    atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
    os.environ['SPARSE_VIT_TEST_TMPDIR'] = os.environ['TMPDIR'] = _tmp
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(
        os.environ['SPARSE_VIT_TEST_TMPDIR'], 'jax-cache')
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


import pytest  # noqa: E402


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A TFDS data directory shared by a module's runs (digits is generated into it once)."""
    return tmp_path_factory.mktemp('tfds')
