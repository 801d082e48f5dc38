#!/usr/bin/env bash
# Run a throw-away Keycloak (Maven-distributed Quarkus dist, dev mode, embedded H2)
# for the integration tests of keycloak-ci-sts. No Docker needed.
#
# Usage: scripts/keycloak.sh start|stop|status|env|provision|plan
#
# Environment (all optional):
#   KC_VERSION                    Keycloak version (default 26.7.3)
#   KC_HTTP_PORT                  HTTP port, bound to 127.0.0.1 (default 18080)
#   KC_MGMT_PORT                  management/health port, bound to 127.0.0.1 (default 19000)
#   KC_START_TIMEOUT              seconds to wait for readiness (default 240)
#   KC_BOOTSTRAP_ADMIN_USERNAME   master-realm admin user (default admin)
#   KC_BOOTSTRAP_ADMIN_PASSWORD   master-realm admin password (default admin)
#   KC_JAVA_OPTS_APPEND           extra JVM options (default -Xmx512m); passed as JAVA_OPTS_APPEND
#   KC_EXTRA_ARGS                 extra arguments for `kc.sh start-dev` (word-split)
#   KC_REALM_DIR                  the realm files `start` imports (default tests/keycloak;
#                                 tests/keycloak/exported holds realm ci as an earlier
#                                 build's `keycloak apply` left it)
#   KCS_CACHE_DIR                 where the distribution zip is cached (default: $KCS_CACHE,
#                                 the cache of every script, ${XDG_CACHE_HOME:-$HOME/.cache}/keycloak-ci-sts)
#
# The distribution is unpacked per clone into target/keycloak/keycloak-$KC_VERSION;
# its data/ directory (H2 database + import) is wiped on every start, so every run
# starts from the realm(s) in tests/keycloak/*.json: each holds the realm and two
# admin clients only (kcs-admin-view: view-clients, view-users, view-realm,
# view-identity-providers, for `keycloak plan`; kcs-admin-manage: manage-clients,
# manage-users, manage-identity-providers, manage-realm, for `keycloak apply`).
# Everything the service needs in realm `ci` is created by `provision`, which runs
# `keycloak-ci-sts keycloak apply --config demo/sts.toml` (policies/ and
# policies/keycloak/realm.yaml) with the manage client; build the binary first.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

KC_VERSION="${KC_VERSION:-26.7.3}"
KC_HTTP_PORT="${KC_HTTP_PORT:-18080}"
KC_MGMT_PORT="${KC_MGMT_PORT:-19000}"
KC_START_TIMEOUT="${KC_START_TIMEOUT:-240}"
KC_STOP_TIMEOUT="${KC_STOP_TIMEOUT:-30}"
KC_REALM="ci"
KC_ADMIN_USER="${KC_BOOTSTRAP_ADMIN_USERNAME:-admin}"
KC_ADMIN_PASSWORD="${KC_BOOTSTRAP_ADMIN_PASSWORD:-admin}"
KC_JAVA_OPTS_APPEND="${KC_JAVA_OPTS_APPEND:--Xmx512m}"
KC_EXTRA_ARGS="${KC_EXTRA_ARGS:-}"
KCS_CACHE_DIR="${KCS_CACHE_DIR:-${KCS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keycloak-ci-sts}}"

KC_BASE="$REPO_ROOT/target/keycloak"
KC_HOME="$KC_BASE/keycloak-$KC_VERSION"
KC_LOG="$KC_BASE/keycloak.log"
KC_PIDFILE="$KC_BASE/keycloak.pid"
KC_LOCKFILE="$KC_BASE/.lock"
KC_ZIP_NAME="keycloak-quarkus-dist-$KC_VERSION.zip"
KC_ARTIFACT="org.keycloak:keycloak-quarkus-dist:$KC_VERSION:zip"
REALM_DIR="${KC_REALM_DIR:-$REPO_ROOT/tests/keycloak}"

HTTP_URL="http://127.0.0.1:$KC_HTTP_PORT"
MGMT_URL="http://127.0.0.1:$KC_MGMT_PORT"
READY_URL="$MGMT_URL/health/ready"
DISCOVERY_URL="$HTTP_URL/realms/$KC_REALM/.well-known/openid-configuration"

log() { printf 'keycloak.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat >&2 <<EOF
usage: $0 start|stop|status|env|provision|plan
  start   download (if needed), unpack (if needed), wipe data/, import realm, start, wait until ready
  stop    stop the Keycloak started from this clone (TERM, then KILL after ${KC_STOP_TIMEOUT}s)
  status  exit 0 if running and ready, 1 if running but not ready, 3 if not running
  env     print export lines for the integration tests
  provision  create the service's clients, scopes and resource servers in realm ci
          (keycloak-ci-sts keycloak apply --config demo/sts.toml; needs target/debug/keycloak-ci-sts)
  plan    keycloak-ci-sts keycloak plan --config demo/sts.toml with the view client; its exit
          code (0 in sync, 3 changes pending, 1 problems)
EOF
  exit 2
}

