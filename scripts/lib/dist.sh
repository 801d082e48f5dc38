# Sourced: the release build shared by scripts/release.sh and
# scripts/deploy-check.sh, so that the test command builds the release once.
#
#   dist_build      builds the service binary; sets DIST_BIN (its absolute path)
#
# Cargo profile `dist` (the release profile, in target/dist of its own) under
# cargo-auditable, which embeds the exact list of crates compiled into the
# binary (the SBOM is made from it); paths of the clone, the target directory
# and the cargo home are remapped so that clones at different paths build the
# same bytes (scripts/release-repro.sh checks that); SOURCE_DATE_EPOCH is the
# commit's time; KCS_GIT_COMMIT (shown by --version) is the commit, with
# `-modified` when the tree has uncommitted changes.

CARGO_AUDITABLE_VERSION=0.7.7

dist_build() {
  local root target cargo_home commit
  source scripts/lib/tools.sh
  cargo_tool cargo-auditable "$CARGO_AUDITABLE_VERSION"
  root=$(pwd -P)
  mkdir -p "${CARGO_TARGET_DIR:-target}"
  target=$(cd "${CARGO_TARGET_DIR:-target}" && pwd -P)
  cargo_home=$(cd "${CARGO_HOME:-$HOME/.cargo}" && pwd -P)
  # The remap flags travel through CFLAGS, which compilers split on whitespace.
  if [[ "$root$target$cargo_home" =~ [[:space:]] ]]; then
    echo "dist: the clone, target or cargo home path contains whitespace; build from a path without" >&2
    return 1
  fi
  commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  # Any change git would show, untracked files included (a new build.rs or
  # policy file changes what is built and shipped).
  if [[ "$commit" != unknown && -n "$(git status --porcelain 2>/dev/null)" ]]; then
    commit="$commit-modified"
  fi
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
  export SOURCE_DATE_EPOCH
  # The most specific prefix last: rustc applies the last matching remap.
  local remap=$'--remap-path-prefix='"$cargo_home"$'=/cargo\x1f--remap-path-prefix='"$root"$'=/build/keycloak-ci-sts\x1f--remap-path-prefix='"$target"$'=/build/target'
  local cmap="-ffile-prefix-map=$cargo_home=/cargo -ffile-prefix-map=$root=/build/keycloak-ci-sts -ffile-prefix-map=$target=/build/target"
  KCS_GIT_COMMIT="$commit" CARGO_ENCODED_RUSTFLAGS="$remap" CFLAGS="$cmap" CXXFLAGS="$cmap" \
    cargo auditable build --profile dist --locked --bin keycloak-ci-sts
  DIST_BIN="$target/dist/keycloak-ci-sts"
  DIST_COMMIT="$commit"
}
