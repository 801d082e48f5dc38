#!/usr/bin/env bash
# The whole test suite, including the tests against a real Keycloak.
# This is the README's test command, and what .ci/run runs.
#
#   scripts/test.sh
#
# Starts Keycloak (scripts/keycloak.sh: fetched from Maven, cached outside the
# clone, run in dev mode on 127.0.0.1), runs formatting and lint checks and
# `cargo test -- --include-ignored`, and stops Keycloak again. The real-Keycloak
# tests are #[ignore]d in a plain `cargo test` (reported as "ignored"); here they
# run, and fail if Keycloak is not reachable: they never skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo build (tests)"
cargo test --locked --workspace --no-run

echo "== starting Keycloak"
trap 'bash scripts/keycloak.sh stop || true' EXIT
bash scripts/keycloak.sh start
eval "$(bash scripts/keycloak.sh env)"

echo "== cargo test (including the real-Keycloak tests)"
cargo test --locked --workspace -- --include-ignored
