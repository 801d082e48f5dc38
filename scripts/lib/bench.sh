# Shared by scripts/bench-cpu.sh and scripts/bench-scale.sh (sourced, not run):
# the step tokens, the request bodies, the CPU and memory readings and the floor
# of the stack. The caller sets BIN (the release binaries), OUT (its results
# directory), STUB (the local issuer with its stub Keycloak realm) and the
# pids array (what its cleanup kills).

WORKSPACE_UUID="{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}"
REPOSITORY_UUID="{d4e45493-4a33-477d-917b-a24e7e4bd39b}"
PRODUCTION_UUID="{bd715740-c970-486b-b68a-b421ec2a1f8b}"
ISSUER_PATH=/2.0/workspaces/acme/pipelines-config/identity/oidc
CLK_TCK=$(getconf CLK_TCK)

# wrk, from Debian's packages when running as root.
need_wrk() { # caller's name for the message
  command -v wrk >/dev/null 2>&1 && return 0
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "$1: wrk is required (apt-get install wrk)" >&2
    return 1
  fi
}

wait_http() { # pid log curl-arguments...: until the URL answers, while the process lives
  local i pid=$1 log=$2
  shift 2
  for ((i = 0; i < 3000; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      # e.g. its port taken by another process: never measure someone else
      echo "bench: the process for $* exited:" >&2
      tail -n 5 "$log" >&2
      return 1
    fi
    curl -fsS -o /dev/null "$@" 2>/dev/null && return 0
    sleep 0.01
  done
  echo "bench: timed out waiting for $*" >&2
  return 1
}

mint() { # branch [deployment environment uuid]: a step token of repository REPOSITORY_UUID
  local env=""
  [[ -n "${2:-}" ]] && env=",\"deployment_environment_uuid\":\"$2\""
  curl -fsS -X POST "http://$STUB/mint" -H 'Content-Type: application/json' \
    -d "{\"workspace\":\"acme\",\"workspace_uuid\":\"$WORKSPACE_UUID\",\"repository_uuid\":\"$REPOSITORY_UUID\",\"branch_name\":\"$1\"$env,\"audiences\":[\"https://sts.example.test\"],\"lifetime_seconds\":7200}"
}
form() { # audience token: an RFC 8693 request body
  printf 'grant_type=urn%%3Aietf%%3Aparams%%3Aoauth%%3Agrant-type%%3Atoken-exchange&subject_token_type=urn%%3Aietf%%3Aparams%%3Aoauth%%3Atoken-type%%3Aid_token&audience=%s&subject_token=%s' "$1" "$2"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_rss_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# The floor of the stack (bench/floor): the least any implementation of the
# exchange does on the service's crates, allocator and worker count. It exchanges
# for client sts-artifacts (client_secret_basic) at the same stub token
# endpoint; compare it with the service's allowed client-secret exchange.
# Started with the caller's launcher (e.g. taskset) before the command, so the
# PID measured is the floor's own.
start_floor() { # port launcher... -> pid in FLOOR_PID
  local port=$1 audit="$OUT/floor-audit.jsonl"
  shift
  [[ $audit == /* ]] || audit="$PWD/$audit"
  FLOOR_CLIENT_SECRET=sts-artifacts-test-secret "$@" "$BIN/sts-floor" --listen "127.0.0.1:$port" \
    --jwks-url "http://$STUB$ISSUER_PATH/keys.json" --issuer "http://$STUB$ISSUER_PATH" \
    --audience https://sts.example.test --token-url "http://$STUB/realms/ci/protocol/openid-connect/token" \
    --client-id sts-artifacts --audit "$audit" 2>"$OUT/floor.log" &
  FLOOR_PID=$!
  pids+=("$FLOOR_PID")
  wait_http "$FLOOR_PID" "$OUT/floor.log" -X POST -o /dev/null "http://127.0.0.1:$port/token" \
    -H 'Content-Type: application/x-www-form-urlencoded' --data "$(form artifact-api "$(mint main)")"
}
stop_floor() {
  kill "$FLOOR_PID" 2>/dev/null || true
  wait "$FLOOR_PID" 2>/dev/null || true
  rm -f "$OUT/floor-audit.jsonl"
}
