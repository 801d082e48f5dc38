#!/usr/bin/env bash
# The whole product on one machine, in one command:
#   Keycloak on 127.0.0.1:18080 (realm tests/keycloak/realm-ci.json: the realm and
#   two admin clients; `keycloak apply` creates everything else from policies/),
#   a local Bitbucket-compatible OIDC issuer on 127.0.0.1:18082,
#   keycloak-ci-sts on 127.0.0.1:18081 (demo/sts.toml, policies/).
# It mints a pipeline-shaped token, exchanges it with the curl line of
# bitbucket-pipelines.yml, prints the Keycloak token's claims and the audit line,
# presents the token to a deploy API (examples/resource-servers/python on
# 127.0.0.1:18131: accepted; the same step's artifact token: refused),
# exchanges acme/web's token for one of its own Keycloak user (JWT Authorization
# Grant), then shows a denied request. Everything is stopped at the end unless
# DEMO_KEEP_RUNNING=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/stack.sh
source scripts/lib/stack.sh

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Decodes a JWT's payload (base64url) for display.
jwt_claims() {
  local p
  p=$(cut -d. -f2 <<<"$1" | tr '_-' '/+')
  while ((${#p} % 4)); do p+='='; done
  base64 -d <<<"$p" | jq .
}

cleanup() {
  if [[ "${DEMO_KEEP_RUNNING:-0}" == 1 ]]; then
    echo "left running: Keycloak, issuer (pid ${stack_pids[0]:-}), keycloak-ci-sts (pid ${stack_pids[1]:-}), the deploy API on 127.0.0.1:18131 (pid ${stack_pids[2]:-}); stop with: kill ${stack_pids[*]:-}; bash scripts/keycloak.sh stop"
    return
  fi
  stack_stop
  bash scripts/keycloak.sh stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

bash scripts/bootstrap.sh
say "Building"
cargo build --locked --workspace --bins
stack_keys

say "Starting Keycloak (first run fetches it with Maven; about a minute)"
bash scripts/keycloak.sh start

say "Configuring the realm from the policies (keycloak plan, then keycloak apply)"
KCS_ADMIN_CLIENT_ID=kcs-admin-view KCS_ADMIN_CLIENT_SECRET=kcs-admin-view-test-secret \
  "$BIN"/keycloak-ci-sts keycloak plan --config demo/sts.toml | grep -v '^    ' || true
bash scripts/keycloak.sh provision

say "Starting the local Bitbucket-compatible issuer and keycloak-ci-sts"
stack_start
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

say "The deploy API (examples/resource-servers/python) accepts the production step's token"
kit_python >/dev/null
RS_ISSUER=http://127.0.0.1:18080/realms/ci RS_AUDIENCE=deploy-api RS_ROLE=deploy RS_AZP=sts-deploy \
  RS_LISTEN=127.0.0.1:18131 "$KIT_PYTHON" examples/resource-servers/python/server.py 2>"$DEMO_DIR/deploy-api.log" &
stack_pids+=($!)
wait_port 18131 30
DEPLOY_API_TOKEN=$(jq -r .access_token <<<"$RESPONSE")
curl -sS -w ' HTTP %{http_code}\n' -H "Authorization: Bearer $DEPLOY_API_TOKEN" http://127.0.0.1:18131/deploy

say "It refuses the same step's artifact-api token: the wrong audience"
ARTIFACT_TOKEN=$(curl -sS --fail-with-body "$STS_URL/token" \
  -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
  -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
  --data-urlencode "subject_token=$BITBUCKET_STEP_OIDC_TOKEN" \
  -d audience=artifact-api | jq -r .access_token)
curl -sS -w ' HTTP %{http_code}\n' -H "Authorization: Bearer $ARTIFACT_TOKEN" http://127.0.0.1:18131/deploy

say "acme/web's main build asks for release-api: a token of the repository's own Keycloak user (JWT Authorization Grant)"
WEB_TOKEN=$(mint "{\"workspace\":\"acme\",\"workspace_uuid\":\"$WORKSPACE_UUID\",\"repository_uuid\":\"$WEB_REPOSITORY_UUID\",\"branch_name\":\"main\",\"audiences\":[\"https://sts.example.test\"]}")
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
echo "(so the feature branch has no token to present to the deploy API)"
say "Done"
