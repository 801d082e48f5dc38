#!/usr/bin/env bash
# Load benchmark, one machine, one run:
#   (a) client_credentials requests straight to the real Keycloak (client sts-artifacts),
#   (b) the same exchanges through keycloak-ci-sts against the same Keycloak,
#   (c) keycloak-ci-sts against a stub token endpoint that answers instantly,
#   (d) exchanges through keycloak-ci-sts by the JWT Authorization Grant (client
#       sts-repo, a token of the repository's own user) against the same Keycloak
#       as (b), measured right after (b) so the two compare within one run; with
#       the service's CPU time per exchange for (b) and (d) (utime+stime from
#       /proc/<pid>/stat around the measured run, divided by the requests).
# For each: throughput, p50 and p99 latency, and (b, c) the service's peak RSS;
# then the ratios against the targets. Results: target/bench/results.md.
#
#   scripts/bench.sh   # BENCH_DURATION=20 BENCH_WARMUP=10 BENCH_KEYCLOAK_WARMUP=40
#                      # BENCH_CONNECTIONS=32 BENCH_LOG=warn
#
# Run it on an otherwise idle machine: the load generator, Keycloak and the service
# share its cores.
#
# Needs what scripts/test.sh needs, plus wrk (installed from Debian's packages when
# running as root). Uses ports 18080, 19000 (Keycloak), 18091-18093.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DURATION="${BENCH_DURATION:-20}"
WARMUP="${BENCH_WARMUP:-10}"
KEYCLOAK_WARMUP="${BENCH_KEYCLOAK_WARMUP:-40}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
LOG="${BENCH_LOG:-warn}"
OUT=target/bench
ISSUER=http://127.0.0.1:18092
WORKSPACE_UUID="{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}"
REPOSITORY_UUID="{d4e45493-4a33-477d-917b-a24e7e4bd39b}"
BIN="${CARGO_TARGET_DIR:-target}/release"

bash scripts/bootstrap.sh
if ! command -v wrk >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "bench: wrk is required (apt-get install wrk)" >&2
    exit 1
  fi
fi

echo "== building (release)"
cargo build --release --locked --workspace --bins
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/audit-*.jsonl
[[ -f "$OUT/sts-signing-key.pem" ]] || "$BIN/keycloak-ci-sts" keys generate --out "$OUT/sts-signing-key.pem" >/dev/null
[[ -f "$OUT/sts-identity-key.pem" ]] || "$BIN/keycloak-ci-sts" keys generate --out "$OUT/sts-identity-key.pem" >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  bash scripts/keycloak.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_http() {
  local i
  for ((i = 0; i < 300; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "timed out waiting for $1" >&2
  return 1
}

echo "== starting Keycloak, the local issuer (with a stub Keycloak realm)"
bash scripts/keycloak.sh start
"$BIN/bitbucket-dev-issuer" --listen 127.0.0.1:18092 --keycloak-stub --workers 1 2>"$OUT/issuer.log" &
pids+=($!)
wait_http "$ISSUER/2.0/workspaces/acme/pipelines-config/identity/oidc/keys.json"

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
issuer = "$ISSUER/2.0/workspaces/acme/pipelines-config/identity/oidc"
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

[audit]
path = "$PWD/$OUT/audit-$1.jsonl"
TOML
}

# The realm's clients, scopes and resource servers, with sts-deploy's JWKS URL
# pointing at the instance on 18091 (keycloak apply, the manage admin client).
config 18091 http://127.0.0.1:18080 >"$OUT/sts-18091.toml"
KCS_ADMIN_CLIENT_ID=kcs-admin-manage KCS_ADMIN_CLIENT_SECRET=kcs-admin-manage-test-secret \
  KCS_BENCH_SECRET=sts-artifacts-test-secret \
  "$BIN/keycloak-ci-sts" keycloak apply --config "$OUT/sts-18091.toml" >/dev/null

start_sts() { # port keycloak_url -> pid in STS_PID
  config "$1" "$2" >"$OUT/sts-$1.toml"
  RUST_LOG="$LOG" KCS_BENCH_SECRET=sts-artifacts-test-secret \
    "$BIN/keycloak-ci-sts" serve --config "$OUT/sts-$1.toml" 2>"$OUT/sts-$1.log" &
  STS_PID=$!
  pids+=("$STS_PID")
  wait_http "http://127.0.0.1:$1/readyz"
}

TOKEN=$(curl -fsS -X POST "$ISSUER/mint" -H 'Content-Type: application/json' \
  -d "{\"workspace\":\"acme\",\"workspace_uuid\":\"$WORKSPACE_UUID\",\"repository_uuid\":\"$REPOSITORY_UUID\",\"branch_name\":\"main\",\"audiences\":[\"https://sts.example.test\"],\"lifetime_seconds\":7200}")
EXCHANGE_BODY="grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token&audience=artifact-api&subject_token=$TOKEN"
# (d): the same step token, audience release-api: policy release-deploy-service,
# client sts-repo, a token of acme/deploy-service's own Keycloak user.
RELEASE_BODY="grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token&audience=release-api&subject_token=$TOKEN"
DIRECT_BODY="grant_type=client_credentials&scope=artifacts%3Aread"
DIRECT_AUTH="Basic $(printf 'sts-artifacts:sts-artifacts-test-secret' | base64 -w0)"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)

