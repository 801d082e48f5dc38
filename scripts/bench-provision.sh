#!/usr/bin/env bash
# What provisioning costs at organisation size (issue #21, the Keycloak side of
# scripts/bench-scale.sh): for each size N, a blank realm `benchN` (the admin
# clients of tests/keycloak/realm-ci.json only) on the local Keycloak
# (scripts/keycloak.sh, 26.7.3 by default), the demo's configuration and
# policies with release-web.yaml admitting the whole workspace as repository
# identities, and an inventory of N repositories. Then, with the release build:
#   1. `keycloak plan` on the blank realm (exit 3),
#   2. `keycloak apply` (exit 0),
#   3. `keycloak plan` again, which must report no change (exit 0),
# each with its wall time, the Admin API calls it counted (by kind) and
# Keycloak's RSS after it. The realm is deleted afterwards. One untimed cycle of
# BENCH_PROVISION_WARMUP repositories (default 1000) runs first: a Keycloak
# just started answers slower until its JIT has compiled the paths. The
# no-change plan is the first after the apply, so it finds Keycloak's user
# cache cold, as an operator's plan after an apply would.
#
#   scripts/bench-provision.sh      # BENCH_PROVISION_SIZES="1000 5000 20000"
#                                   # BENCH_PROVISION_CONCURRENCY=4
#
# Results: ./target/bench-provision/results.md. Starts Keycloak when it is not
# running (ports 18080 and 19000: not beside the test suite).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
SIZES="${BENCH_PROVISION_SIZES:-1000 5000 20000}"
CONCURRENCY="${BENCH_PROVISION_CONCURRENCY:-4}"
OUT="$REPO/target/bench-provision"
mkdir -p "$OUT"

bash scripts/keycloak.sh status >/dev/null 2>&1 || bash scripts/keycloak.sh start
eval "$(bash scripts/keycloak.sh env)"
KC="$KCS_KEYCLOAK_URL"
cargo build --release --locked --bin keycloak-ci-sts
BIN="$REPO/target/release/keycloak-ci-sts"
# kc.sh's JVM (the pid file names the kc.sh shell).
KC_PID="$(pgrep -P "$(tr -dc '0-9' <"$REPO/target/keycloak/keycloak.pid")" java | head -n1)"

master_token() {
  curl -sf -d grant_type=password -d client_id=admin-cli \
    --data-urlencode "username=$KCS_KEYCLOAK_ADMIN_USER" \
    --data-urlencode "password=$KCS_KEYCLOAK_ADMIN_PASSWORD" \
    "$KC/realms/master/protocol/openid-connect/token" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}

# A blank realm: the two admin clients of realm-ci.json, renamed.
fresh_realm() {
  local realm="$1" token
  token="$(master_token)"
  curl -s -o /dev/null -X DELETE -H "Authorization: Bearer $token" "$KC/admin/realms/$realm"
  python3 -c 'import json, sys; r = json.load(open(sys.argv[2])); r["realm"] = sys.argv[1]; print(json.dumps(r))' \
    "$realm" "$REPO/tests/keycloak/realm-ci.json" >"$OUT/realm.json"
  curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    --data-binary @"$OUT/realm.json" "$KC/admin/realms" >/dev/null
}

drop_realm() {
  curl -s -o /dev/null -X DELETE -H "Authorization: Bearer $(master_token)" "$KC/admin/realms/$1"
}

