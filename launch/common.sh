#!/usr/bin/env bash
# Shared helpers for the launch scripts (sourced, not run).

DRY_RUN=${DRY_RUN:-0}

die() {  # one line on stderr, exit 2
  echo "error: $*" >&2
  exit 2
}

quote() {  # the arguments as one shell-safe string
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  printf '%s' "${out% }"
}

run() {  # print the exact command; execute it unless --dry-run
  echo "+ $(quote "$@")"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

need_value() {  # need_value OPTION VALUE
  [[ -n "${2:-}" && "${2:0:2}" != "--" ]] || die "$1 needs a value (see --help)"
}

abspath() {  # a local path made absolute against the caller's directory; URLs kept as they are
  case "$1" in
    "" | /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "${1#./}" ;;
  esac
}

# Config keys whose values are paths: resolved before any script changes directory.
PATH_KEYS='init_from|pretrained|compile_cache|data\.data_dir|data\.root|data\.class_list'

absolute_overrides() {  # absolute_overrides ARGS...: sets OVERRIDES, path values made absolute
  OVERRIDES=()
  local a
  for a in "$@"; do
    if [[ "$a" =~ ^--config\.($PATH_KEYS)=(.+)$ ]]; then
      a="--config.${BASH_REMATCH[1]}=$(abspath "${BASH_REMATCH[2]}")"
    fi
    OVERRIDES+=("$a")
  done
}

main_command() {  # main_command CONFIG WORKDIR OVERRIDES...: the python command, quoted
  local config=$1 workdir=$2
  shift 2
  quote python3 -m sparse_vit_jax.main "--config=$config" "--workdir=$workdir" "$@"
}