# ---------------------------------------------------------------- prerequisites

apt_install() {
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing missing packages: $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
  else
    die "missing required command(s): $* (install them, or run as root on a Debian/Ubuntu system)"
  fi
}

check_tools() {
  local missing=()
  command -v unzip >/dev/null 2>&1 || missing+=(unzip)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
  command -v unzip >/dev/null 2>&1 || die "unzip not found"
  command -v curl >/dev/null 2>&1 || die "curl not found"
  command -v setsid >/dev/null 2>&1 || die "setsid not found (util-linux)"
}

check_java() {
  command -v java >/dev/null 2>&1 || die "java not found on PATH; Keycloak $KC_VERSION needs a JDK 17, 21 or 25"
  local line ver major
  line="$(java -version 2>&1 | grep -m1 -i 'version' || true)"
  ver="$(printf '%s\n' "$line" | sed -n 's/.*version "\([^"]*\)".*/\1/p')"
  [ -n "$ver" ] || die "cannot determine the Java version from: ${line:-<no output from java -version>}"
  major="${ver%%.*}"
  if [ "$major" = "1" ]; then # 1.8.0_xxx style
    major="$(printf '%s' "$ver" | cut -d. -f2)"
  fi
  major="${major%%[!0-9]*}"
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    die "java on PATH is version $ver ($(command -v java)); Keycloak $KC_VERSION needs Java >= 17"
  fi
}

# ---------------------------------------------------------------- distribution

fetch_dist() {
  local zip="$KCS_CACHE_DIR/$KC_ZIP_NAME"
  if [ -s "$zip" ]; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found on PATH; it is needed to fetch $KC_ARTIFACT (or put $KC_ZIP_NAME into $KCS_CACHE_DIR)"
  mkdir -p "$KCS_CACHE_DIR"
  local tmp
  tmp="$(mktemp -d "$KCS_CACHE_DIR/.download.XXXXXX")"
  log "fetching $KC_ARTIFACT with Maven into $KCS_CACHE_DIR"
  if ! (cd "$tmp" && mvn -q -B dependency:copy -Dartifact="$KC_ARTIFACT" -DoutputDirectory="$tmp" >&2); then
    rm -rf "$tmp"
    die "Maven could not fetch $KC_ARTIFACT"
  fi
  [ -s "$tmp/$KC_ZIP_NAME" ] || { rm -rf "$tmp"; die "Maven did not produce $KC_ZIP_NAME"; }
  mv -f "$tmp/$KC_ZIP_NAME" "$zip"
  rm -rf "$tmp"
}

unpack_dist() {
  if [ -x "$KC_HOME/bin/kc.sh" ] && [ -d "$KC_HOME/lib" ]; then
    return 0
  fi
  fetch_dist
  local zip="$KCS_CACHE_DIR/$KC_ZIP_NAME"
  local tmp
  mkdir -p "$KC_BASE"
  tmp="$(mktemp -d "$KC_BASE/.unpack.XXXXXX")"
  log "unpacking $zip into $KC_BASE"
  if ! unzip -q "$zip" -d "$tmp"; then
    rm -rf "$tmp"
    die "cannot unpack $zip (corrupt? delete it and retry)"
  fi
  [ -x "$tmp/keycloak-$KC_VERSION/bin/kc.sh" ] || { rm -rf "$tmp"; die "$zip does not contain keycloak-$KC_VERSION/bin/kc.sh"; }
  rm -rf "$KC_HOME"
  mv "$tmp/keycloak-$KC_VERSION" "$KC_HOME"
  rm -rf "$tmp"
}

# ---------------------------------------------------------------- process helpers

# Prints the pid from the pid file if that process is alive and belongs to this clone.
running_pid() {
  [ -f "$KC_PIDFILE" ] || return 1
  local pid args
  pid="$(tr -dc '0-9' <"$KC_PIDFILE")"
  [ -n "$pid" ] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # guard against pid reuse: the command line must mention this clone's Keycloak dir
  if [ -r "/proc/$pid/cmdline" ]; then
    args="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  else
    args="$(ps -o args= -p "$pid" 2>/dev/null || true)"
  fi
  case "$args" in
    *"$KC_BASE"*) printf '%s\n' "$pid" ;;
    *) return 1 ;;
  esac
}

is_ready() {
  curl -fsS -o /dev/null --max-time 5 "$READY_URL" 2>/dev/null &&
    curl -fsS -o /dev/null --max-time 5 "$DISCOVERY_URL" 2>/dev/null
}

port_in_use() {
  # curl exit code 7 = connection refused / nothing listening
  local rc=0
  curl -s -o /dev/null --max-time 3 "http://127.0.0.1:$1/" || rc=$?
  [ "$rc" -ne 7 ]
}

