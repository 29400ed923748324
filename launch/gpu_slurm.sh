#!/usr/bin/env bash
# Submit sparse_vit_jax to Slurm: one task per node, each task drives that node's GPUs.
# jax.distributed.initialize() reads the Slurm environment itself.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_slurm.sh --nodes N --workdir DIR [options] [-- CONFIG_OVERRIDES...]

  --nodes N           number of nodes (required)
  --gpus-per-node G   GPUs per node (default: 8)
  --partition P       Slurm partition
  --time HH:MM:SS     time limit (default: 24:00:00)
  --config FILE       config file (default: configs/imagenet100.py of this checkout)
  --workdir DIR       shared directory for checkpoints and results (required)
  --dry-run           print the sbatch command without submitting it
  -h, --help          this help
Re-submitting the same command after a preemption resumes from the workdir. Relative paths
(--config, --workdir, and the path keys init_from, pretrained, data.data_dir, data.root,
data.class_list) are taken from the directory you run this in.
USAGE
}

nodes="" gpn=8 partition="" limit="24:00:00" config="" workdir=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need_value "$1" "${2:-}"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" "${2:-}"; gpn=$2; shift 2 ;;
    --partition) need_value "$1" "${2:-}"; partition=$2; shift 2 ;;
    --time) need_value "$1" "${2:-}"; limit=$2; shift 2 ;;
    --config) need_value "$1" "${2:-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; workdir=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer"
[[ "$gpn" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer"
[[ -n "$workdir" ]] || die "--workdir is required (on a filesystem every node shares)"

repo=$(cd "$here/.." && pwd)
config=$(abspath "${config:-$repo/configs/imagenet100.py}")
workdir=$(abspath "$workdir")
absolute_overrides "${overrides[@]}"
extra=()
[[ -n "$partition" ]] && extra=(--partition "$partition")
run sbatch --job-name sparse_vit --nodes "$nodes" --ntasks-per-node 1 \
  --gpus-per-node "$gpn" --time "$limit" --output "slurm-%j.out" "${extra[@]}" \
  --wrap "cd $(quote "$repo") && srun $(main_command "$config" "$workdir" "${OVERRIDES[@]}")"
