#!/usr/bin/env bash
# Run sparse_vit_jax on one machine with several GPUs (one process sees them all).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_node.sh --workdir DIR [options] [-- CONFIG_OVERRIDES...]

  --config FILE     config file (default: configs/imagenet100.py)
  --workdir DIR     checkpoints and results (required); re-running resumes
  --gpus N          use the first N GPUs (default: all)
  --install         first pip install 'jax[cuda12]' and this package
  --dry-run         print the exact commands without running them
  -h, --help        this help
USAGE
}

config="configs/imagenet100.py" workdir="" gpus="" install=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$1" "${2:-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; workdir=$2; shift 2 ;;
    --gpus) need_value "$1" "${2:-}"; gpus=$2; shift 2 ;;
    --install) install=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$workdir" ]] || die "--workdir is required"
[[ -z "$gpus" || "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer"

cd "$here/.."
if [[ "$install" == 1 ]]; then
  run pip install -q 'jax[cuda12]'
  run pip install -q -e .
fi
envs=()
if [[ -n "$gpus" ]]; then
  envs=(env "CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))")
fi
run "${envs[@]}" python3 -m sparse_vit_jax.main "--config=$config" "--workdir=$workdir" \
  "${overrides[@]}"
