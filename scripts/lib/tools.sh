# Sourced: installs pinned cargo tools once into the cache outside the clone
# (KCS_CACHE, default ~/.cache/keycloak-ci-sts) and puts them on PATH.
#
#   cargo_tool CRATE VERSION
#
# Installed (again) unless `cargo install --list` of that root names exactly
# that version.

KCS_TOOLS="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}/tools"

# The directory goes first on PATH, so it must hold only what cargo installed
# there: a file planted in the cache under another name (cargo, python3, git)
# would otherwise run in place of the system's. Anything else stops the run.
tools_only_installed() {
  local f installed
  [[ -d "$KCS_TOOLS/bin" ]] || return 0
  installed=$(cargo install --list --root "$KCS_TOOLS" 2>/dev/null | sed -n 's/^    //p')
  for f in "$KCS_TOOLS/bin"/* "$KCS_TOOLS/bin"/.[!.]*; do
    [[ -e "$f" || -L "$f" ]] || continue
    if ! grep -qxF "$(basename "$f")" <<<"$installed"; then
      echo "tools: $f was not installed by cargo install into $KCS_TOOLS; remove it (the cache is shared by every run)" >&2
      exit 1
    fi
  done
}
tools_only_installed
export PATH="$KCS_TOOLS/bin:$PATH"

cargo_tool() {
  local crate="$1" version="$2"
  if ! cargo install --list --root "$KCS_TOOLS" 2>/dev/null | grep -qxF "$crate v$version:"; then
    echo "== installing $crate $version into $KCS_TOOLS"
    cargo install --locked --quiet --force --root "$KCS_TOOLS" --version "$version" "$crate"
  fi
}
