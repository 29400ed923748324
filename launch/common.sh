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

main_command() {  # main_command CONFIG WORKDIR OVERRIDES...: the python command, quoted
  local config=$1 workdir=$2
  shift 2
  quote python3 -m sparse_vit_jax.main "--config=$config" "--workdir=$workdir" "$@"
}
