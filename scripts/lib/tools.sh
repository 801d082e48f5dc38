# Sourced: installs pinned cargo tools once into the cache outside the clone
# (KCS_CACHE, default ~/.cache/keycloak-ci-sts) and puts them on PATH.
#
#   cargo_tool CRATE VERSION
#
# Installed (again) unless `cargo install --list` of that root names exactly
# that version.

KCS_TOOLS="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}/tools"
export PATH="$KCS_TOOLS/bin:$PATH"

cargo_tool() {
  local crate="$1" version="$2"
  if ! cargo install --list --root "$KCS_TOOLS" 2>/dev/null | grep -qxF "$crate v$version:"; then
    echo "== installing $crate $version into $KCS_TOOLS"
    cargo install --locked --quiet --force --root "$KCS_TOOLS" --version "$version" "$crate"
  fi
}
