#!/usr/bin/env bash
# Builds the release artefacts of this commit (run by scripts/test.sh, which
# checks them; scripts/release-repro.sh checks that two clones build the same
# bytes):
#
#   scripts/release.sh [--out DIR]      (default: target/release-artifacts)
#
# Writes into DIR:
#   keycloak-ci-sts-<version>-x86_64-linux.tar.gz   the binary, its SBOM, LICENSE,
#       README.md, CHANGELOG.md, SECURITY.md, docs/compatibility.md, the example
#       configuration with example policies, the systemd unit, SHA256SUMS of those;
#   keycloak-ci-sts-<version>-x86_64-linux.cdx.json the CycloneDX SBOM of exactly
#       that binary (also inside the tarball);
#   keycloak-ci-sts-<version>.tgz                   the Helm chart, appVersion = version;
#   SHA256SUMS                                      of the three files above.
#
# The binary is the shared release build (scripts/lib/dist.sh; deploy-check.sh
# runs the same, so the test command builds it once). Its SBOM is converted by
# auditable2cdx from the dependency list cargo-auditable embedded in the binary
# at link time: what was compiled in, with the versions and sources Cargo
# resolved, not what a manifest could pull in. auditable2cdx writes no
# timestamp and no serial number; this script adds both, derived from the
# commit time (SOURCE_DATE_EPOCH) and the binary's SHA-256, so the SBOM is
# reproducible and names the binary it describes (metadata.component.hashes).
# Archives: sorted entries, owner 0:0, mtime SOURCE_DATE_EPOCH, `gzip -n`.
#
# Not yet in a release: signatures and build provenance (see the README,
# "Releases").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=target/release-artifacts
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) echo "usage: scripts/release.sh [--out DIR]" >&2; exit 2 ;;
  esac
done

CACHE="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}"
AUDITABLE2CDX_VERSION=0.1.0
HELM_VERSION=v3.22.0
CHART=deploy/helm/keycloak-ci-sts

version=$(sed -nE '/^\[package\]/,/^\[/ s/^version = "([^"]+)"$/\1/p' Cargo.toml | head -1)
chart_version=$(sed -nE 's/^version: *"?([^"]+)"?$/\1/p' "$CHART/Chart.yaml")
chart_app=$(sed -nE 's/^appVersion: *"?([^"]+)"?$/\1/p' "$CHART/Chart.yaml")
if [[ "$chart_version" != "$version" || "$chart_app" != "$version" ]]; then
  echo "release: Chart.yaml says version $chart_version, appVersion $chart_app; Cargo.toml says $version" >&2
  exit 1
fi
if ! grep -qE "^## $version - [0-9]{4}-[0-9]{2}-[0-9]{2}$" CHANGELOG.md; then
  echo "release: CHANGELOG.md has no '## $version - <date>' entry" >&2
  exit 1
fi
tag=$(git describe --tags --exact-match 2>/dev/null || true)
if [[ "$tag" != "v$version" ]]; then
  echo "release: HEAD is not tagged v$version: a snapshot build of $version"
fi

source scripts/lib/tools.sh
cargo_tool auditable2cdx "$AUDITABLE2CDX_VERSION"
HELM="$CACHE/helm-$HELM_VERSION/helm"
if [[ ! -x "$HELM" ]]; then
  echo "release: building helm $HELM_VERSION from its Go module (cached in $CACHE)"
  GOBIN="$CACHE/helm-$HELM_VERSION" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi

source scripts/lib/dist.sh
dist_build
commit="$DIST_COMMIT"
if [[ "$commit" == *-modified ]]; then
  echo "release: the tree has uncommitted changes: this build is not of commit ${commit%-modified}" >&2
fi

name="keycloak-ci-sts-$version-x86_64-linux"
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage="$work/$name"
mkdir -p "$stage/docs" "$stage/examples" "$stage/systemd"

install -m 0755 "$DIST_BIN" "$stage/keycloak-ci-sts"
install -m 0644 LICENSE README.md CHANGELOG.md SECURITY.md "$stage/"
install -m 0644 docs/compatibility.md "$stage/docs/"
install -m 0644 deploy/sts.example.toml "$stage/examples/sts.toml"
cp -r policies "$stage/examples/policies"
install -m 0644 deploy/systemd/keycloak-ci-sts.service deploy/systemd/keycloak-ci-sts.sysusers "$stage/systemd/"

