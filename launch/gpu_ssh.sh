#!/usr/bin/env bash
# Run sparse_vit_jax on several GPU machines over ssh: one process per host, started together.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_ssh.sh --hosts H1,H2,... --workdir DIR [options] [-- CONFIG_OVERRIDES...]

  --hosts LIST      comma-separated hosts; the first is the coordinator (required)
  --port PORT       coordinator port (default: 12355)
  --remote-dir DIR  checkout of this repository on every host (default: this path)
  --config FILE     config file (default: configs/imagenet100.py of the checkout)
  --workdir DIR     shared directory (or gs://) for checkpoints and results (required)
  --dry-run         print the exact commands without running them
  -h, --help        this help
Each host gets SPARSE_VIT_COORDINATOR, SPARSE_VIT_NUM_PROCESSES, SPARSE_VIT_PROCESS_ID.
Relative paths (--config, --workdir, and the path keys init_from, pretrained, data.data_dir,
data.root, data.class_list) are made absolute against the directory you run this in: the
hosts are expected to share that filesystem.
USAGE
}

hosts="" port=12355 remote="" config="" workdir=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) need_value "$1" "${2:-}"; hosts=$2; shift 2 ;;
    --port) need_value "$1" "${2:-}"; port=$2; shift 2 ;;
    --remote-dir) need_value "$1" "${2:-}"; remote=$2; shift 2 ;;
    --config) need_value "$1" "${2:-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; workdir=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$hosts" ]] || die "--hosts is required"
[[ "$hosts" =~ ^[^,[:space:]]+(,[^,[:space:]]+)*$ ]] ||
  die "--hosts must be host names separated by single commas, got '$hosts'"
[[ -n "$workdir" ]] || die "--workdir is required"
[[ "$port" =~ ^[0-9]+$ && "$port" -lt 65536 ]] || die "--port must be a port number"
remote=${remote:-$(cd "$here/.." && pwd)}
config=$(abspath "${config:-$remote/configs/imagenet100.py}")
workdir=$(abspath "$workdir")
absolute_overrides "${overrides[@]}"
IFS=, read -r -a host_list <<< "$hosts"
n=${#host_list[@]}
pids=()
for i in "${!host_list[@]}"; do
  h=${host_list[$i]}
  cmd="cd $(quote "$remote") && SPARSE_VIT_COORDINATOR=$(quote "${host_list[0]}:$port") \
SPARSE_VIT_NUM_PROCESSES=$n SPARSE_VIT_PROCESS_ID=$i $(main_command "$config" "$workdir" "${OVERRIDES[@]}")"
  run ssh "$h" "$cmd" > >(sed "s/^/[$h] /") 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
