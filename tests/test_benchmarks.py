"""The benchmarks run in a tiny configuration so they cannot rot; no speed is asserted."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize('script,expect', [
    ('pruning.py', r'\| 0\.5 \|'),
    ('input_pipeline.py', r'\| 32 \| \d+ \|(.|\n)*\| inception_crop \| \d+ \| \d+ \|'),
    ('train_step.py', r'\| testing \| 32 \| 4 \|'),
    # gpu_check.sh's code, here on the CPU: every variant timed, then past its compile budget
    ('gpu_check.py', r'\| 8 \| cuBLASLt \| \d+\.\d \|(.|\n)*\| 32 \| paper, remat dots \| \d'),
    ('gpu_check.py --budget-s 0', r'\| 8 \| paper \| \d+\.\d \|(.|\n)*\| 8 \| masks \| skipped'),
    ('profile_step.py', 'page faults/step'),
    ('compile_time.py', r'\| testing@32 \| 2 \| \d+\.\d \| \d+\.\d \|'),
])
def test_benchmark_tiny(script, expect):
    script, *extra = script.split()
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               TF_CPP_MIN_LOG_LEVEL='3')
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *extra, '--tiny'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(expect, r.stdout) and '# python' in r.stdout, r.stdout[-3000:]
