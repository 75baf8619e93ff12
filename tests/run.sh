#!/usr/bin/env bash
# The test entry point (README: "Test"). Runs every test of the workspace against real sockets,
# a private redis-server per test and real gateway processes.
#
# It needs `redis-server` on PATH (tests start their own on a free port; the one on 6379, if any,
# is never touched). When it is missing and we are root with apt-get, it is installed; otherwise
# the run stops here with the command to install it. It never skips tests silently.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

install_debian_packages() {
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "tests/run.sh: installing $* with apt-get" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "tests/run.sh: missing $*; install with: sudo apt-get install -y $*" >&2
    exit 1
  fi
}

missing=()
need redis-server || missing+=(redis-server)
# The deploy test validates the HAProxy, compose and Prometheus files with their own tools.
need haproxy || missing+=(haproxy)
need docker-compose || missing+=(docker-compose)
need promtool || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  install_debian_packages "${missing[@]}"
fi

# Many sockets per test: raise the descriptor limit where allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec cargo test --workspace --locked "$@"