run() { # name url body auth [connections]: warm-up, then the measured run; with
  # CPU_PID set, also the service's CPU µs per request of the measured run
  local c="${5:-$CONNECTIONS}" t=2 before after
  ((c < 2)) && t=1
  BENCH_BODY="$3" BENCH_AUTH="$4" wrk -t"$t" -c"$c" -d"${WARMUP}s" -s bench/report.lua "$2" >/dev/null
  [[ -n "${CPU_PID:-}" ]] && before=$(cpu_ticks "$CPU_PID")
  BENCH_BODY="$3" BENCH_AUTH="$4" wrk -t"$t" -c"$c" -d"${DURATION}s" --timeout 10s -s bench/report.lua "$2" |
    tail -n 1 >"$OUT/$1.json"
  if [[ -n "${CPU_PID:-}" ]]; then
    after=$(cpu_ticks "$CPU_PID")
    jq -r --argjson t "$((after - before))" --argjson hz "$CLK_TCK" --argjson d "$DURATION" \
      '($t / $hz * 1000000) / ((.rps * $d) | if . < 1 then 1 else . end) | floor' "$OUT/$1.json" >"$OUT/$1.cpu"
  fi
  echo "$1: $(cat "$OUT/$1.json")"
}

peak_rss_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

echo "== warming Keycloak up (${KEYCLOAK_WARMUP}s of direct load; its JIT compiles the hot paths)"
BENCH_BODY="$DIRECT_BODY" BENCH_AUTH="$DIRECT_AUTH" wrk -t2 -c"$CONNECTIONS" -d"${KEYCLOAK_WARMUP}s" -s bench/report.lua \
  http://127.0.0.1:18080/realms/ci/protocol/openid-connect/token >/dev/null

KC_TOKEN_URL=http://127.0.0.1:18080/realms/ci/protocol/openid-connect/token
echo "== (a) Keycloak direct: throughput ($CONNECTIONS connections) and latency (1 connection)"
run a "$KC_TOKEN_URL" "$DIRECT_BODY" "$DIRECT_AUTH"
run a1 "$KC_TOKEN_URL" "$DIRECT_BODY" "$DIRECT_AUTH" 1

