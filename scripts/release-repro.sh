#!/usr/bin/env bash
# Checks that releases are reproducible: two clones of this commit at different
# paths, each with its own target directory, run scripts/release.sh, and every
# artefact must be byte-for-byte the same. Not part of the test command (it
# builds the release twice from scratch: about 10 minutes on 2 cores).
#
#   scripts/release-repro.sh [COMMIT]     (default: HEAD; uncommitted changes are not included)
#
# On a difference it lists the differing files inside the tarballs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

commit=$(git rev-parse "${1:-HEAD}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
a="$work/a/keycloak-ci-sts"
b="$work/somewhere/else/entirely/kcs-clone"
for dir in "$a" "$b"; do
  git clone -q --no-checkout "$(pwd)" "$dir"
  git -C "$dir" checkout -q "$commit"
done
for dir in "$a" "$b"; do
  echo "== release in $dir"
  (cd "$dir" && CARGO_TARGET_DIR="$dir/target" bash scripts/release.sh --out "$dir/out" >"$dir.log" 2>&1) \
    || { tail -n 30 "$dir.log" >&2; exit 1; }
done
if cmp -s "$a/out/SHA256SUMS" "$b/out/SHA256SUMS"; then
  echo "release-repro: the same bytes from both clones (commit $commit):"
  cat "$a/out/SHA256SUMS"
  exit 0
fi
echo "release-repro: the artefacts differ:" >&2
diff "$a/out/SHA256SUMS" "$b/out/SHA256SUMS" >&2 || true
for dir in "$a" "$b"; do
  mkdir -p "$dir/x"
  tar -xzf "$dir"/out/*-linux.tar.gz -C "$dir/x"
done
diff -r "$a/x" "$b/x" >&2 || true
exit 1
