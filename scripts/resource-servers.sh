#!/usr/bin/env bash
# The resource-server kit (examples/resource-servers/{go,python,node,java}) against
# the real Keycloak, with tokens obtained through the running service (run by
# scripts/test.sh while Keycloak is up with realm ci provisioned).
#
#   scripts/resource-servers.sh [LANG...]     # default: go python node java
#
# Each language's pinned dependencies come from its own registry and are cached
# outside the clone ($KCS_CACHE, default ~/.cache/keycloak-ci-sts/resource-servers;
# Go's module cache, Maven's ~/.m2). Then it starts the local issuer and the
# service (scripts/lib/stack.sh: ports 18081 and 18082), and
# scripts/lib/resource_servers.py runs each server on 127.0.0.1:18131.. and checks
# that it accepts the right token and refuses each wrong one for the right reason
# (docs/src/resource-servers.md). The expired case waits for a real token's `exp`
# (up to sts-artifacts' 60 s lifespan, overlapping the other cases).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/stack.sh
source scripts/lib/stack.sh

run_dir=""
trap 'stack_stop; [[ -z "$run_dir" ]] || rm -rf "$run_dir"' EXIT
LANGS=("$@")
((${#LANGS[@]})) || LANGS=(go python node java)
KIT=examples/resource-servers
NIMBUS_SHA256=0edd2fbaab79e13f87d145d021f85a5c59956b2b6b5e761c0d664c87f94cda15
CACHE="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}/resource-servers"
mkdir -p "$CACHE"
digest() { cat "$@" | sha256sum | cut -c1-16; }
servers="[]"
add() { # lang, cwd, command...
  servers=$(python3 -c 'import json, sys
s = json.loads(sys.argv[1])
s.append({"lang": sys.argv[2], "cwd": sys.argv[3], "cmd": sys.argv[4:]})
print(json.dumps(s))' "$servers" "$@")
}

# Python: PyJWT and cryptography, in a virtualenv (also the checker's).
kit_python
PYENV="$(dirname "$(dirname "$KIT_PYTHON")")"

for lang in "${LANGS[@]}"; do
  case "$lang" in
  python) add python "$KIT/python" "$PYENV/bin/python" server.py ;;
  node)
    dir="$CACHE/node-$(digest "$KIT/node/package-lock.json")"
    if [[ ! -d "$dir/node_modules/jose" ]]; then
      echo "resource servers: npm ci (cached in $dir)"
      rm -rf "$dir" && mkdir -p "$dir"
      cp "$KIT/node/package.json" "$KIT/node/package-lock.json" "$dir/"
      (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --cache "$CACHE/npm-cache" >/dev/null)
    fi
    # ES modules resolve packages next to the file: this run's copy of server.mjs
    # in a directory of its own, beside a link to the cached node_modules.
    run_dir=$(mktemp -d)
    ln -s "$dir/node_modules" "$run_dir/node_modules"
    cp "$KIT/node/server.mjs" "$KIT/node/package.json" "$run_dir/"
    add node "$run_dir" node server.mjs
    ;;
  go)
    bin="$CACHE/go-$(digest "$KIT/go/go.mod" "$KIT/go/go.sum" "$KIT/go/main.go")/server"
    if [[ ! -x "$bin" ]]; then
      echo "resource servers: go build (cached in $bin)"
      (cd "$KIT/go" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin" .)
    fi
    add go "$KIT/go" "$bin"
    ;;
  java)
    dir="$CACHE/java-$(digest "$KIT/java/pom.xml" "$KIT/java/ResourceServer.java")"
    if [[ ! -f "$dir/classes/ResourceServer.class" ]]; then
      echo "resource servers: Maven classpath and javac (cached in $dir)"
      rm -rf "$dir" && mkdir -p "$dir/classes"
      mvn -q -B -C -f "$KIT/java/pom.xml" dependency:build-classpath -Dmdep.outputFile="$dir/classpath.txt" >/dev/null
      # The one jar, checked against the digest of nimbus-jose-jwt 10.10 as first fetched.
      [[ "$(cat "$dir/classpath.txt")" == *nimbus-jose-jwt-10.10.jar ]] &&
        sha256sum -c --quiet - <<<"$NIMBUS_SHA256  $(cat "$dir/classpath.txt")" || {
        echo "resource servers: the Java classpath is not nimbus-jose-jwt 10.10 with the recorded digest" >&2
        rm -rf "$dir"
        exit 1
      }
      javac -d "$dir/classes" -cp "$(cat "$dir/classpath.txt")" "$KIT/java/ResourceServer.java"
    fi
    add java "$KIT/java" java -cp "$dir/classes:$(cat "$dir/classpath.txt")" ResourceServer
    ;;
  *) echo "unknown language $lang (go, python, node, java)" >&2 && exit 2 ;;
  esac
done

KC_URL="${KCS_KEYCLOAK_URL:-http://127.0.0.1:18080}"
if ! curl -fsS -o /dev/null "$KC_URL/realms/ci/.well-known/openid-configuration"; then
  echo "resource servers: Keycloak with realm ci is not running at $KC_URL (scripts/keycloak.sh start && scripts/keycloak.sh provision)" >&2
  exit 1
fi
stack_keys
stack_start
STS_BIN="$BIN/keycloak-ci-sts" AUDIT_FILE="$DEMO_DIR/audit.jsonl"
export KC_URL STS_URL ISSUER_URL STS_BIN AUDIT_FILE WORKSPACE_UUID REPOSITORY_UUID WEB_REPOSITORY_UUID PRODUCTION_ENV_UUID
"$PYENV/bin/python" scripts/lib/resource_servers.py "$servers"