dump_log() {
  if [ -f "$KC_LOG" ]; then
    log "last 80 lines of $KC_LOG:"
    tail -n 80 "$KC_LOG" >&2
  else
    log "no log file at $KC_LOG"
  fi
}

kill_keycloak() {
  local pid="$1" pgid target
  pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)"
  if [ -n "$pgid" ] && [ "$pgid" = "$pid" ]; then
    target="-$pid" # we started it as a session/process-group leader: signal the whole group
  else
    target="$pid"
  fi
  log "stopping Keycloak (pid $pid)"
  kill -TERM -- "$target" 2>/dev/null || true
  local i=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$i" -ge $((KC_STOP_TIMEOUT * 2)) ]; then
      log "still running after ${KC_STOP_TIMEOUT}s, sending KILL"
      kill -KILL -- "$target" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.5
    i=$((i + 1))
  done
  # reap any remaining member of the group (e.g. java child of kc.sh)
  if [ "$target" = "-$pid" ]; then
    kill -KILL -- "$target" 2>/dev/null || true
  fi
}

lock() {
  mkdir -p "$KC_BASE"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$KC_LOCKFILE"
    flock 9
  fi
}

# ---------------------------------------------------------------- commands

wait_ready() {
  local pid="$1" start now
  start="$(date +%s)"
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "Keycloak process $pid exited during startup"
      dump_log
      rm -f "$KC_PIDFILE"
      return 1
    fi
    if is_ready; then
      now="$(date +%s)"
      log "Keycloak $KC_VERSION ready after $((now - start))s at $HTTP_URL (realm $KC_REALM, pid $pid, log $KC_LOG)"
      return 0
    fi
    now="$(date +%s)"
    if [ $((now - start)) -ge "$KC_START_TIMEOUT" ]; then
      log "Keycloak not ready after ${KC_START_TIMEOUT}s ($READY_URL, $DISCOVERY_URL)"
      dump_log
      kill_keycloak "$pid"
      rm -f "$KC_PIDFILE"
      return 1
    fi
    sleep 1
  done
}

