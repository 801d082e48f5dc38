#!/usr/bin/env bash
# Builds the book (docs/, mdBook) into target/book and checks it (run by
# scripts/test.sh):
#
#   scripts/book.sh
#
# - mdbook 0.5.4 renders it; mdbook-linkcheck2 0.13.0 (a linkcheck backend that
#   works with mdbook 0.5; mdbook-linkcheck does not) checks every internal link
#   and #anchor, and fails on a broken one (docs/book.toml: warning-policy =
#   "error"; links to the web are not followed). Both are pinned and installed
#   into the cache outside the clone (scripts/lib/tools.sh).
# - Examples in the chapters are {{#include}}d from the real files (policies/,
#   demo/sts.toml, bitbucket-pipelines.yml); an include of a missing file fails
#   the build.
# - The front pages (README.md, CHANGELOG.md, SECURITY.md) are not part of the
#   book: their relative links must name existing files, and the README's
#   policy example must be policies/deploy-production.yaml, byte for byte.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/lib/tools.sh
cargo_tool mdbook 0.5.4
cargo_tool mdbook-linkcheck2 0.13.0

out="${CARGO_TARGET_DIR:-target}/book"
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! mdbook build docs --dest-dir "$out" >"$log" 2>&1; then
  cat "$log" >&2
  echo "book: mdbook build or its link check failed" >&2
  exit 1
fi
# mdbook reports a missing {{#include}} as an error but may still render.
if grep -qiE "error|failed to|unable to" "$log"; then
  cat "$log" >&2
  echo "book: mdbook reported an error" >&2
  exit 1
fi

python3 - "$out/html" <<'PY'
import re, sys, pathlib
bad = []
# #anchors (mdbook-linkcheck2 checks files, not fragments): every link's
# fragment must be an id of the page mdbook rendered.
html = pathlib.Path(sys.argv[1])
def ids(page):
    p = html / page.replace(".md", ".html")
    return set(re.findall(r'id="([^"]+)"', p.read_text())) if p.exists() else set()
for chapter in sorted(pathlib.Path("docs/src").glob("*.md")):
    text = re.sub(r"```.*?```", "", chapter.read_text(), flags=re.S)
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        if "://" in target:
            continue
        page = target or chapter.name
        if anchor not in ids(page):
            bad.append(f"{chapter}: link to {page}#{anchor}: no such anchor")
for page in ["README.md", "CHANGELOG.md", "SECURITY.md"]:
    text = pathlib.Path(page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not pathlib.Path(target).exists():
            bad.append(f"{page}: link to {target}, which does not exist")
readme = pathlib.Path("README.md").read_text()
policy = pathlib.Path("policies/deploy-production.yaml").read_text()
if "```yaml\n" + policy + "```" not in readme:
    bad.append("README.md: the policy example is not policies/deploy-production.yaml as it is")
for b in bad:
    print("book: " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
echo "book: built into $out/html, links checked"
