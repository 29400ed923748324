"""The benchmarks run in a tiny configuration so they cannot rot; no speed is asserted."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import xla_flags

ROOT = Path(__file__).resolve().parents[1]
# Runs a script (argv[1:]) with some installed packages hidden, as if they were not there:
# the top-level modules in $HIDDEN from the import system's path finder (an import fails, and
# a probe such as importlib.util.find_spec answers None) and the distributions in
# $HIDDEN_DISTS from importlib.metadata (which PyTorch asks for optree's version).
HIDING = '''
import importlib.machinery, os, re, runpy, sys
finder, env = importlib.machinery.PathFinder, os.environ
find_spec, find_distributions = finder.find_spec, finder.find_distributions
modules, dists = set(env['HIDDEN'].split()), set(env['HIDDEN_DISTS'].split())
def spec(cls, name, path=None, target=None):
    return None if name.partition('.')[0] in modules else find_spec(name, path, target)
def distributions(*args, **kwargs):
    return (d for d in find_distributions(*args, **kwargs)
            if re.sub(r'[-_.]+', '-', d.metadata['Name'] or '').lower() not in dists)
finder.find_spec, finder.find_distributions = classmethod(spec), staticmethod(distributions)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.mark.slow
@pytest.mark.parametrize('script,expect', [
    ('pruning.py', r'\| 0\.5 \|'),
    ('input_pipeline.py', r'\| 32 \| \d+ \|(.|\n)*\| inception_crop \| \d+ \| \d+ \|'),
    ('train_step.py', r'\| testing \| 32 \| 4 \|'),
    # gpu_check.sh's code, here on the CPU with only what the GPU machine has (no TensorFlow):
    # every variant timed, then past its compile budget
    ('gpu_check.py --variants all',
     r'\| 8 \| cuDNN LayerNorm \| \d+\.\d \|(.|\n)*\| 32 \| paper, remat dots \| \d(.|\n)*'
     r'profile: paper @ 8, 2 steps traced(.|\n)*\| \d+\.\d\d \| \w'),
    ('gpu_check.py --budget-s 0', r'\| 8 \| paper \| \d+\.\d \|(.|\n)*\| 8 \| masks \| skipped'),
    ('profile_step.py', 'page faults/step'),
    ('compile_time.py', r'\| testing@32 \| 2 \| \d+\.\d \| \d+\.\d \|'),
])
def test_benchmark_tiny(script, expect):
    script, *extra = script.split()
    env = dict(os.environ, XLA_FLAGS=xla_flags(1),
               TF_CPP_MIN_LOG_LEVEL='3')
    env.pop('JAX_PLATFORMS')  # JAX's own choice, as by hand: the CPU, libtpu left unstarted
    hide = []
    if script == 'gpu_check.py':
        modules, dists = not_on_the_gpu_machine()
        assert {'tensorflow', 'tensorflow_datasets'} <= set(modules) and 'clu' not in modules
        env.update(HIDDEN=' '.join(modules), HIDDEN_DISTS=' '.join(dists))
        hide = ['-c', HIDING]
    r = subprocess.run([sys.executable, *hide, str(ROOT / 'benchmarks' / script), *extra,
                        '--tiny'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(expect, r.stdout) and '# python' in r.stdout, r.stdout[-3000:]
    assert 'TPU_WORKER_HOSTNAMES' not in r.stderr, r.stderr[-3000:]


# What the GPU machine has (../shared/environment-notes.md), with their own dependencies.
GPU_MACHINE = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'torch',
               'transformers')


def not_on_the_gpu_machine() -> tuple[list[str], list[str]]:
    """The installed top-level modules and distributions that neither the GPU machine's
    packages (and what they require) nor the wheels that gpu_check.sh's header downloads
    provide: TensorFlow and TFDS among them."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    header = (ROOT / 'benchmarks' / 'gpu_check.sh').read_text().split('pip download')[1]
    wheels = re.findall(r'([\w.-]+)==', header.split('\n# (')[0])
    assert 'clu' in wheels, header
    have, todo = set(), [canonicalize_name(n) for n in GPU_MACHINE]
    while todo:
        name = todo.pop()
        if name in have:
            continue
        have.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [canonicalize_name(r.name) for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate({'extra': ''})]
    have |= {canonicalize_name(w) for w in wheels} | {'sparse-vit-jax'}
    modules = sorted(m for m, dists in metadata.packages_distributions().items()
                     if not any(canonicalize_name(d) in have for d in dists))
    return modules, sorted({canonicalize_name(d.metadata['Name'] or '')
                            for d in metadata.distributions()} - have)


