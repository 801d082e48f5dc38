#!/usr/bin/env bash
# What one request costs the service, in CPU time rather than wall time: the
# process's utime+stime (/proc/<pid>/stat) around a measured wrk run, divided by
# the requests answered. Wall-clock throughput on a small machine cannot tell the
# service's cost from the load generator's and the upstream's; CPU time can.
#
# Scenarios (no Keycloak: the local issuer's stub token endpoint answers at once):
#   secret        allowed exchange, client sts-artifacts, client_secret_basic
#   pkjwt         allowed exchange, client sts-deploy, private_key_jwt (ES256), scope
#                 artifacts:read (the one scope the stub grants)
#   secret-tls    the same two with the stub behind TLS (haproxy terminating,
#   pkjwt-tls     a throw-away CA trusted through SSL_CERT_FILE)
#   secret-stdout as secret, with the audit lines on standard output (standard
#                 output, pipe or file, goes through the writer thread; an
#                 [audit] path file is written inline)
#   bad-signature refused: the step token's signature altered (token.bad_signature)
#   policy        refused: a step token of a feature branch (policy.branch_not_allowed)
#   floor         the floor of the stack (bench/floor): what any implementation of
#                 the exchange does on these crates (form POST, one RS256 check,
#                 one pooled POST to the same stub token endpoint, one write() of
#                 a JSON line, a JSON answer); the service's allowed client-secret
#                 exchange is reported as a ratio to it (issue #20: <= 1.3 x)
# next to the bare RS256 check and the verification + policy decision measured by
# the criterion benchmark in the same run (cargo bench --bench verify), plus the
# TCP connections opened (/proc/net/snmp ActiveOpens, whole machine) and the
# service's context switches per request, and its peak RSS. Each scenario runs
# twice: with every process sharing every core (as on a small machine), then with
# the service pinned to a core of its own (taskset) and the rest on the others.
#
#   scripts/bench-cpu.sh   # BENCH_DURATION=10 BENCH_WARMUP=3 BENCH_CONNECTIONS=16
#                          # BENCH_LOG=warn BENCH_CRITERION=1
#
# Results: ./target/bench-cpu/results.md (whatever CARGO_TARGET_DIR is). Needs
# what scripts/test.sh needs (scripts/bootstrap.sh checks it), plus wrk and openssl
# (installed from Debian's packages when running as root). Uses ports 18094-18099.
# The audit files it writes (GBs) are removed at the end. Run it on an otherwise
# idle machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DURATION="${BENCH_DURATION:-10}"
WARMUP="${BENCH_WARMUP:-3}"
CONNECTIONS="${BENCH_CONNECTIONS:-16}"
LOG="${BENCH_LOG:-warn}"
CRITERION="${BENCH_CRITERION:-1}"
OUT=target/bench-cpu
STUB=127.0.0.1:18094
TLS_STUB=127.0.0.1:18095
BIN="${CARGO_TARGET_DIR:-target}/release"
# shellcheck source=scripts/lib/bench.sh
source scripts/lib/bench.sh

bash scripts/bootstrap.sh
need_wrk bench-cpu
command -v openssl >/dev/null 2>&1 || { echo "bench-cpu: openssl is required" >&2; exit 1; }