# The demo's configuration and policies for realm $2 in directory $3, with N=$1 repositories.
setup() {
  local n="$1" realm="$2" dir="$3"
  rm -rf "$dir" && mkdir -p "$dir"
  cp -r "$REPO/policies" "$dir/policies"
  python3 - "$n" "$dir/policies" <<'EOF'
import os, sys, uuid
n, pol = int(sys.argv[1]), sys.argv[2]
ns = uuid.UUID("6f1c1f0e-6c65-4b8e-9a51-2d8b0c7e1a11")
# The demo's repositories (the other policies name them) and N more, sorted by UUID.
head, _, body = open(f"{pol}/inventory/acme.yaml").read().partition("repositories:\n")
entries = ["- uuid:" + e.rstrip("\n") + "\n" for e in ("\n" + body).split("\n- uuid:")[1:]]
entries += [f"- uuid: '{{{uuid.uuid5(ns, f'repo-{i}')}}}'\n  full_name: acme/repo-{i:05d}\n" for i in range(n)]
entries.sort(key=lambda e: e.split("'")[1])
open(f"{pol}/inventory/acme.yaml", "w").write(head + "repositories:\n" + "".join(entries))
# release-deploy-service gives acme/deploy-service's identity other groups: one
# policy admits the workspace here.
os.remove(f"{pol}/release-deploy-service.yaml")
p = open(f"{pol}/release-web.yaml").read().replace("  repository: acme/web\n", "")
open(f"{pol}/release-web.yaml", "w").write(p)
EOF
  sed -e "s|^realm = \"ci\"|realm = \"$realm\"|" \
    -e "s|^policies_dir = .*|policies_dir = \"$dir/policies\"|" \
    -e "s|\.\./target/|$REPO/target/|g" "$REPO/demo/sts.toml" >"$dir/sts.toml"
}

rss_mib() { awk '/^VmRSS/ {printf "%d", $2/1024}' "/proc/$KC_PID/status"; }

# Runs `keycloak $1` as admin client $2; prints "seconds|exit|calls|rss".
step() {
  local cmd="$1" client="$2" secret="$3" dir="$4" start end code=0
  start="$(date +%s.%N)"
  KCS_ADMIN_CLIENT_ID="$client" KCS_ADMIN_CLIENT_SECRET="$secret" \
    KCS_DEMO_STS_ARTIFACTS_SECRET=sts-artifacts-test-secret \
    "$BIN" keycloak "$cmd" --config "$dir/sts.toml" --concurrency "$CONCURRENCY" \
    >"$dir/$cmd.$client.out" 2>"$dir/$cmd.$client.err" || code=$?
  end="$(date +%s.%N)"
  local calls
  calls="$(sed -n 's/^Admin API calls: //p' "$dir/$cmd.$client.err" | tail -n1)"
  printf '%.1f|%s|%s|%s\n' "$(echo "$end - $start" | bc)" "$code" "$calls" "$(rss_mib)"
}

{
  echo "| repositories | plan, blank realm | apply, blank realm | plan again (no change) | Keycloak RSS after |"
  echo "|---|---|---|---|---|"
} >"$OUT/results.md"
: >"$OUT/calls.md"
WARMUP="${BENCH_PROVISION_WARMUP:-1000}"
for n in warmup $SIZES; do
  size="$n"
  [ "$n" = warmup ] && size="$WARMUP"
  realm="bench$n" dir="$OUT/$n"
  echo "bench-provision: $size repositories in realm $realm" >&2
  fresh_realm "$realm"
  setup "$size" "$realm" "$dir"
  IFS='|' read -r t1 c1 k1 r1 <<<"$(step plan kcs-admin-view kcs-admin-view-test-secret "$dir")"
  IFS='|' read -r t2 c2 k2 r2 <<<"$(step apply kcs-admin-manage kcs-admin-manage-test-secret "$dir")"
  IFS='|' read -r t3 c3 k3 r3 <<<"$(step plan kcs-admin-view kcs-admin-view-test-secret "$dir")"
  [ "$c1" = 3 ] && [ "$c2" = 0 ] && [ "$c3" = 0 ] || {
    echo "bench-provision: unexpected exits $c1 $c2 $c3 (want 3 0 0); see $dir" >&2
    exit 1
  }
  drop_realm "$realm"
  [ "$n" = warmup ] && continue
  echo "| $n | $t1 s | $t2 s | $t3 s | $r3 MiB |" >>"$OUT/results.md"
  printf -- "- %s repositories: plan %s; apply %s; plan again %s\n" "$n" "$k1" "$k2" "$k3" >>"$OUT/calls.md"
done
cat "$OUT/results.md" "$OUT/calls.md"
