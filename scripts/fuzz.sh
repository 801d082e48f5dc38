#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of outside input (fuzz/, cargo-fuzz;
# docs/src/fuzzing.md).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   # default 300 s each, AddressSanitizer
#   scripts/fuzz.sh --ci                               # what scripts/test.sh runs: no
#                                                      # sanitizer, a fixed number of runs
#                                                      # from a fixed seed (about 1-15 s each)
#
# Builds every target once (nightly; cargo-fuzz is installed into a cache outside
# the clone if missing; the build's target directory is outside the clone too, so
# a warm run rebuilds nothing), replays each committed corpus fuzz/corpus/<target>/
# (every input must keep its invariant), then fuzzes each target for the given
# time. New inputs go to a temporary directory, never into the clone; a failing
# input is saved under fuzz/artifacts/<target>/ (git-ignored) with the command
# that replays it. Environment: KCS_FUZZ_SANITIZER (address | none),
# KCS_FUZZ_RUNS (--ci: executions per target, default 200000), KCS_CACHE
# (default ~/.cache/keycloak-ci-sts). The --ci run is deterministic (seed 1, a
# number of runs, not a time), so CI fails only when the code or corpus changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=300
sanitizer="${KCS_FUZZ_SANITIZER:-address}"
# What ends a run: a time (exploring), or a number of runs from a fixed seed (CI).
budget=()
if [[ "${1:-}" == "--ci" ]]; then
  budget=(-seed=1 -runs="${KCS_FUZZ_RUNS:-200000}" -max_total_time=120)
  sanitizer="${KCS_FUZZ_SANITIZER:-none}"
  shift
elif [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  seconds="$1"
  shift
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly Rust toolchain is required (cargo-fuzz needs it)." >&2
  echo "fuzz: install it with: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi
if ! command -v c++ >/dev/null 2>&1; then
  echo "fuzz: a C++ compiler (c++) is required to build libFuzzer; run scripts/bootstrap.sh" >&2
  exit 1
fi

cache="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}"
source scripts/lib/tools.sh
cargo_tool cargo-fuzz 0.13.2
# One target directory per sanitizer (their flags differ, so they share nothing).
export CARGO_TARGET_DIR="$cache/fuzz-target"
[[ "$sanitizer" == none ]] || CARGO_TARGET_DIR="$cache/fuzz-target-$sanitizer"

mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^keycloak-ci-sts-fuzz$')
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")

((${#budget[@]})) || budget=(-max_total_time="$seconds")

echo "== cargo +nightly fuzz build (sanitizer: $sanitizer)"
# fuzz/Cargo.lock is committed: refuse to build from a lock file that needs an
# update (cargo fuzz build has no --locked of its own).
cargo +nightly metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null ||
  { echo "fuzz: fuzz/Cargo.lock is out of date (cp Cargo.lock fuzz/ and build once)" >&2; exit 1; }
(cd fuzz && cargo +nightly fuzz build --sanitizer "$sanitizer")
bin_dir="$CARGO_TARGET_DIR/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
# Each change of the library links every target anew under a new hash, and the
# cache kept them all (tens of GB after a day of commits): keep the newest two
# of each target and of the library's own artefacts (the ones just built, and
# the previous for a build switching back).
for stem in "${all[@]}" libkeycloak_ci_sts keycloak_ci_sts; do
  find "$bin_dir/deps" -maxdepth 1 -type f -name "$stem-*" -printf '%T@ %p\n' |
    sort -rn | awk '{print $2}' | sed -E 's/\.[a-z]+$//' | awk '!seen[$0]++' | tail -n +3 |
    while read -r old; do rm -f "$old" "$old".*; done
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  [[ -d "$corpus" ]] || { echo "fuzz: no corpus $corpus" >&2; exit 1; }
  mkdir -p "$work/$t" "fuzz/artifacts/$t"
  common=(-artifact_prefix="fuzz/artifacts/$t/" -rss_limit_mb=2048 -timeout=10 -max_len=16384)
  start=$SECONDS
  if "$bin_dir/$t" "${common[@]}" -runs=0 "$corpus" >"$work/$t.replay.log" 2>&1 &&
    "$bin_dir/$t" "${common[@]}" "${budget[@]}" -print_final_stats=1 \
      "$work/$t" "$corpus" >"$work/$t.log" 2>&1; then
    stats=$(grep -E '^stat::(number_of_executed_units|new_units_added)' "$work/$t.log" |
      sed 's/^stat:://; s/: */=/' | tr '\n' ' ')
    echo "fuzz $t: ok in $((SECONDS - start)) s, $(ls "$corpus" | wc -l) corpus inputs replayed, $stats"
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    log="$work/$t.log"
    [[ -s "$log" ]] || log="$work/$t.replay.log"
    echo "fuzz $t: FAILED" >&2
    # the panic's line and the next (the invariant's name and message)
    grep -A1 -E "panicked at" "$log" | head -10 >&2 || true
    grep -E "ERROR: |SUMMARY|Test unit written" "$log" | head -10 >&2 || tail -30 "$log" >&2
    echo "fuzz $t: replay with: (cd fuzz && cargo +nightly fuzz run $t artifacts/$t/<file>)" >&2
  fi
done
echo "fuzz: $passed passed, $failed failed"
((failed == 0))