echo "== building (release)"
cargo build --release --locked --workspace --bins
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/*.cpu "$OUT"/audit-*.jsonl
[[ -f "$OUT/sts-signing-key.pem" ]] || "$BIN/keycloak-ci-sts" keys generate --out "$OUT/sts-signing-key.pem" >/dev/null
[[ -f "$OUT/sts-identity-key.pem" ]] || "$BIN/keycloak-ci-sts" keys generate --out "$OUT/sts-identity-key.pem" >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$OUT"/audit-*.jsonl "$OUT"/stdout-*.jsonl "$OUT"/floor-audit.jsonl
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== the local issuer with a stub Keycloak realm ($STUB), TLS in front of it ($TLS_STUB)"
"$BIN/bitbucket-dev-issuer" --listen "$STUB" --keycloak-stub --workers 1 2>"$OUT/issuer.log" &
pids+=($!)
wait_http "$!" "$OUT/issuer.log" "http://$STUB$ISSUER_PATH/keys.json"

# A throw-away CA and a certificate for 127.0.0.1, trusted by the service only
# (SSL_CERT_FILE, read by rustls' platform verifier on Linux).
if [[ ! -f "$OUT/tls/stub.pem" ]]; then
  mkdir -p "$OUT/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=bench-ca -keyout "$OUT/tls/ca.key" -out "$OUT/tls/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$OUT/tls/stub.key" -out "$OUT/tls/stub.csr" 2>/dev/null
  openssl x509 -req -in "$OUT/tls/stub.csr" -CA "$OUT/tls/ca.pem" -CAkey "$OUT/tls/ca.key" \
    -CAcreateserial -days 30 -extfile <(printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n') \
    -out "$OUT/tls/stub.crt" 2>/dev/null
  cat "$OUT/tls/stub.crt" "$OUT/tls/stub.key" >"$OUT/tls/stub.pem"
fi
cat >"$OUT/haproxy.cfg" <<CFG
global
  maxconn 1024
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend tls
  bind $TLS_STUB ssl crt $PWD/$OUT/tls/stub.pem
  http-request set-header X-Forwarded-Proto https
  default_backend stub
backend stub
  http-reuse always
  server stub $STUB
CFG
haproxy -f "$OUT/haproxy.cfg" -db 2>"$OUT/haproxy.log" &
pids+=($!)
wait_http "$!" "$OUT/haproxy.log" --cacert "$OUT/tls/ca.pem" "https://$TLS_STUB/realms/ci/.well-known/openid-configuration"

config() { # port keycloak_url
  cat <<TOML
listen = "127.0.0.1:$1"
public_url = "http://127.0.0.1:$1"
policies_dir = "$PWD/policies"

[limits]
per_step_per_minute = 1000000000
per_repository_per_minute = 1000000000

[[workspaces]]
slug = "acme"
uuid = "$WORKSPACE_UUID"
issuer = "http://$STUB/2.0/workspaces/acme/pipelines-config/identity/oidc"
audiences = ["https://sts.example.test"]

[keycloak]
base_url = "$2"
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

TOML
  # 18098: audit lines on standard output (the writer thread), else to a file (inline)
  if [[ "$1" != 18098 ]]; then printf '\n[audit]\npath = "%s"\n' "$PWD/$OUT/audit-$1.jsonl"; fi
}

# PIN: empty (service, wrk and stub share every core, as a small machine runs
# them) or "pinned" (the service alone on the last core, wrk, the stub and TLS on
# the others: what the service costs when nothing preempts it).
PIN=""
LAST_CPU=$(($(nproc) - 1))
on_others() { if [[ -n "$PIN" && "$LAST_CPU" -gt 0 ]]; then taskset -c "0-$((LAST_CPU - 1))" "$@"; else "$@"; fi; }
# Only for commands started in the background: exec keeps the PID measured the
# service's own.
on_own() { if [[ -n "$PIN" && "$LAST_CPU" -gt 0 ]]; then exec taskset -c "$LAST_CPU" "$@"; else exec "$@"; fi; }

stop_sts() { kill "$STS_PID" 2>/dev/null || true; wait "$STS_PID" 2>/dev/null || true; }

start_sts() { # port keycloak_url -> pid in STS_PID
  config "$1" "$2" >"$OUT/sts-$1.toml"
  RUST_LOG="$LOG" KCS_BENCH_SECRET=sts-artifacts-test-secret SSL_CERT_FILE="$PWD/$OUT/tls/ca.pem" \
    on_own "$BIN/keycloak-ci-sts" serve --config "$OUT/sts-$1.toml" >"$OUT/stdout-$1.jsonl" 2>"$OUT/sts-$1.log" &
  STS_PID=$!
  pids+=("$STS_PID")
  wait_http "$STS_PID" "$OUT/sts-$1.log" "http://127.0.0.1:$1/readyz"
}

MAIN=$(mint main)
PRODUCTION=$(mint main "$PRODUCTION_UUID")
FEATURE=$(mint feature/bench)
# The same token with one signature character changed (in the middle, so no
# padding bits are involved): a signature that does not verify, a known kid.
sig=${MAIN##*.}
c=${sig:40:1}
[[ $c == A ]] && r=B || r=A
FORGED="${MAIN%.*}.${sig:0:40}$r${sig:41}"

switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/_ctxt_switches/ {s += $2} END {print s + 0}'; }
active_opens() { awk '/^Tcp:/ && $6 ~ /^[0-9]+$/ {print $6}' /proc/net/snmp; }

run() { # name url body expected-status: warm-up, then the measured run
  local before after sw_before sw_after op_before op_after status
  status=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/x-www-form-urlencoded' --data "$3" "$2")
  if [[ "$status" != "$4" ]]; then
    echo "bench-cpu: $1 answered $status, expected $4" >&2
    exit 1
  fi
  # wrk counts answers other than 2xx/3xx (and socket errors) as errors: every
  # answer of the measured run must be the expected one.
  local expect_errors='0'
  if [[ "$4" != 200 ]]; then expect_errors='.requests'; fi
  BENCH_BODY="$3" BENCH_AUTH="" on_others wrk -t2 -c"$CONNECTIONS" -d"${WARMUP}s" -s bench/report.lua "$2" >/dev/null
  before=$(cpu_ticks "$STS_PID")
  sw_before=$(switches "$STS_PID")
  op_before=$(active_opens)
  BENCH_BODY="$3" BENCH_AUTH="" on_others wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -s bench/report.lua "$2" |
    tail -n 1 >"$OUT/$1.json"
  after=$(cpu_ticks "$STS_PID")
  sw_after=$(switches "$STS_PID")
  op_after=$(active_opens)
  jq -c --argjson t "$((after - before))" --argjson hz "$CLK_TCK" \
    --argjson sw "$((sw_after - sw_before))" --argjson op "$((op_after - op_before))" \
    '. as $r | ($r.requests | if . < 1 then 1 else . end) as $n
     | $r + {cpu_us: ($t / $hz * 1000000 / $n), switches: ($sw / $n), connects: ($op / $n)}' \
    "$OUT/$1.json" >"$OUT/$1.cpu"
  echo "$1: $(cat "$OUT/$1.cpu")"
  if ! jq -e ".errors == $expect_errors" "$OUT/$1.json" >/dev/null; then
    echo "bench-cpu: $1: unexpected answers during the measured run (wrk errors: $(jq .errors "$OUT/$1.json"))" >&2
    exit 1
  fi
}

scenarios() { # suffix for the result files ("" or "-pinned")
  local x="$1"
  echo "== service against the stub over http${x:+ ($PIN)}"
  start_sts 18096 "http://$STUB"
  run "secret$x" http://127.0.0.1:18096/token "$(form artifact-api "$MAIN")" 200
  run "pkjwt$x" http://127.0.0.1:18096/token "$(form deploy-api "$PRODUCTION")&scope=artifacts%3Aread" 200
  run "bad-signature$x" http://127.0.0.1:18096/token "$(form artifact-api "$FORGED")" 400
  run "policy$x" http://127.0.0.1:18096/token "$(form artifact-api "$FEATURE")" 400
  peak_rss_mib "$STS_PID" >"$OUT/rss-http$x"
  stop_sts
  echo "== the floor of the stack (bench/floor) against the stub over http${x:+ ($PIN)}"
  if [[ -n "$PIN" && "$LAST_CPU" -gt 0 ]]; then start_floor 18099 taskset -c "$LAST_CPU"; else start_floor 18099; fi
  STS_PID=$FLOOR_PID
  run "floor$x" http://127.0.0.1:18099/token "$(form artifact-api "$MAIN")" 200
  stop_floor
  echo "== service against the stub over TLS${x:+ ($PIN)}"
  start_sts 18097 "https://$TLS_STUB"
  run "secret-tls$x" http://127.0.0.1:18097/token "$(form artifact-api "$MAIN")" 200
  run "pkjwt-tls$x" http://127.0.0.1:18097/token "$(form deploy-api "$PRODUCTION")&scope=artifacts%3Aread" 200
  peak_rss_mib "$STS_PID" >"$OUT/rss-tls$x"
  stop_sts
  echo "== audit lines on standard output${x:+ ($PIN)}"
  start_sts 18098 "http://$STUB"
  run "secret-stdout$x" http://127.0.0.1:18098/token "$(form artifact-api "$MAIN")" 200
  stop_sts
}
scenarios ""
if [[ "$(nproc)" -gt 1 ]]; then
  PIN=pinned
  # The issuer with its stub and haproxy (every thread) off the service's core.
  for p in "${pids[@]}"; do taskset -a -p -c "0-$((LAST_CPU - 1))" "$p" >/dev/null 2>&1 || true; done
  scenarios -pinned
fi
RSS_HTTP=$(cat "$OUT/rss-http") RSS_TLS=$(cat "$OUT/rss-tls")
cleanup
pids=()

BARE_US="" DECIDE_US=""
if [[ "$CRITERION" == 1 ]]; then
  echo "== criterion: bare RS256 check, verification + policy decision"
  cargo bench --locked --bench verify -- --warm-up-time 2 --measurement-time 5 --noplot >"$OUT/criterion.log" 2>&1
  est() { jq '.mean.point_estimate / 1000' "${CARGO_TARGET_DIR:-target}/criterion/one_token/$1/new/estimates.json"; }
  BARE_US=$(est bare_rs256_signature_check)
  DECIDE_US=$(est verify_and_decide)
fi

# The audit rotation check (docs/src/operating.md): one stat(2) of the audit
# path before every inline write, measured on its own (release build).
echo "== the audit rotation check: one stat(2) per inline audit write"
cargo test --release --locked --lib stat_cost -- --ignored --nocapture >"$OUT/stat-cost.log" 2>&1
STAT_US=$(sed -nE 's/.*stat\(2\) of the audit path: ([0-9.]+)(ns|µs) per call.*/\1 \2/p' "$OUT/stat-cost.log" |
  awk '{ print ($2 == "ns" ? $1 / 1000 : $1) }')
