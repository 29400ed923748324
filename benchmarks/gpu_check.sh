#!/usr/bin/env bash
# The GPU check (one NVIDIA GPU; meant to take under 6 minutes, which the README says where
# it was measured): the trainer's jitted step for
# configs/imagenet100.py (ViT-B/16 at 384 px, bf16, fused attention, the paper's penalty) on
# synthetic batches, its variants, the largest batch that fits, and PyTorch's step alternated
# with it; images/s and MFU against a bf16 matmul peak measured in the same run
# (benchmarks/gpu_check.py says what each row is). No TensorFlow is needed.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh [RESULTS.json [FLAGS...]]
# (FLAGS go to gpu_check.py: --tiny runs the same code on the testing ViT, on any device;
# --variants all adds the rows measured once, see the README.) Its lines are printed as they
# happen, with the check's clock; a filter in a pipe must pass them on at once
# (grep --line-buffered), or a run stopped by a time limit loses them.
# A machine without ml-collections or clu (and wrapt, which clu imports) takes them as
# pure-Python wheels in .whl/, downloaded where there is a package index:
#   python3 -m pip download --no-deps --only-binary=:all: --platform any --implementation py \
#       --abi none --python-version 3.12 -d .whl ml-collections==1.1.0 clu==0.0.12 wrapt==2.5.2
# (tests/test_benchmarks.py checks that the check needs nothing else beyond jax, flax, optax,
# orbax-checkpoint, torch, transformers and their own dependencies.)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  # A pure-Python wheel is a zip of what installing it puts on the path: no pip needed.
  rm -rf /tmp/sparse_vit_site
  for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" /tmp/sparse_vit_site; done
  export PYTHONPATH=/tmp/sparse_vit_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! missing=$(python3 -c 'import ml_collections, clu.metrics' 2>&1); then
  echo "error: ${missing##*$'\n'}: bring the wheels that benchmarks/gpu_check.sh's header" \
       "names in .whl/" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Both frameworks share the device: JAX must not preallocate 75% of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
# A rerun on the same machine finds its programs compiled in the persistent cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/sparse_vit_jax_xla_cache}
timeout 350 python3 benchmarks/gpu_check.py --budget-s 160 ${1:+--json "$1"} "${@:2}"
