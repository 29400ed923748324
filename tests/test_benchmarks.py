"""The benchmarks run in a tiny configuration so they cannot rot; no speed is asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize('script,expect', [
    ('pruning.py', '| 0.5 |'),
    ('input_pipeline.py', '| 32 |'),
    ('train_step.py', '| testing | 32 | 4 |'),
    ('gpu_check.py', '| 8 | unsafe_rbg |'),  # gpu_check.sh's code, here on the CPU
    ('profile_step.py', 'page faults/step'),
])
def test_benchmark_tiny(script, expect):
    script, *extra = script.split()
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               TF_CPP_MIN_LOG_LEVEL='3')
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *extra, '--tiny'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert expect in r.stdout and '# python' in r.stdout
