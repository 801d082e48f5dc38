#!/usr/bin/env bash
# The whole test suite, including the tests against a real Keycloak.
# This is the test command of the README and the book (docs/src/getting-started.md),
# and what .ci/run runs.
#
#   scripts/test.sh
#
# Runs formatting and lint checks and the dependency audit (scripts/supply-chain.sh); starts Keycloak 26.7.3 (scripts/keycloak.sh:
# fetched from Maven, cached outside the clone, run in dev mode on 127.0.0.1),
# configures realm ci with `keycloak apply`, runs `cargo test -- --include-ignored`
# (also the replica tests: redis-server, three service processes, haproxy) and
# the resource-server kit in four languages (scripts/resource-servers.sh);
# builds the fuzz targets, replays their corpora and runs each 200,000 times from a fixed seed
# (scripts/fuzz.sh --ci); checks the Dockerfile, the Helm chart and the image's runtime contract
# (scripts/deploy-check.sh) and builds the release artefacts from the same build (scripts/release.sh);
# then runs the provisioning test on Keycloak 26.4.7 and 26.5.6
# (KCS_KEYCLOAK_OLDER_VERSIONS, empty to skip them locally). The real-Keycloak
# tests are #[ignore]d in a plain `cargo test` (reported as "ignored"); here they
# run, and fail if Keycloak is not reachable: they never skip.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/bootstrap.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
# Advisories, licences, duplicate versions, sources (deny.toml), against the
# RustSec snapshot in ../shared/advisory-db; cargo-deny cached outside the clone.
echo "== supply chain (scripts/supply-chain.sh: cargo deny --offline check)"
bash scripts/supply-chain.sh
# The book under docs/ (mdbook, pinned and cached): every internal link, anchor
# and included file must exist.
echo "== the book (scripts/book.sh: mdbook build, link check)"
bash scripts/book.sh
# The JSON Schemas of the files people write: shipped examples and the
# accepted/rejected cases validated against them (docs/src/schemas/).
echo "== JSON Schemas (scripts/schemas.sh)"
bash scripts/schemas.sh
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo build (tests)"
cargo test --locked --workspace --no-run

cargo build --locked --workspace --bins

# Organisation scale (docs/src/benchmarks.md): a small synthetic organisation
# in the real formats, served (allowed and refused exchanges), reloaded and
# checked with the binaries just built; the measured sizes are scripts/bench-scale.sh's.
echo "== scale smoke (scripts/bench-scale.sh --smoke)"
bash scripts/bench-scale.sh --smoke

# Every parser of outside input, coverage-guided: each target built once without
# sanitizer (nightly, cached outside the clone), its corpus replayed, then fuzzed
# 200,000 times from a fixed seed (docs/src/fuzzing.md; scripts/fuzz.sh runs longer, with AddressSanitizer).
echo "== fuzz targets (cargo +nightly fuzz: build, replay fuzz/corpus/, 200,000 runs each from seed 1)"
bash scripts/fuzz.sh --ci

# The newest supported Keycloak runs the whole suite; the older lines of the
# support matrix run the provisioning test (blank realm -> plan -> apply -> real
# exchanges with both authentication methods -> drift -> repair). Each
# distribution is cached outside the clone (scripts/keycloak.sh).
KC_NEWEST="${KC_VERSION:-26.7.3}"
KC_OLDER="${KCS_KEYCLOAK_OLDER_VERSIONS-26.4.7 26.5.6}"

trap 'bash scripts/keycloak.sh stop || true' EXIT
echo "== starting Keycloak $KC_NEWEST"
KC_VERSION="$KC_NEWEST" bash scripts/keycloak.sh start
eval "$(KC_VERSION="$KC_NEWEST" bash scripts/keycloak.sh env)"
echo "== keycloak plan on the blank realm: the golden text (tests/keycloak/golden)"
bash scripts/plan-golden.sh blank 3
echo "== keycloak apply: realm ci from policies/ and policies/keycloak/realm.yaml"
bash scripts/keycloak.sh provision

# Before the tests below, which point realm ci's clients at services of their own.
echo "== the resource-server kit (Go, Python, Node.js, Java) against Keycloak $KC_NEWEST"
bash scripts/resource-servers.sh

echo "== cargo test (including the real-Keycloak tests, Keycloak $KC_NEWEST, and the replica tests with redis-server and haproxy)"
# Most tests wait on sockets, so four run at once on two cores. The load test
# (thousands of exchanges over 200 connections) runs alone afterwards: on a
# machine busy with other tests its client misses the server's 5 s header
# timeout, which says nothing about the server.
cargo test --locked --workspace -- --include-ignored --test-threads=4 --skip concurrency::
echo "== the load test, alone"
cargo test --locked --test api concurrency:: -- --include-ignored
bash scripts/keycloak.sh stop

echo "== provisioning compatibility: realm ci as an earlier apply left it, then drifted (golden plans)"
KC_VERSION="$KC_NEWEST" bash scripts/keycloak-compat.sh

echo "== deployment: Dockerfile (hadolint), Helm chart (lint, template, schemas), the image's runtime contract"
bash scripts/deploy-check.sh

# The release artefacts from deploy-check's release build (no second build):
# tarball, SBOM, chart, sums, each checked by the script.
echo "== release artefacts (scripts/release.sh)"
bash scripts/release.sh

for v in $KC_OLDER; do
  echo "== Keycloak $v: provisioning and exchange test"
  KC_VERSION="$v" bash scripts/keycloak.sh start
  eval "$(KC_VERSION="$v" bash scripts/keycloak.sh env)"
  cargo test --locked --test api keycloak_provision -- --include-ignored
  bash scripts/keycloak.sh stop
done