echo "== (b) through keycloak-ci-sts, same Keycloak; (d) the JWT Authorization Grant right after"
start_sts 18091 http://127.0.0.1:18080
CPU_PID="$STS_PID" run b http://127.0.0.1:18091/token "$EXCHANGE_BODY" ""
CPU_PID="$STS_PID" run d http://127.0.0.1:18091/token "$RELEASE_BODY" ""
run b1 http://127.0.0.1:18091/token "$EXCHANGE_BODY" "" 1
RSS_B=$(peak_rss_mib "$STS_PID")
kill "$STS_PID"

echo "== (c) keycloak-ci-sts against a stub token endpoint"
start_sts 18093 "$ISSUER"
run c http://127.0.0.1:18093/token "$EXCHANGE_BODY" ""
RSS_C=$(peak_rss_mib "$STS_PID")

j() { jq -r ".$2" "$OUT/$1.json"; }
{
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(uname -sr); wrk -t2 -c$CONNECTIONS -d${DURATION}s; RUST_LOG=$LOG; $(date -u +%Y-%m-%d)"
  echo
  echo "| scenario | requests/s | p50 ms | p99 ms | errors | service peak RSS MiB |"
  echo "|---|---|---|---|---|---|"
  echo "| (a) Keycloak client_credentials, direct, $CONNECTIONS connections | $(j a rps) | $(j a p50_ms) | $(j a p99_ms) | $(j a errors) | - |"
  echo "| (b) token exchange through keycloak-ci-sts, $CONNECTIONS connections | $(j b rps) | $(j b p50_ms) | $(j b p99_ms) | $(j b errors) | $RSS_B |"
  echo "| (a) direct, 1 connection | $(j a1 rps) | $(j a1 p50_ms) | $(j a1 p99_ms) | $(j a1 errors) | - |"
  echo "| (b) through the service, 1 connection | $(j b1 rps) | $(j b1 p50_ms) | $(j b1 p99_ms) | $(j b1 errors) | - |"
  echo "| (c) keycloak-ci-sts, stub token endpoint | $(j c rps) | $(j c p50_ms) | $(j c p99_ms) | $(j c errors) | $RSS_C |"
  echo "| (d) JWT Authorization Grant through keycloak-ci-sts, $CONNECTIONS connections | $(j d rps) | $(j d p50_ms) | $(j d p99_ms) | $(j d errors) | - |"
  echo
  echo "Service CPU per exchange: (b) client_credentials + client secret $(cat "$OUT/b.cpu") µs, (d) JWT Authorization Grant + private_key_jwt $(cat "$OUT/d.cpu") µs."
  awk -v br="$(j b rps)" -v dr="$(j d rps)" 'BEGIN { printf "JWT Authorization Grant vs client_credentials, same Keycloak, same run: %.2f ×\n", dr / br }'
  echo
  awk -v ar="$(j a rps)" -v br="$(j b rps)" -v a50="$(j a1 p50_ms)" -v b50="$(j b1 p50_ms)" \
    -v a99="$(j a1 p99_ms)" -v b99="$(j b1 p99_ms)" -v cr="$(j c rps)" -v rb="$RSS_B" -v rc="$RSS_C" 'BEGIN {
    printf "| target | measured | met |\n|---|---|---|\n"
    printf "| (b) throughput ≥ 0.9 × (a) | %.2f × | %s |\n", br / ar, (br / ar >= 0.9 ? "yes" : "no")
    printf "| added p50 ≤ 1 ms (1 connection) | %.2f ms | %s |\n", b50 - a50, (b50 - a50 <= 1 ? "yes" : "no")
    printf "| added p99 ≤ 3 ms (1 connection) | %.2f ms | %s |\n", b99 - a99, (b99 - a99 <= 3 ? "yes" : "no")
    printf "| (c) ≥ 15000 exchanges/s | %.0f /s | %s |\n", cr, (cr >= 15000 ? "yes" : "no")
    peak = (rb > rc ? rb : rc)
    printf "| peak RSS ≤ 64 MB | %.1f MiB | %s |\n", peak, (peak * 1.048576 <= 64 ? "yes" : "no")
  }'
} | tee "$OUT/results.md"
