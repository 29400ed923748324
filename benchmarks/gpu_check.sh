#!/usr/bin/env bash
# One short GPU check (under 5 minutes): ViT-B/16@384 bf16 train step (batch 32), images/s and
# MFU (analytic FLOPs over a bf16 matmul peak measured in the same run) for ours with XLA
# attention and with model.attention_impl=cudnn, and PyTorch's step (HF ViT, SDPA) beside them.
# No TensorFlow needed: batches are synthetic and live on the device. Never run yet (no GPU lent).
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "torch", torch.__version__)'
timeout 280 python3 benchmarks/train_step.py --gpu --reps 10