def test_gpu_check_plan_lowers_each_program_once():
    """gpu_check.plan: the targets' rows first; programs that differ only in XLA's compile
    options share one lowering (tracing a ViT-B/16 step takes seconds on the GPU machine)."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from gpu_check import DEFAULT_VARIANTS, REMAT, TARGET_ROWS, VARIANTS, plan
    from trainer import load_config
    base = load_config('configs/imagenet100.py', True)
    jobs = plan(base, [8, 16], [32], [64], tuple(VARIANTS))
    assert [j.name for j in jobs[:4]] == list(TARGET_ROWS)
    assert [(j.batch, j.name) for j in jobs[4:7]] == [(16, 'paper'), (32, 'paper'), (64, REMAT)]
    with_options = [j for j in jobs if j.options]
    assert len(with_options) == 4 and {j.key for j in with_options} == {jobs[0].key}
    assert len({j.key for j in jobs}) == len(jobs) - 4
    short = plan(base, [8], [], [], ('masks', 'flax dropout'))
    assert [j.name for j in short] == ['masks', 'flax dropout']
    assert short[1].config.model.dropout_impl == 'flax' and base.model.dropout_impl == 'auto'
    assert [j.name for j in plan(base, [8], [], [])] == list(DEFAULT_VARIANTS)


def test_gpu_check_makes_one_state_program_per_distinct_state():
    """gpu_check.Programs: each step is handed to the compiler as soon as it is lowered, the
    program making its fresh state after it; variants whose states are alike (the penalty off,
    an XLA option) share one, the mask-keeping optimizer's differs; options-only variants
    share the lowering; past the deadline a step is skipped unlowered unless it is a must."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import gpu_check
    from trainer import load_config

    from sparse_vit_jax.train.sharding import make_mesh

    class Recorded(gpu_check.Programs):
        def compile(self, job, must=False):
            self.futures.append((job.name, must))

    base = load_config('configs/imagenet100.py', True)
    jobs = gpu_check.plan(base, [8], [], [], ('paper', 'no penalty', 'masks', 'cuBLAS GEMMs'))
    programs = Recorded(make_mesh(), deadline=float('inf'), workers=1)
    for j in jobs:
        programs.step(j, must=j is jobs[0])
    paper, plain, masks, gemms = jobs
    assert programs.futures == [('paper', True), ('state init 1', True), ('no penalty', False),
                                ('masks', False), ('state init 2', True), ('cuBLAS GEMMs', False)]
    assert paper.init is plain.init is gemms.init and masks.init is not paper.init
    assert gemms.lowered is paper.lowered and plain.lowered is not paper.lowered
    late = Recorded(make_mesh(), deadline=0.0, workers=1)
    skipped, kept = gpu_check.plan(base, [8], [], [], ('no penalty', 'masks'))
    late.step(skipped)
    late.step(kept, must=True)
    assert skipped.status == 'skipped' and skipped.lowered is None
    assert kept.lowered is not None and late.futures[0] == ('masks', True)


def test_gpu_check_times_the_others_when_one_step_fails():
    """gpu_check.alternate: a step that raises (on its first call, or later) is dropped with
    its error; the others are called every round and timed."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from gpu_check import alternate

    calls = {'ok': 0, 'first': 0, 'third': 0}

    def step(name, fails_at):
        def run():
            calls[name] += 1
            if calls[name] == fails_at:
                raise RuntimeError(f'{name} refused\nmore')
            time.sleep(0.02)
            return 0.01  # seconds "dispatching"
        return run

    seconds, host, failed = alternate({'ok': step('ok', 0), 'first': step('first', 1),
                                       'third': step('third', 3)}, reps=4)
    assert set(seconds) == {'ok'} and 0.02 <= seconds['ok'] < 0.2
    assert set(host) == {'ok'} and 0.05 < host['ok'] <= 0.5
    assert {k: str(e) for k, e in failed.items()} == {'first': 'first refused\nmore',
                                                      'third': 'third refused\nmore'}
    assert calls == {'ok': 5, 'first': 1, 'third': 3}


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu is not installed (its wheels are for Linux x86-64 only)')
@pytest.mark.slow  # compiles the whole train step with libtpu's compiler
def test_the_train_step_compiles_for_a_tpu():
    """benchmarks/tpu_compile.py --tiny: the trainer's step with XLA's and with the Pallas
    attention, compiled by libtpu for 4 TPU v5e chips (Mosaic compiles the Pallas kernel); no
    TPU needed."""
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'tpu_compile.py'), '--tiny'],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = re.findall(r'^\| (xla|pallas) \| none \| flax \| tanh \| 8 \| compiles \|.*\| [\d.]+ \|'
                      r' [\d.]+ \|$', r.stdout, re.M)
    assert rows == ['xla', 'pallas'] and 'TPU v5 lite x4' in r.stdout, r.stdout[-3000:]


def test_the_train_step_compiles_for_a_gpu_or_says_what_it_needs():
    """benchmarks/gpu_compile.py --tiny: with JAX's CUDA plugin (no GPU), the trainer's step
    compiles for an H200 (the GELU in its GPU form), its one block before the penalised last one
    fused by cuDNN, forward and backward, and remat 'full' (only) runs that forward twice;
    without the plugin (CI), one line that names the install."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from gpu_compile import has_cuda_plugin
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_compile.py'), '--tiny'],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    if not has_cuda_plugin():
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
            'error: compiling for an NVIDIA GPU needs the CUDA plugin: pip install '
            '"jax[cuda12]" or "jax[cuda13]" (about 6 GB; no GPU is needed)'), r.stderr[-2000:]
        return
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = r'^\| cudnn \| (\w+) \| rbg \| hash \| sigmoid \| 8 \| compiles \|.*\| (\d / \d) \|'
    fused = dict(re.findall(row, r.stdout, re.M))
    assert fused == {'none': '1 / 1', 'dots': '1 / 1', 'full': '2 / 1'}, r.stdout[-3000:]
    assert re.search(r'^\| xla \| none \| rbg \| hash \| sigmoid \| 8 \| compiles \|.*\| 0 / 0 \|',
                     r.stdout, re.M)


