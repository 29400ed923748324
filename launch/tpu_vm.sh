#!/usr/bin/env bash
# Run sparse_vit_jax on a Cloud TPU VM slice: create, set up, run, fetch, delete.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh ACTION --name NAME --zone ZONE [options] [-- CONFIG_OVERRIDES...]

Actions:
  create   create the TPU VM (queued resource for v5e/v6e, tpu-vm create for v4)
  setup    copy this checkout's source tree to every worker; install the package with jax[tpu]
  run      run the main job on all workers at once, streaming their logs
  fetch    copy results.{json,csv} and the plot from --workdir to ./results/NAME/
  delete   delete the TPU VM (and its queued resource)
  all      create, setup, run, fetch, delete

Options:
  --name NAME            TPU VM name (required)
  --zone ZONE            e.g. us-west4-a (required)
  --project PROJECT      gcloud project (default: gcloud's configured one)
  --accelerator TYPE     v5litepod-8 (default), v6e-8, v4-8, ...
  --runtime VERSION      TPU runtime (default: per accelerator family)
  --spot                 spot / preemptible capacity
  --config FILE          config file inside this checkout (default: configs/imagenet100.py)
  --workdir URL          gs://bucket/run: checkpoints and results (required for run/fetch)
  --dry-run              print the exact commands without running them
  -h, --help             this help
Everything after -- is passed to the main command (e.g. --config.batch_size=64); paths in it
(init_from, pretrained, data.data_dir, data.root, data.class_list) must be gs:// URLs or
absolute paths on the workers.
Re-running 'run' after a preemption resumes from the workdir's checkpoints.
USAGE
}

action=${1:-}
[[ "$action" == -h || "$action" == --help ]] && { usage; exit 0; }
[[ -n "$action" ]] || die "missing ACTION (see --help)"
shift
name="" zone="" project="" accel="v5litepod-8" runtime="" spot=0
config="" workdir=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$1" "${2:-}"; name=$2; shift 2 ;;
    --zone) need_value "$1" "${2:-}"; zone=$2; shift 2 ;;
    --project) need_value "$1" "${2:-}"; project=$2; shift 2 ;;
    --accelerator) need_value "$1" "${2:-}"; accel=$2; shift 2 ;;
    --runtime) need_value "$1" "${2:-}"; runtime=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --config) need_value "$1" "${2:-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; workdir=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ "$name" =~ ^[a-z][-a-z0-9]*$ ]] || die "--name must be lowercase letters, digits and '-'"
case "$action" in create|setup|run|fetch|delete|all) ;; *) die "unknown action $action" ;; esac
case "$accel" in
  v5litepod-*|v5e-*) family=v5e; runtime=${runtime:-v2-alpha-tpuv5-lite} ;;
  v6e-*) family=v6e; runtime=${runtime:-v2-alpha-tpuv6e} ;;
  v4-*) family=v4; runtime=${runtime:-tpu-ubuntu2204-base} ;;
  *) die "unsupported --accelerator $accel (v5litepod-N, v6e-N or v4-N)" ;;
esac
if [[ "$action" == run || "$action" == fetch || "$action" == all ]]; then
  [[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// URL that every worker can reach"
fi
repo=$(cd "$here/.." && pwd)
# The workers run from their copy of the source tree: the config is named relative to it.
config_path=$(abspath "${config:-$repo/configs/imagenet100.py}")
[[ -f "$config_path" || "$action" == create || "$action" == delete ]] ||
  die "--config $config not found (from $PWD)"
[[ "$config_path" == "$repo"/* ]] ||
  die "--config $config is outside this checkout ($repo); only the checkout reaches the workers"
config=${config_path#"$repo"/}
for a in "${overrides[@]}"; do
  if [[ "$a" =~ ^--config\.($PATH_KEYS)=([^/].*)$ && "${BASH_REMATCH[2]}" != *://* ]]; then
    die "$a: the workers cannot see local relative paths; give a gs:// URL or an absolute path"
  fi
done
# What setup copies: the package and what installs and runs it; no virtualenv, runs or data.
SOURCE_TREE=(sparse_vit_jax configs launch setup.py pyproject.toml README.md)

gc=(gcloud)
[[ -n "$project" ]] && gc+=(--project "$project")

create() {
  if [[ "$family" == v4 ]]; then
    local extra=()
    [[ "$spot" == 1 ]] && extra=(--preemptible)
    run "${gc[@]}" compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "$accel" --version "$runtime" "${extra[@]}"
  else
    local extra=()
    [[ "$spot" == 1 ]] && extra=(--spot)
    run "${gc[@]}" compute tpus queued-resources create "$name-qr" --node-id "$name" \
      --zone "$zone" --accelerator-type "$accel" --runtime-version "$runtime" "${extra[@]}"
  fi
}

on_all() {  # on_all COMMAND: run a shell command on every worker at once
  run "${gc[@]}" compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

setup() {
  local sources=()
  for f in "${SOURCE_TREE[@]}"; do sources+=("$repo/$f"); done
  on_all "mkdir -p ~/sparse_vit_jax"
  run "${gc[@]}" compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
    "${sources[@]}" "$name:~/sparse_vit_jax/"
  on_all "cd ~/sparse_vit_jax && pip install -q -e '.[tpu]'"
}

run_job() {
  on_all "cd ~/sparse_vit_jax && $(main_command "$config" "$workdir" "${overrides[@]}")"
}

fetch() {
  run mkdir -p "results/$name"
  run gcloud storage cp "$workdir/results.json" "$workdir/results.csv" "results/$name/"
}

delete() {
  if [[ "$family" == v4 ]]; then
    run "${gc[@]}" compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
  else
    run "${gc[@]}" compute tpus queued-resources delete "$name-qr" --zone "$zone" --force --quiet
  fi
}

case "$action" in
  create) create ;;
  setup) setup ;;
  run) run_job ;;
  fetch) fetch ;;
  delete) delete ;;
  all) create; setup; run_job; fetch; delete ;;
esac
