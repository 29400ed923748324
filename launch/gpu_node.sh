#!/usr/bin/env bash
# Run sparse_vit_jax on one machine with several GPUs (one process sees them all).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_node.sh --workdir DIR [options] [-- CONFIG_OVERRIDES...]

  --config FILE     config file (default: configs/imagenet100.py of this checkout)
  --workdir DIR     checkpoints and results (required); re-running resumes
  --gpus N          use the first N GPUs (default: all)
  --install         first pip install this package with the CUDA build of jax
  --cuda 12|13      which CUDA build --install takes (default: 12; 13 needs driver >= 580)
  --dry-run         print the exact commands without running them
  -h, --help        this help
Relative paths (--config, --workdir, and the path keys init_from, pretrained, data.data_dir,
data.root, data.class_list) are taken from the directory you run this in.
USAGE
}

config="" workdir="" gpus="" install=0 cuda=12
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$1" "${2:-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; workdir=$2; shift 2 ;;
    --gpus) need_value "$1" "${2:-}"; gpus=$2; shift 2 ;;
    --install) install=1; shift ;;
    --cuda) need_value "$1" "${2:-}"; cuda=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$workdir" ]] || die "--workdir is required"
[[ -z "$gpus" || "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer"
[[ "$cuda" == 12 || "$cuda" == 13 ]] || die "--cuda must be 12 or 13"

repo=$(cd "$here/.." && pwd)
config=$(abspath "${config:-$repo/configs/imagenet100.py}")
workdir=$(abspath "$workdir")
absolute_overrides "${overrides[@]}"
run cd "$repo"  # every path above is absolute: the directory change cannot move them
if [[ "$install" == 1 ]]; then
  run pip install -q -e ".[cuda$cuda]"
fi
envs=()
if [[ -n "$gpus" ]]; then
  envs=(env "CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))")
fi
run "${envs[@]}" python3 -m sparse_vit_jax.main "--config=$config" "--workdir=$workdir" \
  "${OVERRIDES[@]}"