# The SBOM: auditable2cdx, then the fields it leaves out (see the header).
"$KCS_TOOLS/bin/auditable2cdx" "$stage/keycloak-ci-sts" >"$work/raw.cdx.json"
python3 - "$work/raw.cdx.json" "$stage/keycloak-ci-sts" "$stage/keycloak-ci-sts.cdx.json" \
  "$SOURCE_DATE_EPOCH" "$commit" "$AUDITABLE2CDX_VERSION" <<'PY'
import hashlib, json, sys, time, uuid
raw, binary, dest, epoch, commit, tool_version = sys.argv[1:]
bom = json.load(open(raw))
digest = hashlib.sha256(open(binary, "rb").read()).hexdigest()
meta = bom.setdefault("metadata", {})
# The same binary always gets the same serial number.
bom["serialNumber"] = "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "keycloak-ci-sts:sha256:" + digest))
bom["version"] = 1
meta["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))
meta["tools"] = [{"vendor": "rust-secure-code", "name": "auditable2cdx", "version": tool_version}]
root = meta["component"]
# auditable2cdx 0.1.0 appends a local crate's qualifier with '&' (no '?').
root["purl"] = "pkg:cargo/%s@%s" % (root["name"], root["version"])
root["hashes"] = [{"alg": "SHA-256", "content": digest}]
root["properties"] = [{"name": "vcs:commit", "value": commit}]
bom["components"].sort(key=lambda c: (c["name"], c["version"], c["bom-ref"]))
with open(dest, "w") as f:
    json.dump(bom, f, indent=2, sort_keys=True)
    f.write("\n")
PY
cp "$stage/keycloak-ci-sts.cdx.json" "$work/$name.cdx.json"

(cd "$stage" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum >SHA256SUMS)

# tar ARCHIVE DIR NAME: a reproducible .tar.gz of DIR/NAME.
reproducible_tar() {
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
    --mode='u+rw,go+r,go-w' --format=gnu -C "$2" -cf - "$3" | gzip -n -9 >"$1"
}
reproducible_tar "$work/$name.tar.gz" "$work" "$name"

# The chart: helm package (version and appVersion checked above), then the same
# archive rules (helm writes the packaging time into the archive).
"$HELM" package "$CHART" --version "$version" --app-version "$version" -d "$work/helm" >/dev/null
mkdir -p "$work/chart"
tar -xzmf "$work/helm/keycloak-ci-sts-$version.tgz" -C "$work/chart"
reproducible_tar "$work/keycloak-ci-sts-$version.tgz" "$work/chart" keycloak-ci-sts

# What a user would check first: the sums, the binary's version and commit, the
# SBOM naming that binary, the example configuration, the chart's appVersion.
check="$work/check"
mkdir -p "$check"
tar -xzf "$work/$name.tar.gz" -C "$check"
(cd "$check/$name" && sha256sum --quiet -c SHA256SUMS)
got=$("$check/$name/keycloak-ci-sts" --version)
[[ "$got" == "keycloak-ci-sts $version (commit $commit)" ]] \
  || { echo "release: --version says '$got'" >&2; exit 1; }
python3 - "$check/$name/keycloak-ci-sts.cdx.json" "$check/$name/keycloak-ci-sts" "$version" <<'PY'
import hashlib, json, sys
bom, binary, version = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
root = bom["metadata"]["component"]
assert root["name"] == "keycloak-ci-sts" and root["version"] == version, root
assert root["hashes"][0]["content"] == hashlib.sha256(open(binary, "rb").read()).hexdigest()
names = {c["name"] for c in bom["components"]}
assert {"actix-web", "jsonwebtoken", "reqwest", "rustls"} <= names, "the SBOM misses crates compiled in"
assert not names & {"wiremock", "proptest", "criterion"}, "the SBOM lists test-only crates"
PY
"$check/$name/keycloak-ci-sts" config check --no-secrets --config "$check/$name/examples/sts.toml" >/dev/null
[[ $("$HELM" show chart "$work/keycloak-ci-sts-$version.tgz" | sed -nE 's/^appVersion: "?([^"]+)"?$/\1/p') == "$version" ]] \
  || { echo "release: the packaged chart's appVersion is not $version" >&2; exit 1; }

for f in "$name.tar.gz" "$name.cdx.json" "keycloak-ci-sts-$version.tgz"; do
  install -m 0644 "$work/$f" "$out/$f"
done
(cd "$out" && sha256sum "$name.tar.gz" "$name.cdx.json" "keycloak-ci-sts-$version.tgz" >SHA256SUMS)
echo "release: $version (commit $commit) in $out:"
(cd "$out" && cat SHA256SUMS)