[[ -n "$STAT_US" ]] || { echo "bench-cpu: no stat(2) measurement in $OUT/stat-cost.log" >&2; exit 1; }

c() { jq -r ".$2" "$OUT/$1.cpu"; }
{
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(uname -sr); wrk -t2 -c$CONNECTIONS -d${DURATION}s; RUST_LOG=$LOG; $(date -u +%Y-%m-%d)"
  echo
  echo "| request | service CPU µs per request | × bare RS256 | pinned: CPU µs per request | requests/s | p50 ms | TCP connects per request | context switches per request |"
  echo "|---|---|---|---|---|---|---|---|"
  for s in secret pkjwt secret-tls pkjwt-tls secret-stdout bad-signature policy floor; do
    case $s in
      secret) label="allowed, client_secret_basic, stub over http" ;;
      pkjwt) label="allowed, private_key_jwt, stub over http" ;;
      secret-tls) label="allowed, client_secret_basic, stub over TLS" ;;
      pkjwt-tls) label="allowed, private_key_jwt, stub over TLS" ;;
      secret-stdout) label="allowed, client_secret_basic, audit on standard output (writer thread)" ;;
      bad-signature) label="refused: bad signature" ;;
      policy) label="refused by policy" ;;
      floor) label="the floor of the stack (bench/floor), client secret, stub over http" ;;
    esac
    pinned="-"
    [[ -f "$OUT/$s-pinned.cpu" ]] && pinned=$(c "$s-pinned" cpu_us)
    awk -v l="$label" -v cpu="$(c "$s" cpu_us)" -v bare="${BARE_US:-0}" -v rps="$(c "$s" rps)" \
      -v p50="$(c "$s" p50_ms)" -v con="$(c "$s" connects)" -v sw="$(c "$s" switches)" -v pin="$pinned" 'BEGIN {
      printf "| %s | %.0f | %s | %s | %.0f | %.2f | %.4f | %.2f |\n", l, cpu,
        (bare > 0 ? sprintf("%.2f ×", cpu / bare) : "-"), (pin == "-" ? "-" : sprintf("%.0f", pin)), rps, p50, con, sw }'
  done
  echo
  if [[ -n "$BARE_US" ]]; then
    awk -v b="$BARE_US" -v d="$DECIDE_US" 'BEGIN {
      printf "criterion: bare RS256 signature check %.1f µs, verification (warm key cache) + policy decision %.1f µs (%.2f ×)\n\n", b, d, d / b }'
  fi
  awk -v st="$STAT_US" -v s="$(c secret cpu_us)" 'BEGIN {
    printf "audit rotation check: one stat(2) of the audit path per inline write, %.2f µs (%.1f %% of an allowed exchange, client secret)\n\n", st, 100 * st / s }'
  cpin() { if [[ -f "$OUT/$1-pinned.cpu" ]]; then c "$1-pinned" cpu_us; else echo 0; fi; }
  awk -v s="$(c secret cpu_us)" -v p="$(c pkjwt cpu_us)" -v st="$(c secret-tls cpu_us)" \
    -v pt="$(c pkjwt-tls cpu_us)" -v bs="$(c bad-signature cpu_us)" -v po="$(c policy cpu_us)" \
    -v sp="$(cpin secret)" -v pp="$(cpin pkjwt)" -v bsp="$(cpin bad-signature)" -v pop="$(cpin policy)" \
    -v f="$(c floor cpu_us)" -v fp="$(cpin floor)" \
    -v b="${BARE_US:-0}" -v d="${DECIDE_US:-0}" -v rh="$RSS_HTTP" -v rt="$RSS_TLS" \
    -v rhp="$(cat "$OUT/rss-http-pinned" 2>/dev/null || echo 0)" -v rtp="$(cat "$OUT/rss-tls-pinned" 2>/dev/null || echo 0)" 'BEGIN {
    printf "| target | measured (shared cores; pinned) | met |\n|---|---|---|\n"
    worst = (s / f > (fp > 0 ? sp / fp : 0) ? s / f : sp / fp)
    printf "| allowed, client secret ≤ 1.3 × the floor of the stack | %.0f µs / %.0f µs = %.2f ×; pinned %.0f µs / %.0f µs = %.2f × | %s |\n", s, f, s / f, sp, fp, (fp > 0 ? sp / fp : 0), (worst <= 1.3 ? "yes" : "no")
    printf "| allowed, private_key_jwt (for reference: the floor signs no assertion) | %.0f µs; %.0f µs (TLS: %.0f µs; client secret over TLS %.0f µs) | - |\n", p, pp, pt, st
    if (b > 0) {
      worst = (bs > po ? bs : po)
      printf "| refused ≤ 1.5 × bare RS256 (%.1f µs) | bad signature %.2f ×, policy %.2f ×; pinned %.2f ×, %.2f × | %s |\n", b, bs / b, po / b, bsp / b, pop / b, (worst / b <= 1.5 ? "yes" : "no")
      printf "| criterion decision ≤ 1.3 × bare RS256 | %.2f × | %s |\n", d / b, (d / b <= 1.3 ? "yes" : "no")
    }
    peak = (rh > rt ? rh : rt); peak = (rhp > peak ? rhp : peak); peak = (rtp > peak ? rtp : peak)
    printf "| peak RSS ≤ 64 MB | %.1f MiB | %s |\n", peak, (peak * 1.048576 <= 64 ? "yes" : "no")
  }'
} | tee "$OUT/results.md"
