#!/usr/bin/env bash
# The test entry point (README: "Test"). Runs every test of the workspace against real sockets,
# a private redis-server per test and real gateway processes.
#
# It needs `redis-server` on PATH (tests start their own on a free port; the one on 6379, if any,
# is never touched). When it is missing and we are root with apt-get, it is installed; otherwise
# the run stops here with the command to install it. It never skips tests silently.
#
# After `cargo test` it runs the WebSocket conformance cases (tests/autobahn/run.sh: Autobahn
# cases through the PyPI runner `kosoku`, in a venv under tests/.tmp), which need python3 with
# its venv module (Debian: python3-venv) and, the first time, PyPI. SKIP_AUTOBAHN=1 skips them,
# and only that does.
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
# The Autobahn runner lives in a Python venv (unless KOSOKU names one or kosoku is on PATH).
autobahn=1
[ "${SKIP_AUTOBAHN:-0}" = 1 ] && autobahn=0
if [ "$autobahn" = 1 ]; then
  need python3 || missing+=(python3)
  if [ -z "${KOSOKU:-}" ] && ! need kosoku && [ ! -x tests/.tmp/autobahn/venv/bin/kosoku ] &&
    ! { need python3 && python3 -c 'import venv, ensurepip' 2>/dev/null; }; then
    missing+=(python3-venv)
  fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  install_debian_packages "${missing[@]}"
fi

# Many sockets per test: raise the descriptor limit where allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo test --workspace --locked "$@"

if [ "$autobahn" = 1 ]; then
  # The cargo test run above built target/debug/gateway; the script only checks it is fresh.
  tests/autobahn/run.sh
else
  echo "tests/run.sh: SKIP_AUTOBAHN=1: WebSocket conformance (tests/autobahn/run.sh) NOT run" >&2
fi
