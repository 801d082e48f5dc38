#!/usr/bin/env bash
# What an organisation's size costs (issue #20): a synthetic organisation of N
# repositories and P policies in the real inventory and policy formats
# (bench/scale/generate.py: per-repository allows by name, project-wide globs, a
# few denies, identity grants, agent markers), served by the release build
# against the local issuer's stub token endpoint, as scripts/bench-cpu.sh does.
# For each size, in runs that alternate between the sizes:
#   - service CPU per allowed and per refused exchange (utime+stime from
#     /proc/<pid>/stat around a wrk run, divided by the answers: bench-cpu.sh's
#     method); the allowed one is repository 0's main branch deploying to
#     Production, the refused one the same repository's feature branch, refused
#     after every policy that can apply is considered;
#   - service CPU per allowed client-secret exchange (repository 0's main branch
#     to artifact-api through its project's glob), as a ratio to the floor of
#     the stack (bench/floor, measured once in every run under the same load:
#     what any implementation of the exchange does on these crates);
#   - p99 latency of allowed exchanges in PAIRS pairs of windows, one quiet and
#     one while a policy file changes every RELOAD_EVERY seconds, interleaved;
#     each run's ratio is the median p99 reloading over the median p99 quiet
#     (the reload's cost to requests in flight), with how many reloads applied;
#   - peak RSS (VmHWM) after all of it, reloads included;
#   - time from start to ready (/readyz), and the reload time the service
#     measures (sts_policy_reload_duration_seconds: read, compile, swap) of one
#     changed file and of a SIGHUP without load, and the mean under the load
#     windows (where the reload thread runs on what CPU the workers leave);
#   - `policy check` wall time and peak RSS.
# The table gives min, median and max over the runs.
#
#   scripts/bench-scale.sh            # BENCH_SCALE_SIZES="1000:100 10000:2000 20000:5000"
#                                     # BENCH_SCALE_RUNS=5 BENCH_DURATION=5 BENCH_CONNECTIONS=16
#                                     # BENCH_SCALE_PAIRS=3 BENCH_RELOAD_EVERY=1
#   scripts/bench-scale.sh --smoke    # scripts/test.sh: small sizes, one run, no wrk,
#                                     # the binaries already built (target/debug)
#
# Results: ./target/bench-scale/results.md. Needs what scripts/bench-cpu.sh needs
# (wrk, installed from Debian's packages when running as root). Uses ports
# 18110-18112. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SMOKE=0
[[ "${1:-}" == --smoke ]] && SMOKE=1
if [[ $SMOKE == 1 ]]; then
  SIZES="${BENCH_SCALE_SIZES:-300:60}"
  RUNS=1
  BIN="${CARGO_TARGET_DIR:-target}/debug"
  OUT="${CARGO_TARGET_DIR:-target}/bench-scale-smoke"
else
  SIZES="${BENCH_SCALE_SIZES:-1000:100 10000:2000 20000:5000}"
  RUNS="${BENCH_SCALE_RUNS:-5}"
  BIN="${CARGO_TARGET_DIR:-target}/release"
  OUT="${CARGO_TARGET_DIR:-target}/bench-scale"
fi
DURATION="${BENCH_DURATION:-5}"
CONNECTIONS="${BENCH_CONNECTIONS:-16}"
RELOAD_EVERY="${BENCH_RELOAD_EVERY:-1}"
PAIRS="${BENCH_SCALE_PAIRS:-3}"
STUB=127.0.0.1:18110
PORT=18111
FLOOR_PORT=18112
# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh

if [[ $SMOKE == 0 ]]; then
  bash scripts/bootstrap.sh
  need_wrk bench-scale
  echo "== building (release)"
  cargo build --release --locked --workspace --bins
fi
for b in keycloak-ci-sts bitbucket-dev-issuer $([[ $SMOKE == 0 ]] && echo sts-floor); do
  [[ -x "$BIN/$b" ]] || { echo "bench-scale: $BIN/$b is not built" >&2; exit 1; }
done
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/rows.tsv "$OUT"/floor.tsv
[[ -f "$OUT/sts-signing-key.pem" ]] || "$BIN/keycloak-ci-sts" keys generate --out "$OUT/sts-signing-key.pem" >/dev/null
[[ -f "$OUT/sts-identity-key.pem" ]] || "$BIN/keycloak-ci-sts" keys generate --out "$OUT/sts-identity-key.pem" >/dev/null

