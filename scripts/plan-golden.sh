#!/usr/bin/env bash
# Compares what `keycloak plan` prints for the running Keycloak (scripts/keycloak.sh
# plan: demo/sts.toml, the view client) with tests/keycloak/golden/NAME.txt, and
# its exit code with EXIT (0 in sync, 3 changes pending). Users read this text:
# a change to it is a change to the product, reviewed as a diff of the golden
# file. KCS_UPDATE_GOLDEN=1 writes the file instead of comparing.
#
#   scripts/plan-golden.sh NAME EXIT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
name="${1:?usage: $0 NAME EXIT}"
want_exit="${2:?usage: $0 NAME EXIT}"
golden="tests/keycloak/golden/$name.txt"
out="$(mktemp)" err="$(mktemp)"
trap 'rm -f "$out" "$err"' EXIT
code=0
bash scripts/keycloak.sh plan >"$out" 2>"$err" || code=$?
if [[ "${KCS_UPDATE_GOLDEN:-}" == 1 ]]; then
  cp "$out" "$golden"
  echo "plan-golden: wrote $golden (exit $code)"
  exit 0
fi
if [[ "$code" != "$want_exit" ]]; then
  echo "plan-golden: $name: keycloak plan exited $code, expected $want_exit; it printed:" >&2
  cat "$out" "$err" >&2
  exit 1
fi
if ! diff -u "$golden" "$out" >&2; then
  echo "plan-golden: $name: the plan text differs from $golden (above; KCS_UPDATE_GOLDEN=1 rewrites it)" >&2
  exit 1
fi
echo "plan-golden: $name: the plan text is $golden, exit $code"
