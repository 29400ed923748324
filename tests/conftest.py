"""Test setup: 8 simulated CPU devices unless the caller chose a count."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


import pytest  # noqa: E402


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A TFDS data directory shared by a module's runs (digits is generated into it once)."""
    return tmp_path_factory.mktemp('tfds')
