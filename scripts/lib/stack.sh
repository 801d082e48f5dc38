# The demo's processes besides Keycloak, shared by scripts/demo.sh and
# scripts/resource-servers.sh: the local Bitbucket-compatible issuer on
# 127.0.0.1:18082 and keycloak-ci-sts on 127.0.0.1:18081 (demo/sts.toml: the
# realm's sts-deploy client fetches the service's keys from that address).
# Source it from the repository root; it sets BIN, STS_URL, ISSUER_URL,
# DEMO_DIR, the demo's UUIDs and the array stack_pids.

BIN="${CARGO_TARGET_DIR:-target}/debug"
STS_URL="http://127.0.0.1:18081"
ISSUER_URL="http://127.0.0.1:18082"
WORKSPACE_UUID="{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}"
REPOSITORY_UUID="{d4e45493-4a33-477d-917b-a24e7e4bd39b}"
WEB_REPOSITORY_UUID="{9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d}"
PRODUCTION_ENV_UUID="{bd715740-c970-486b-b68a-b421ec2a1f8b}"
DEMO_DIR=target/demo
stack_pids=()

wait_http() { # url, seconds, [pid, log file]: fails early (with the log) if pid dies
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    if [[ -n "${3:-}" ]] && ! kill -0 "$3" 2>/dev/null; then
      echo "process $3 exited; last lines of $4:" >&2
      tail -n 20 "$4" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "timed out waiting for $1${4:+; see $4}" >&2
  return 1
}

# The service's two keys (client assertions; repository assertions), once.
stack_keys() {
  mkdir -p "$DEMO_DIR"
  if [[ ! -f "$DEMO_DIR/sts-signing-key.pem" ]]; then
    "$BIN"/keycloak-ci-sts keys generate --out "$DEMO_DIR/sts-signing-key.pem" >/dev/null
  fi
  if [[ ! -f "$DEMO_DIR/sts-identity-key.pem" ]]; then
    "$BIN"/keycloak-ci-sts keys generate --out "$DEMO_DIR/sts-identity-key.pem" >/dev/null
  fi
}

# Starts the issuer and the service (Keycloak must be up, realm ci provisioned)
# and waits until both answer.
stack_start() {
  : >"$DEMO_DIR/audit.jsonl"
  "$BIN"/bitbucket-dev-issuer --listen 127.0.0.1:18082 2>"$DEMO_DIR/issuer.log" &
  stack_pids+=($!)
  KCS_DEMO_STS_ARTIFACTS_SECRET=sts-artifacts-test-secret \
    "$BIN"/keycloak-ci-sts serve --config demo/sts.toml 2>"$DEMO_DIR/sts.log" &
  stack_pids+=($!)
  wait_http "$ISSUER_URL/2.0/workspaces/acme/pipelines-config/identity/oidc/.well-known/openid-configuration" 30 "${stack_pids[0]}" "$DEMO_DIR/issuer.log"
  wait_http "$STS_URL/readyz" 60 "${stack_pids[1]}" "$DEMO_DIR/sts.log"
}

# The Python resource server's virtualenv (examples/resource-servers/python,
# pinned packages from PyPI), cached outside the clone; sets KIT_PYTHON.
kit_python() {
  local req=examples/resource-servers/python/requirements.txt env
  env="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}/resource-servers/python-$(sha256sum "$req" | cut -c1-16)"
  if ! "$env/bin/python" -c 'import jwt, cryptography' 2>/dev/null; then
    echo "installing $req (cached in $env)"
    rm -rf "$env"
    python3 -m venv "$env"
    "$env/bin/pip" install -q --no-deps -r "$req"
  fi
  KIT_PYTHON="$env/bin/python"
}

wait_port() { # port, seconds: until something accepts connections on 127.0.0.1:port
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "nothing listens on 127.0.0.1:$1 after $2 s" >&2
  return 1
}

stack_stop() {
  local p
  for p in "${stack_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${stack_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  stack_pids=()
}
