#!/usr/bin/env bash
# Checks (and where possible installs) what building and testing needs:
# Rust with rustfmt and clippy, a C toolchain with OpenSSL headers (josekit links
# OpenSSL), a C++ compiler (libFuzzer; scripts/fuzz.sh checks the nightly toolchain), Java 17+, Maven, curl, unzip, jq, redis-server and haproxy (the
# replica tests), Chromium (the access report's rendering test). Debian packages are installed with
# apt-get when running as root; otherwise the missing ones are named.
set -euo pipefail

missing_pkgs=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || missing_pkgs+=("$2"); }

need_cmd cc gcc
# libFuzzer (scripts/fuzz.sh, the fuzz step of scripts/test.sh) is C++
need_cmd c++ g++
need_cmd pkg-config pkg-config
need_cmd curl curl
need_cmd unzip unzip
need_cmd jq jq
need_cmd mvn maven
# the replica tests: a shared limit store and a load balancer in front of three
# service processes, all on 127.0.0.1
need_cmd redis-server redis-server
need_cmd haproxy haproxy
# scripts/deploy-check.sh: helm is built from its Go module (go), hadolint and
# kubernetes-validate are installed into a virtualenv (python3 -m venv)
need_cmd go golang-go
# the access report's rendering test (tests/api/report.rs): Debian's headless-capable Chromium
need_cmd chromium chromium
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing_pkgs+=(python3-venv)
if ! pkg-config --exists openssl 2>/dev/null; then missing_pkgs+=(libssl-dev); fi
if ! command -v java >/dev/null 2>&1; then missing_pkgs+=(openjdk-17-jdk-headless); fi

if ((${#missing_pkgs[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${missing_pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}" >/dev/null
  else
    echo "bootstrap: missing: ${missing_pkgs[*]} (install them, e.g. with apt-get)" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "bootstrap: Rust (cargo) not found; install it with rustup" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null
  done
fi

java_major=$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1)
if [[ -z "$java_major" || "$java_major" -lt 17 ]]; then
  echo "bootstrap: Java 17 or newer is required (found: ${java_major:-none})" >&2
  exit 1
fi