def test_device_profile_reads_a_gpu_trace():
    """benchmarks/profile_step.device_ops on a GPU-shaped Chrome trace (as jax.profiler writes
    one on a GPU): stream lines only (the derived 'XLA Ops' line would count twice), kernels
    classified by name, per step, joined with the HLO op's jax op (for a kernel inside a
    command buffer, through its own name: XLA's fusion kernels are named after their HLO)."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from profile_step import device_ops

    def meta(kind, pid, name, tid=0):
        return {'ph': 'M', 'name': kind, 'pid': pid, 'tid': tid, 'args': {'name': name}}

    def kernel(tid, name, us, op=''):
        return {'ph': 'X', 'pid': 2, 'tid': tid, 'ts': 0, 'dur': us, 'name': name,
                'args': {'hlo_op': op} if op else {}}

    events = [meta('process_name', 1, '/host:CPU'), meta('process_name', 2, '/device:GPU:0'),
              meta('thread_name', 2, 'Stream #7(Compute)', 7),
              meta('thread_name', 2, 'XLA Ops', 9),
              {'ph': 'X', 'pid': 1, 'tid': 1, 'ts': 0, 'dur': 5000, 'name': 'python'}]
    for _ in range(2):  # two steps
        events += [kernel(7, 'nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT', 300, 'custom-call.3'),
                   kernel(7, 'cudnn_generated_fort_native_sdpa_sm90_flash_fprop', 100,
                          'custom-call.7'),
                   kernel(7, 'loop_add_fusion_2', 50, 'fusion.2'),
                   kernel(7, 'input_reduce_fusion', 30, 'fusion.9'),
                   kernel(7, 'memcpy32_post', 20),
                   kernel(7, 'loop_convert_select_fusion_11', 40, 'command_buffer_383'),
                   kernel(9, 'custom-call.3', 300, 'custom-call.3')]
    hlo = {'custom-call.3': ('bf16[4608,2304]', 'jvp(VisionTransformer)/encoderblock_3/qkv'),
           'loop_convert_select_fusion.11': ('bf16[32,577,3072]',
                                             'jvp(VisionTransformer)/encoderblock_5/select_n')}
    out = device_ops(events, hlo, steps=2, top=4)
    assert out['busy_ms'] == pytest.approx(0.54)
    assert dict(out['kinds']) == pytest.approx({
        'matmul': 0.3, 'attention (fused)': 0.1, 'other fusion': 0.09,
        'reduction fusion': 0.03, 'memcpy / memset': 0.02})  # 'convert' is no convolution
    ms, calls, name, op, jax_op = out['top'][0]
    assert (ms, calls, op) == (pytest.approx(0.3), 1, 'custom-call.3')
    assert name.startswith('nvjet') and jax_op.endswith('encoderblock_N/qkv')
    assert out['top'][3][3:] == ('loop_convert_select_fusion.11',
                                 'jvp(VisionTransformer)/encoderblock_N/select_n')
    assert device_ops(events[:1] + events[4:5], hlo, 2, 3) is None  # no device: a CPU trace
    from profile_step import fusion_bandwidth
    assert fusion_bandwidth(out['kinds'], {'by_kind': {'fusion': 0.2, 'custom-call': 9}}) == (
        "XLA's fusions: 0.2 GB/step by the HLO (a floor), 0.12 ms/step, 1.67 TB/s")


def test_memory_traffic_counts_what_each_kernel_reads_and_writes():
    """benchmarks/profile_step.memory_traffic: every kernel of the entry computation reads its
    operands and writes its result once (bytes from the shapes); parameters, tuples,
    get-tuple-element and bitcasts are no kernels, nor is a library call's scratch space
    traffic. On a program XLA compiled here and on a GPU-shaped module (a multi-output fusion,
    a library call with its scratch, a Triton GEMM)."""
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from profile_step import memory_traffic
    x = jax.ShapeDtypeStruct((256, 1024), jnp.float32)
    text = jax.jit(lambda x, y: (x * 2 + y).sum(axis=1)).lower(x, x).compile().as_text()
    out = memory_traffic(text, top=1)
    assert out['kernels'] == 1 and out['gb'] * 1e9 == 2 * 256 * 1024 * 4 + 256 * 4
    assert out['top'][0][1:] == (1, 'fwd reduce_sum')
    gpu = '''HloModule step
ENTRY %main (p0: bf16[64,128], p1: bf16[128,32]) -> f32[64,32] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,32]{1,0} parameter(1)
  %f = (bf16[64,128]{1,0}, pred[64,128]{1,0}) fusion(%p0), kind=kLoop, metadata={op_name="A"}
  %g = bf16[64,128]{1,0} get-tuple-element(%f), index=0
  %b = bf16[8192]{0} bitcast(%g)
  %mm = (bf16[64,32]{1,0}, s8[1024]{0}) custom-call(%g, %p1), metadata={op_name="B"}
  %h = bf16[64,32]{1,0} get-tuple-element(%mm), index=0
  %t = bf16[64,64]{1,0} fusion(%h, %h), kind=kCustom, backend_config={"kind":"__triton_gemm"}
  ROOT %r = f32[64,32]{1,0} convert(%h)
}
'''.replace('A', 'jit(step)/jvp(ViT)/Transformer/encoderblock_3/Dropout_0/select_n').replace(
        'B', 'jit(step)/transpose(jvp(ViT))/Transformer/encoderblock_7/Dense_0/dot_general')
    out = memory_traffic(gpu, top=4)
    fused = 64 * 128 * 2 + 64 * 128 * 2 + 64 * 128  # reads p0; writes bf16 and pred
    matmul = 64 * 128 * 2 + 128 * 32 * 2 + 64 * 32 * 2  # its result; not its s8 scratch
    convert = 64 * 32 * 2 + 64 * 32 * 4
    triton = 2 * 64 * 32 * 2 + 64 * 64 * 2
    assert out['kernels'] == 4 and out['gb'] * 1e9 == fused + matmul + convert + triton
    assert {k: gb * 1e9 for k, gb in out['by_kind'].items()} == {
        'fusion': fused, 'custom-call': matmul, 'convert': convert, 'matmul fusion': triton}
    assert {op: gb * 1e9 for gb, _, op in out['top']} == {
        'fwd Transformer/encoderblock_N/Dropout_0/select_n': fused,
        'bwd Transformer/encoderblock_N/Dense_0/dot_general': matmul, 'convert': convert,
        'fusion': triton}  # no op_name: its kind


def test_memory_traffic_counts_an_in_place_update_as_its_update():
    """A fusion whose root is a dynamic-update-slice (XLA runs it in place) moves the
    updated region, read and written, not the whole buffer; other fusions are unchanged."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from profile_step import memory_traffic
    hlo = '''HloModule step

%fused_dynamic_update_slice (param_0.1: bf16[4,64,8]) -> bf16[4,64,8] {
  %param_0.1 = bf16[4,64,8]{2,1,0} parameter(0)
  %constant_1 = bf16[] constant(0)
  %broadcast.2 = bf16[4,47,8]{2,1,0} broadcast(%constant_1), dimensions={}
  %constant_3 = s32[] constant(0)
  %constant_4 = s32[] constant(17)
  ROOT %dynamic-update-slice.5 = bf16[4,64,8]{2,1,0} dynamic-update-slice(%param_0.1, \
%broadcast.2, %constant_3, %constant_4, %constant_3)
}

%fused_negate (param_0.2: bf16[4,64,8]) -> bf16[4,64,8] {
  %param_0.2 = bf16[4,64,8]{2,1,0} parameter(0)
  ROOT %negate.6 = bf16[4,64,8]{2,1,0} negate(%param_0.2)
}

ENTRY %main (p0: bf16[4,64,8]) -> bf16[4,64,8] {
  %p0 = bf16[4,64,8]{2,1,0} parameter(0)
  %u = bf16[4,64,8]{2,1,0} fusion(%p0), kind=kLoop, calls=%fused_dynamic_update_slice
  ROOT %n = bf16[4,64,8]{2,1,0} fusion(%u), kind=kLoop, calls=%fused_negate
}
'''
    out = memory_traffic(hlo)
    assert out['kernels'] == 2
    assert out['gb'] * 1e9 == 2 * 4 * 47 * 8 * 2 + 2 * 4 * 64 * 8 * 2