pids=()
STS_PID=""
RELOADER=""
cleanup() {
  [[ -n "$RELOADER" ]] && kill "$RELOADER" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$OUT"/audit.jsonl "$OUT"/floor-audit.jsonl
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { date +%s%3N; }

"$BIN/bitbucket-dev-issuer" --listen "$STUB" --keycloak-stub --workers 1 2>"$OUT/issuer.log" &
pids+=($!)
wait_http "$!" "$OUT/issuer.log" "http://$STUB$ISSUER_PATH/keys.json"

config() { # policies_dir
  cat <<TOML
listen = "127.0.0.1:$PORT"
public_url = "http://127.0.0.1:$PORT"
policies_dir = "$1"

[policies]
poll_ms = 60000

[limits]
per_step_per_minute = 1000000000
per_repository_per_minute = 1000000000

[[workspaces]]
slug = "acme"
uuid = "$WORKSPACE_UUID"
issuer = "http://$STUB/2.0/workspaces/acme/pipelines-config/identity/oidc"
audiences = ["https://sts.example.test"]

[keycloak]
base_url = "http://$STUB"
realm = "ci"

[keycloak.clients.sts-deploy]
method = "private_key_jwt"

[keycloak.clients.sts-artifacts]
method = "client_secret_basic"
secret_env = "KCS_BENCH_SECRET"

[keycloak.clients.sts-repo]
method = "private_key_jwt"
grant = "jwt_authorization_grant"

[identity]
key_files = ["$PWD/$OUT/sts-identity-key.pem"]

[signing]
key_files = ["$PWD/$OUT/sts-signing-key.pem"]

[audit]
path = "$PWD/$OUT/audit.jsonl"
TOML
}

# the stub grants artifacts:read, a scope every deploy-api grant offers
ALLOWED="$(form deploy-api "$(mint main "$PRODUCTION_UUID")")&scope=artifacts%3Aread"
REFUSED=$(form deploy-api "$(mint feature/bench "$PRODUCTION_UUID")")
# client secret: the floor's kind of exchange (repository 0's project glob)
SECRET=$(form artifact-api "$(mint main)")
metric() { # name: the value of an unlabelled series
  curl -fsS "http://127.0.0.1:$PORT/metrics" | awk -v n="$1" '$1 == n {print $2}'
}

expect() { # body expected-status
  local status
  status=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/x-www-form-urlencoded' \
    --data "$1" "http://127.0.0.1:$PORT/token")
  [[ "$status" == "$2" ]] || { echo "bench-scale: answered $status, expected $2" >&2; return 1; }
}

load() { # name body expected-status [port pid] -> "cpu_us p99_ms"
  local before after expect_errors='0' port=${4:-$PORT} pid=${5:-$STS_PID}
  [[ "$3" != 200 ]] && expect_errors='.requests'
  BENCH_BODY="$2" BENCH_AUTH="" wrk -t2 -c"$CONNECTIONS" -d1s -s bench/report.lua "http://127.0.0.1:$port/token" >/dev/null
  before=$(cpu_ticks "$pid")
  BENCH_BODY="$2" BENCH_AUTH="" wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -s bench/report.lua \
    "http://127.0.0.1:$port/token" | tail -n 1 >"$OUT/$1.json"
  after=$(cpu_ticks "$pid")
  jq -e ".errors == $expect_errors" "$OUT/$1.json" >/dev/null ||
    { echo "bench-scale: $1: unexpected answers (wrk errors: $(jq .errors "$OUT/$1.json"))" >&2; return 1; }
  jq -r --argjson t "$((after - before))" --argjson hz "$CLK_TCK" \
    '"\($t / $hz * 1000000 / (if .requests < 1 then 1 else .requests end)) \(.p99_ms)"' "$OUT/$1.json"
}

# Rewrites one policy file every RELOAD_EVERY seconds with a new comment, as a
# ConfigMap update or git-sync would: a changed digest, so each is a real
# reload, seen by the service's file watch (settle_ms later). The service
# reads again only that file (the others keep their stat); SIGHUP, which reads
# every file, is measured without load after the windows (idle_reload_ms).
reload_loop() { # policies_dir
  local f="$1/deny-wip-branches.yaml" i=0
  while sleep "$RELOAD_EVERY"; do
    i=$((i + 1))
    { grep -v '^# bench reload' "$f"; echo "# bench reload $i"; } >"$f.tmp" && mv "$f.tmp" "$f"
    kill -0 "$STS_PID" 2>/dev/null || return 0
  done
}

# One reload without load, in ms as the service measured it (read, compile,
# swap): "change" rewrites one policy file as reload_loop does (the file watch;
# the others keep their stat), "hup" sends SIGHUP (every file read and hashed).
idle_reload_ms() { # policies_dir change|hup
  local s0 n0 i f="$1/deny-wip-branches.yaml"
  s0=$(metric sts_policy_reload_duration_seconds_sum)
  n0=$(metric sts_policy_reload_duration_seconds_count)
  if [[ $2 == hup ]]; then
    kill -HUP "$STS_PID"
  else
    { grep -v '^# bench reload' "$f"; echo "# bench reload idle $RANDOM"; } >"$f.tmp" && mv "$f.tmp" "$f"
  fi
  for ((i = 0; i < 3000; i++)); do
    [[ "$(metric sts_policy_reload_duration_seconds_count)" -gt "$n0" ]] && break
    sleep 0.01
  done
  [[ "$(metric sts_policy_reload_duration_seconds_count)" -gt "$n0" ]] ||
    { echo "bench-scale: no reload applied ($2)" >&2; return 1; }
  awk -v a="$s0" -v b="$(metric sts_policy_reload_duration_seconds_sum)" 'BEGIN {printf "%.0f", 1000 * (b - a)}'
}

median_of() { # numbers on stdin, one a line -> their median
  sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

one_run() { # n p run
  local n=$1 p=$2 dir="$OUT/org-$1-$2" t0 ready_ms check reload_s reload_n cpu_ok cpu_no cpu_secret p99 p99r idle hup
  if [[ ! -d "$dir" ]]; then
    python3 bench/scale/generate.py "$n" "$p" "$dir"
  fi
  if ! /usr/bin/time -o "$OUT/check.time" -f '%e %M' "$BIN/keycloak-ci-sts" policy check --dir "$dir" \
    >"$OUT/check.log" 2>&1; then
    echo "bench-scale: policy check refused $dir:" >&2
    tail -n 20 "$OUT/check.log" >&2
    return 1
  fi
  check=$(tail -n 1 "$OUT/check.time")
  config "$PWD/$dir" >"$OUT/sts.toml"
  t0=$(now_ms)
  RUST_LOG=warn KCS_BENCH_SECRET=sts-artifacts-test-secret "$BIN/keycloak-ci-sts" serve --config "$OUT/sts.toml" \
    >/dev/null 2>"$OUT/sts.log" &
  STS_PID=$!
  pids+=("$STS_PID")
  wait_http "$STS_PID" "$OUT/sts.log" "http://127.0.0.1:$PORT/readyz"
  ready_ms=$(($(now_ms) - t0))
  expect "$ALLOWED" 200
  expect "$REFUSED" 400
  expect "$SECRET" 200
  if [[ $SMOKE == 1 ]]; then
    # one reload, applied; then the same answers
    echo "# smoke reload" >>"$dir/deny-wip-branches.yaml"
    kill -HUP "$STS_PID"
    local i
    for ((i = 0; i < 1000; i++)); do
      [[ "$(metric sts_policy_reload_duration_seconds_count)" == 1 ]] && break
      sleep 0.01
    done
    [[ "$(metric sts_policy_reload_duration_seconds_count)" == 1 ]] || { echo "bench-scale: no reload applied" >&2; return 1; }
    expect "$ALLOWED" 200
    expect "$REFUSED" 400
    cpu_ok=- cpu_no=- cpu_secret=- p99=- p99r=-
  else
    read -r cpu_ok _ < <(load "allowed-$n-$p" "$ALLOWED" 200)
    read -r cpu_no _ < <(load "refused-$n-$p" "$REFUSED" 400)
    read -r cpu_secret _ < <(load "secret-$n-$p" "$SECRET" 200)
    local k x quiet=() reloading=() applied
    applied=$(metric sts_policy_reload_duration_seconds_count)
    for ((k = 1; k <= PAIRS; k++)); do
      read -r _ x < <(load "allowed-quiet-$n-$p-$k" "$ALLOWED" 200)
      quiet+=("$x")
      reload_loop "$dir" &
      RELOADER=$!
      read -r _ x < <(load "allowed-reloading-$n-$p-$k" "$ALLOWED" 200)
      reloading+=("$x")
      kill "$RELOADER"; wait "$RELOADER" 2>/dev/null || true
      RELOADER=""
    done
    p99=$(printf '%s\n' "${quiet[@]}" | median_of)
    p99r=$(printf '%s\n' "${reloading[@]}" | median_of)
    applied=$(($(metric sts_policy_reload_duration_seconds_count) - applied))
    echo "$n:$p run $3: p99 quiet ${quiet[*]} ms, reloading ${reloading[*]} ms; $applied reloads applied" >&2
  fi
  reload_s=$(metric sts_policy_reload_duration_seconds_sum)
  reload_n=$(metric sts_policy_reload_duration_seconds_count)
  [[ "${reload_n:-0}" -gt 0 ]] || { echo "bench-scale: no reload was applied" >&2; return 1; }
  if [[ $SMOKE == 1 ]]; then
    idle=- hup=-
  else
    # a reload the last window's change started (or its retry) finishes first
    sleep 3
    idle=$(idle_reload_ms "$dir" change)
    hup=$(idle_reload_ms "$dir" hup)
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$p" "$3" "$cpu_ok" "$cpu_no" "$p99" "$p99r" \
    "$(peak_rss_mib "$STS_PID")" "$ready_ms" \
    "$(awk -v s="$reload_s" -v c="$reload_n" 'BEGIN {printf "%.0f", 1000 * s / c}')" \
    "$(awk -v c="${check% *}" 'BEGIN {printf "%.0f", 1000 * c}')" \
    "$(awk -v k="${check#* }" 'BEGIN {printf "%.1f", k / 1024}')" "$cpu_secret" "$idle" "$hup" | tee -a "$OUT/rows.tsv"
  kill "$STS_PID"; wait "$STS_PID" 2>/dev/null || true
  STS_PID=""
}

floor_run() { # run: the floor of the stack under the same load, once per run
  start_floor "$FLOOR_PORT"
  read -r cpu _ < <(load "floor-$1" "$SECRET" 200 "$FLOOR_PORT" "$FLOOR_PID")
  printf 'floor\t-\t%s\t%s\n' "$1" "$cpu" | tee -a "$OUT/floor.tsv"
  stop_floor
}

echo "n	p	run	cpu_allowed_us	cpu_refused_us	p99_ms	p99_reloading_ms	peak_rss_mib	ready_ms	reload_ms	check_ms	check_rss_mib	cpu_secret_us	reload_idle_ms	reload_hup_ms"
for ((run = 1; run <= RUNS; run++)); do
  [[ $SMOKE == 0 ]] && floor_run "$run"
  for size in $SIZES; do
    one_run "${size%:*}" "${size#*:}" "$run"
  done
done

[[ $SMOKE == 1 ]] && { echo "bench-scale: smoke passed"; exit 0; }

# min / median / max per size and column
stats() { # n p column [file]
  awk -F'\t' -v n="$1" -v p="$2" -v c="$3" '$1 == n && $2 == p {print $c}' "${4:-$OUT/rows.tsv}" | sort -g |
    awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "%.4g / %.4g / %.4g", v[1], m, v[NR]}'
}
median() { # n p column [file]
  awk -F'\t' -v n="$1" -v p="$2" -v c="$3" '$1 == n && $2 == p {print $c}' "${4:-$OUT/rows.tsv}" | sort -g |
    awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
{
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(uname -sr); wrk -t2 -c$CONNECTIONS -d${DURATION}s; $RUNS runs per size, alternating; min / median / max; $(date -u +%Y-%m-%d)"
  echo
  echo "| repositories | policies | CPU µs per allowed exchange | CPU µs per refused exchange | CPU µs per allowed exchange, client secret | p99 ms, quiet (median of ${PAIRS} windows) | p99 ms, a policy file changed every ${RELOAD_EVERY} s | peak RSS MiB | start to ready ms | reload ms, one file changed, idle | reload ms, SIGHUP (every file), idle | reload ms, under the load windows (mean) | policy check ms | policy check RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for size in $SIZES; do
    n=${size%:*} p=${size#*:}
    printf '| %s | %s |' "$n" "$p"
    for c in 4 5 13 6 7 8 9 14 15 10 11 12; do printf ' %s |' "$(stats "$n" "$p" "$c")"; done
    echo
  done
  echo
  floor=$(median floor - 4 "$OUT/floor.tsv")
  echo "the floor of the stack (bench/floor), CPU µs per exchange: $(stats floor - 4 "$OUT/floor.tsv") (min / median / max)"
  for size in $SIZES; do
    awk -v s="$(median "${size%:*}" "${size#*:}" 13)" -v f="$floor" -v z="$size" 'BEGIN {
      printf "%s: median CPU per allowed client-secret exchange / the floor: %.0f / %.0f µs = %.2f × (target ≤ 1.3 ×)\n", z, s, f, s / f }'
  done
  echo
  first=${SIZES%% *} last=${SIZES##* }
  awk -v a0="$(median "${first%:*}" "${first#*:}" 4)" -v a1="$(median "${last%:*}" "${last#*:}" 4)" \
    -v r0="$(median "${first%:*}" "${first#*:}" 5)" -v r1="$(median "${last%:*}" "${last#*:}" 5)" \
    -v first="$first" -v last="$last" 'BEGIN {
    printf "median CPU per exchange at %s against %s: allowed %.2f ×, refused %.2f × (target ≤ 1.1 ×)\n", last, first, a1 / a0, r1 / r0 }'
  for size in $SIZES; do
    n=${size%:*} p=${size#*:}
    awk -F'\t' -v n="$n" -v p="$p" '$1 == n && $2 == p {printf "%.4f\n", $7 / $6}' "$OUT/rows.tsv" >"$OUT/ratios.tsv"
    echo "$size: p99 while reloading / p99 quiet, per run (interleaved windows): $(sort -g "$OUT/ratios.tsv" |
      awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f / %.2f / %.2f ×", v[1], m, v[NR]}') (min / median / max; target ≤ 1.2 ×)"
  done
} | tee "$OUT/results.md"
