#!/usr/bin/env bash
# The dependency audit (run by scripts/test.sh): `cargo deny --offline check`
# against deny.toml — advisories (RustSec), licences, bans (duplicate versions,
# wildcards), sources — with cargo-deny pinned below.
#
#   scripts/supply-chain.sh
#
# The RustSec database is never fetched. It is cloned from the snapshot bundle
# in ../shared/advisory-db (KCS_ADVISORY_BUNDLE) into the cache outside the
# clone, under the directory name cargo-deny derives from the database's URL.
# cargo-deny judges staleness by the clone's fetch time, which for a snapshot
# says nothing, so this script applies deny.toml's `maximum-db-staleness` to
# the snapshot's upstream date (the date its commit message names, else the
# newest advisory's) and fails with what to do.
#
# Before the real check it proves the gate can fail: a copy of the database with
# one made-up advisory against a crate we use must make `check advisories` fail.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}"
CARGO_DENY_VERSION=0.20.2
# cargo-deny's directory for the default RustSec URL (`url_to_db_path`: the
# last path segment and an XxHash64 of the URL); it depends on the version.
DB_DIR_NAME=advisory-db-3157b0e258782691
BUNDLE="${KCS_ADVISORY_BUNDLE:-$(cd .. && pwd)/shared/advisory-db/advisory-db.bundle}"

source scripts/lib/tools.sh
cargo_tool cargo-deny "$CARGO_DENY_VERSION"

export KCS_ADVISORY_DBS="$CACHE/advisory-dbs"
db="$KCS_ADVISORY_DBS/$DB_DIR_NAME"
if [[ ! -f "$BUNDLE" ]]; then
  echo "supply-chain: no advisory database snapshot at $BUNDLE" >&2
  echo "supply-chain: put the RustSec snapshot bundle there (or set KCS_ADVISORY_BUNDLE)" >&2
  exit 1
fi
bundle_head=$(git bundle list-heads "$BUNDLE" | awk '$2 == "refs/heads/main" {print $1}')
# Re-cloned unless it is the bundle's commit with an untouched working tree
# (cargo-deny reads the files, not the commit).
if [[ "$(git -C "$db" rev-parse HEAD 2>/dev/null)" != "$bundle_head" || -n "$(git -C "$db" status --porcelain 2>/dev/null)" ]]; then
  echo "supply-chain: cloning the advisory database snapshot ($bundle_head) into $db"
  rm -rf "$db"
  mkdir -p "$KCS_ADVISORY_DBS"
  git clone -q --branch main "$BUNDLE" "$db"
fi

# The data's date, not the clone's: the newest advisory in it. The date the
# snapshot's commit message names is only a cross-check (it is typed by hand):
# it must lie within 7 days after the newest advisory and not in the future.
newest=$(grep -rhoE '^date = "[0-9]{4}-[0-9]{2}-[0-9]{2}"' "$db/crates" | cut -d'"' -f2 | sort | tail -1)
named=$(git -C "$db" log -1 --format=%s | sed -nE 's/.*\(([0-9]{4}-[0-9]{2}-[0-9]{2})\)$/\1/p')
max_days=$(sed -nE 's/^maximum-db-staleness = "P([0-9]+)D"$/\1/p' deny.toml)
[[ -n "$max_days" && -n "$newest" ]] \
  || { echo "supply-chain: cannot read maximum-db-staleness (P<n>D) or the newest advisory's date" >&2; exit 1; }
newest_s=$(date -u -d "$newest" +%s 2>/dev/null) \
  || { echo "supply-chain: the newest advisory's date '$newest' is not a date" >&2; exit 1; }
now_s=$(date -u +%s)
if [[ -n "$named" ]]; then
  named_s=$(date -u -d "$named" +%s 2>/dev/null) \
    || { echo "supply-chain: the snapshot's commit message names '$named', not a date" >&2; exit 1; }
  if (( named_s > now_s || named_s < newest_s || named_s - newest_s > 7 * 86400 )); then
    echo "supply-chain: the snapshot says it is of $named, but its newest advisory is of $newest: refresh ../shared/advisory-db" >&2
    exit 1
  fi
fi
upstream="${named:-$newest}"
age_days=$(( (now_s - newest_s) / 86400 ))
echo "supply-chain: RustSec advisory database as of $upstream (newest advisory $newest, $age_days days old; limit $max_days days)"
if (( age_days > max_days )); then
  echo "supply-chain: the advisory database snapshot is older than maximum-db-staleness (P${max_days}D in deny.toml)." >&2
  echo "supply-chain: refresh ../shared/advisory-db (a newer snapshot bundle of the RustSec advisory database); advisories newer than $upstream are not checked." >&2
  exit 1
fi

# cargo metadata without the network.
cargo fetch --locked >/dev/null

echo "== cargo deny: the gate fails on an advisory (a made-up one, in a copy of the database)"
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
cp -r "$db" "$probe/$DB_DIR_NAME"
mkdir -p "$probe/$DB_DIR_NAME/crates/hex"
cat >"$probe/$DB_DIR_NAME/crates/hex/RUSTSEC-2099-0001.md" <<'EOF'
```toml
[advisory]
id = "RUSTSEC-2099-0001"
package = "hex"
date = "2099-01-01"
title = "Made-up advisory: scripts/supply-chain.sh checks that the gate fails"

[versions]
patched = []
```

# Made-up advisory

Used only to check that an advisory fails the check.
EOF
git -C "$probe/$DB_DIR_NAME" add -A >/dev/null
git -C "$probe/$DB_DIR_NAME" -c user.name=probe -c user.email=probe@invalid commit -qm probe
if KCS_ADVISORY_DBS="$probe" cargo deny --offline check advisories >"$probe/out" 2>&1; then
  cat "$probe/out" >&2
  echo "supply-chain: a made-up advisory against hex did not fail cargo deny" >&2
  exit 1
fi
grep -q "RUSTSEC-2099-0001" "$probe/out" \
  || { cat "$probe/out" >&2; echo "supply-chain: cargo deny failed, but not on the made-up advisory" >&2; exit 1; }

# Every exception in deny.toml carries its reason and a review date that has
# not passed (cargo-deny accepts an ignore entry without either).
python3 - <<'PY'
import datetime, re, sys, tomllib
cfg = tomllib.load(open("deny.toml", "rb"))
today = datetime.date.today()
bad = []
for section, key in (("advisories", "ignore"), ("bans", "skip"), ("bans", "skip-tree"), ("licenses", "exceptions")):
    for entry in cfg.get(section, {}).get(key, []):
        reason = entry.get("reason", "") if isinstance(entry, dict) else ""
        m = re.search(r"[Rr]eview (\d{4}-\d{2}-\d{2})", reason)
        name = entry if isinstance(entry, str) else entry.get("id") or entry.get("crate") or entry.get("name")
        if not m:
            bad.append(f"[{section}] {key}: {name}: no reason with 'Review YYYY-MM-DD'")
        elif datetime.date.fromisoformat(m.group(1)) < today:
            bad.append(f"[{section}] {key}: {name}: its review date {m.group(1)} has passed: review it, then move the date")
for b in bad:
    print("supply-chain: deny.toml " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY

echo "== cargo deny --offline check (advisories, bans, licenses, sources)"
cargo deny --offline check --hide-inclusion-graph
echo "supply-chain: ok"