cmd_start() {
  lock
  local pid
  if pid="$(running_pid)"; then
    if is_ready; then
      log "Keycloak already running from this clone and ready (pid $pid, $HTTP_URL)"
      return 0
    fi
    log "Keycloak already running from this clone (pid $pid) but not ready yet; waiting"
    wait_ready "$pid"
    return
  fi
  rm -f "$KC_PIDFILE"

  check_tools
  check_java
  local p
  for p in "$KC_HTTP_PORT" "$KC_MGMT_PORT"; do
    if port_in_use "$p"; then
      die "port $p on 127.0.0.1 is already in use (another Keycloak?); set KC_HTTP_PORT / KC_MGMT_PORT"
    fi
  done

  unpack_dist

  # clean realm on every start: drop the H2 database and previous imports
  rm -rf "$KC_HOME/data"
  mkdir -p "$KC_HOME/data/import"
  local f n=0
  for f in "$REALM_DIR"/*.json; do
    [ -e "$f" ] || continue
    cp "$f" "$KC_HOME/data/import/"
    n=$((n + 1))
  done
  [ "$n" -gt 0 ] || die "no realm files found in $REALM_DIR/*.json"

  local -a args=(
    start-dev
    --http-host=127.0.0.1
    --http-port="$KC_HTTP_PORT"
    --http-management-host=127.0.0.1
    --http-management-port="$KC_MGMT_PORT"
    --health-enabled=true
    --import-realm
  )
  if [ -n "$KC_EXTRA_ARGS" ]; then
    # shellcheck disable=SC2206 # intentional word splitting
    args+=($KC_EXTRA_ARGS)
  fi

  : >"$KC_LOG"
  log "starting Keycloak $KC_VERSION from $KC_HOME (http $HTTP_URL, management $MGMT_URL)"
  # New session => kc.sh and its java child form a process group whose id is the
  # pid written to the pid file; `stop` signals the whole group.
  # shellcheck disable=SC2016 # $$ and "$@" are expanded by the launcher shell
  KC_BOOTSTRAP_ADMIN_USERNAME="$KC_ADMIN_USER" \
    KC_BOOTSTRAP_ADMIN_PASSWORD="$KC_ADMIN_PASSWORD" \
    JAVA_OPTS_APPEND="$KC_JAVA_OPTS_APPEND" \
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' keycloak-launcher \
    "$KC_PIDFILE" "$KC_HOME/bin/kc.sh" "${args[@]}" \
    </dev/null >>"$KC_LOG" 2>&1 9>&- &

  # wait for the launcher to write its pid (setsid may fork)
  local i=0
  while [ ! -s "$KC_PIDFILE" ]; do
    [ "$i" -lt 100 ] || { dump_log; die "Keycloak launcher did not start"; }
    sleep 0.1
    i=$((i + 1))
  done
  pid="$(tr -dc '0-9' <"$KC_PIDFILE")"
  wait_ready "$pid"
}

cmd_stop() {
  lock
  local pid
  if pid="$(running_pid)"; then
    kill_keycloak "$pid"
    if kill -0 "$pid" 2>/dev/null; then
      die "Keycloak (pid $pid) did not stop"
    fi
    log "stopped"
  else
    log "not running"
  fi
  rm -f "$KC_PIDFILE"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    if is_ready; then
      echo "running (pid $pid), ready at $HTTP_URL (realm $KC_REALM)"
      return 0
    fi
    echo "running (pid $pid), not ready"
    return 1
  fi
  echo "not running"
  return 3
}

cmd_env() {
  printf 'export KCS_KEYCLOAK_URL=%q\n' "$HTTP_URL"
  printf 'export KCS_KEYCLOAK_REALM=%q\n' "$KC_REALM"
  printf 'export KCS_KEYCLOAK_ADMIN_USER=%q\n' "$KC_ADMIN_USER"
  printf 'export KCS_KEYCLOAK_ADMIN_PASSWORD=%q\n' "$KC_ADMIN_PASSWORD"
  # `keycloak plan` reads KCS_ADMIN_CLIENT_ID/SECRET: the view-only client here;
  # for `keycloak apply` use the manage client below.
  printf 'export KCS_ADMIN_CLIENT_ID=%q\n' kcs-admin-view
  printf 'export KCS_ADMIN_CLIENT_SECRET=%q\n' kcs-admin-view-test-secret
  printf 'export KCS_ADMIN_VIEW_CLIENT_ID=%q\n' kcs-admin-view
  printf 'export KCS_ADMIN_VIEW_CLIENT_SECRET=%q\n' kcs-admin-view-test-secret
  printf 'export KCS_ADMIN_MANAGE_CLIENT_ID=%q\n' kcs-admin-manage
  printf 'export KCS_ADMIN_MANAGE_CLIENT_SECRET=%q\n' kcs-admin-manage-test-secret
  printf 'export KCS_KEYCLOAK_VERSION=%q\n' "$KC_VERSION"
}

# The demo's sts-artifacts secret (demo/sts.toml reads it from this variable);
# the tests use the same value.
DEMO_ARTIFACTS_SECRET="sts-artifacts-test-secret"

# demo/sts.toml, pointed at this clone's Keycloak: the file itself names port 18080,
# so on another KC_HTTP_PORT a copy is used (never another clone's Keycloak).
demo_config() {
  if [ "$KC_HTTP_PORT" = 18080 ]; then
    echo "$REPO_ROOT/demo/sts.toml"
    return
  fi
  local copy="$KC_BASE/sts-$KC_HTTP_PORT.toml"
  sed -e "s|^base_url = \"http://127.0.0.1:18080\"|base_url = \"http://127.0.0.1:$KC_HTTP_PORT\"|" \
    -e "s|^policies_dir = \"\.\./policies\"|policies_dir = \"$REPO_ROOT/policies\"|" \
    -e "s|\"\.\./target/|\"$REPO_ROOT/target/|g" "$REPO_ROOT/demo/sts.toml" >"$copy"
  grep -q "^base_url = \"http://127.0.0.1:$KC_HTTP_PORT\"" "$copy" ||
    die "demo/sts.toml's base_url is not http://127.0.0.1:18080: cannot point it at port $KC_HTTP_PORT"
  echo "$copy"
}

cmd_provision() {
  local bin="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/keycloak-ci-sts"
  [ -x "$bin" ] || die "$bin not found: run cargo build first"
  is_ready || die "Keycloak is not running from this clone: run $0 start first"
  log "provisioning realm $KC_REALM from demo/sts.toml and policies/ (keycloak apply)"
  KCS_ADMIN_CLIENT_ID=kcs-admin-manage \
    KCS_ADMIN_CLIENT_SECRET=kcs-admin-manage-test-secret \
    KCS_DEMO_STS_ARTIFACTS_SECRET="$DEMO_ARTIFACTS_SECRET" \
    "$bin" keycloak apply --config "$(demo_config)" >&2
}

cmd_plan() {
  local bin="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/keycloak-ci-sts"
  [ -x "$bin" ] || die "$bin not found: run cargo build first"
  is_ready || die "Keycloak is not running from this clone: run $0 start first"
  KCS_ADMIN_CLIENT_ID=kcs-admin-view \
    KCS_ADMIN_CLIENT_SECRET=kcs-admin-view-test-secret \
    "$bin" keycloak plan --config "$(demo_config)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  provision) cmd_provision ;;
  plan) cmd_plan ;;
  *) usage ;;
esac
