#!/usr/bin/env bash
# Provisioning compatibility (issue #21): realm ci as an earlier build's
# `keycloak apply` left it (tests/keycloak/exported, Keycloak's own export) must
# plan as in sync with this build, and a drifted copy of it must plan as the
# golden text says, and after `keycloak apply` as in sync again. Starts Keycloak with that realm (scripts/keycloak.sh,
# KC_REALM_DIR), so no other Keycloak of this clone may be running; needs
# target/debug/keycloak-ci-sts. The blank realm's golden plan is checked by
# scripts/test.sh before it provisions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export KC_REALM_DIR="$PWD/tests/keycloak/exported"
trap 'bash scripts/keycloak.sh stop || true' EXIT
bash scripts/keycloak.sh start
eval "$(bash scripts/keycloak.sh env)"

echo "== realm ci as applied before the provisioning rebuild: no change"
bash scripts/plan-golden.sh applied-before-21 0

echo "== the same realm drifted by hand: the golden plan"
url="$KCS_KEYCLOAK_URL"
token=$(curl -sf -d grant_type=password -d client_id=admin-cli \
  --data-urlencode "username=$KCS_KEYCLOAK_ADMIN_USER" --data-urlencode "password=$KCS_KEYCLOAK_ADMIN_PASSWORD" \
  "$url/realms/master/protocol/openid-connect/token" | jq -er .access_token)
admin() { # method path [json on stdin]
  curl -sf -X "$1" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    ${3:+--data-binary @-} "$url/admin/realms/ci$2"
}
# a client's token lifespan raised, a full-scope switch turned on
cid=$(admin GET "/clients?clientId=sts-deploy" | jq -er '.[0].id')
admin GET "/clients/$cid" |
  jq '.attributes["access.token.lifespan"] = "3600" | .fullScopeAllowed = true' |
  admin PUT "/clients/$cid" body
# a repository user's attribute edited, and its groups left
uid=$(admin GET "/users?username=bitbucket.03b741e3-cf4a-41f9-9a59-cec52e21bdc3.d4e45493-4a33-477d-917b-a24e7e4bd39b&exact=true" | jq -er '.[0].id')
admin GET "/users/$uid" | jq '.attributes.repositoryFullName = ["acme/renamed"]' | admin PUT "/users/$uid" body
for gid in $(admin GET "/users/$uid/groups" | jq -r '.[].id'); do
  admin DELETE "/users/$uid/groups/$gid"
done
bash scripts/plan-golden.sh drifted 3

echo "== apply repairs the drift; the realm plans as in sync again"
bash scripts/keycloak.sh provision
bash scripts/plan-golden.sh applied-before-21 0
