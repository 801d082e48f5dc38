#!/usr/bin/env bash
# The whole product on one machine, in one command:
#   Keycloak on 127.0.0.1:18080 (realm tests/keycloak/realm-ci.json: the realm and
#   two admin clients; `keycloak apply` creates everything else from policies/),
#   a local Bitbucket-compatible OIDC issuer on 127.0.0.1:18082,
#   keycloak-ci-sts on 127.0.0.1:18081 (demo/sts.toml, policies/).
# It mints a pipeline-shaped token, exchanges it with the curl line of
# bitbucket-pipelines.yml, prints the Keycloak token's claims and the audit line,
# exchanges acme/web's token for one of its own Keycloak user (JWT Authorization
# Grant), then shows a denied request. Everything is stopped at the end unless
# DEMO_KEEP_RUNNING=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${CARGO_TARGET_DIR:-target}/debug"

STS_URL="http://127.0.0.1:18081"
ISSUER_URL="http://127.0.0.1:18082"
WORKSPACE_UUID="{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}"
REPOSITORY_UUID="{d4e45493-4a33-477d-917b-a24e7e4bd39b}"
PRODUCTION_ENV_UUID="{bd715740-c970-486b-b68a-b421ec2a1f8b}"
DEMO_DIR=target/demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Decodes a JWT's payload (base64url) for display.
jwt_claims() {
  local p
  p=$(cut -d. -f2 <<<"$1" | tr '_-' '/+')
  while ((${#p} % 4)); do p+='='; done
  base64 -d <<<"$p" | jq .
}

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

pids=()
cleanup() {
  if [[ "${DEMO_KEEP_RUNNING:-0}" == 1 ]]; then
    echo "left running: Keycloak, issuer (pid ${pids[0]:-}), keycloak-ci-sts (pid ${pids[1]:-}); stop with: kill ${pids[*]:-}; bash scripts/keycloak.sh stop"
    return
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  bash scripts/keycloak.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

bash scripts/bootstrap.sh
say "Building"
cargo build --locked --workspace --bins
mkdir -p "$DEMO_DIR"
: >"$DEMO_DIR/audit.jsonl"
if [[ ! -f "$DEMO_DIR/sts-signing-key.pem" ]]; then
  "$BIN"/keycloak-ci-sts keys generate --out "$DEMO_DIR/sts-signing-key.pem" >/dev/null
fi
if [[ ! -f "$DEMO_DIR/sts-identity-key.pem" ]]; then # repository assertions: a key of its own
  "$BIN"/keycloak-ci-sts keys generate --out "$DEMO_DIR/sts-identity-key.pem" >/dev/null
fi

say "Starting Keycloak (first run fetches it with Maven; about a minute)"
bash scripts/keycloak.sh start

say "Configuring the realm from the policies (keycloak plan, then keycloak apply)"
KCS_ADMIN_CLIENT_ID=kcs-admin-view KCS_ADMIN_CLIENT_SECRET=kcs-admin-view-test-secret \
  "$BIN"/keycloak-ci-sts keycloak plan --config demo/sts.toml | grep -v '^    ' || true
bash scripts/keycloak.sh provision

say "Starting the local Bitbucket-compatible issuer and keycloak-ci-sts"
"$BIN"/bitbucket-dev-issuer --listen 127.0.0.1:18082 2>"$DEMO_DIR/issuer.log" &
pids+=($!)
KCS_DEMO_STS_ARTIFACTS_SECRET=sts-artifacts-test-secret \
  "$BIN"/keycloak-ci-sts serve --config demo/sts.toml 2>"$DEMO_DIR/sts.log" &
pids+=($!)
wait_http "$ISSUER_URL/2.0/workspaces/acme/pipelines-config/identity/oidc/.well-known/openid-configuration" 30 "${pids[0]}" "$DEMO_DIR/issuer.log"
wait_http "$STS_URL/readyz" 60 "${pids[1]}" "$DEMO_DIR/sts.log"
echo "keycloak-ci-sts ready: $(curl -fsS "$STS_URL/readyz")"

mint() { # JSON step description -> token
  curl -fsS -X POST "$ISSUER_URL/mint" -H 'Content-Type: application/json' -d "$1"
}

say "A production deployment step of the deploy repository (main) gets its OIDC token"
BITBUCKET_STEP_OIDC_TOKEN=$(mint "{\"workspace\":\"acme\",\"workspace_uuid\":\"$WORKSPACE_UUID\",\"repository_uuid\":\"$REPOSITORY_UUID\",\"branch_name\":\"main\",\"deployment_environment_uuid\":\"$PRODUCTION_ENV_UUID\",\"audiences\":[\"https://sts.example.test\"]}")
jwt_claims "$BITBUCKET_STEP_OIDC_TOKEN"

say "It exchanges the token (the curl line of bitbucket-pipelines.yml)"
RESPONSE=$(curl -sS --fail-with-body "$STS_URL/token" \
  -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
  -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
  --data-urlencode "subject_token=$BITBUCKET_STEP_OIDC_TOKEN" \
  -d audience=deploy-api -d scope=deploy:production)
jq '.access_token |= (.[0:24] + "…")' <<<"$RESPONSE"

say "Claims of the Keycloak access token it received"
jwt_claims "$(jq -r .access_token <<<"$RESPONSE")"

say "The audit line tying the pipeline step to that token"
tail -n 1 "$DEMO_DIR/audit.jsonl" | jq .

say "acme/web's main build asks for release-api: a token of the repository's own Keycloak user (JWT Authorization Grant)"
WEB_TOKEN=$(mint "{\"workspace\":\"acme\",\"workspace_uuid\":\"$WORKSPACE_UUID\",\"repository_uuid\":\"{9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d}\",\"branch_name\":\"main\",\"audiences\":[\"https://sts.example.test\"]}")
WEB_RESPONSE=$(curl -sS --fail-with-body "$STS_URL/token" \
  -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
  -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
  --data-urlencode "subject_token=$WEB_TOKEN" \
  -d audience=release-api)
jwt_claims "$(jq -r .access_token <<<"$WEB_RESPONSE")" |
  jq '{sub, preferred_username, repository, repository_uuid, workspace_uuid, azp, scope, resource_access, lifetime_seconds: (.exp - .iat)}'
tail -n 1 "$DEMO_DIR/audit.jsonl" | jq -c '{outcome, repository_full_name, identity, keycloak_user_id, policy}'

say "A feature-branch step of the deploy repository asks for deploy-api: denied, Keycloak never called"
FEATURE_TOKEN=$(mint "{\"workspace\":\"acme\",\"workspace_uuid\":\"$WORKSPACE_UUID\",\"repository_uuid\":\"$REPOSITORY_UUID\",\"branch_name\":\"feature/login\",\"deployment_environment_uuid\":\"$PRODUCTION_ENV_UUID\",\"audiences\":[\"https://sts.example.test\"]}")
curl -sS -w '\nHTTP %{http_code}\n' "$STS_URL/token" \
  -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
  -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
  --data-urlencode "subject_token=$FEATURE_TOKEN" \
  -d audience=deploy-api -d scope=deploy:production
tail -n 1 "$DEMO_DIR/audit.jsonl" | jq -c '{outcome, error_code, branchName, policy, audience}'
say "Done"
