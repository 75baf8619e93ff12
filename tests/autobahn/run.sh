#!/usr/bin/env bash
# WebSocket conformance: the Autobahn TestSuite cases (run by the Python 3 runner `kosoku`)
# against the gateway's echo endpoint, which uses the same socket layer as /ws (same limits,
# same close handling). The compact result of every case is compared with the checked-in
# tests/autobahn/expected.json, so any change in behaviour shows as a diff.
#
#   tests/autobahn/run.sh            run, compare, exit 1 on any difference
#   tests/autobahn/run.sh --update   run and rewrite expected.json (review the diff!)
#
# Excluded: 12.* and 13.* (permessage-deflate: the gateway does not negotiate compression) and
# 9.1.6 / 9.2.6 (16 MiB messages: slow, and at the very edge of the 16 MiB limit used here).
# It also fails if the gateway died or logged a panic during the run, and, loudly, when python3
# or its venv module (Debian: python3-venv) is missing. tests/run.sh runs it after cargo test.
# Environment: GATEWAY_BIN (a built gateway binary; default: build target/debug/gateway),
# KOSOKU (the kosoku command; default: `kosoku` on PATH, else a venv under tests/.tmp),
# AUTOBAHN_PARALLELISM (cases run at once, default 8).
set -euo pipefail
cd "$(dirname "$0")/../.."

KOSOKU_VERSION=0.1.0
here=tests/autobahn
work=tests/.tmp/autobahn
mode=check
case "${1:-}" in
  --update) mode=update ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac
rm -rf "$work/reports"
mkdir -p "$work"

fail() { echo "autobahn: $*" >&2; exit 1; }

# python3 runs kosoku and reads its reports; without it nothing here can work.
command -v python3 >/dev/null 2>&1 ||
  fail "python3 is missing; install it (Debian: sudo apt-get install -y python3 python3-venv)"

# The runner: kosoku on PATH, or a private venv with the pinned version.
kosoku="${KOSOKU:-}"
if [ -z "$kosoku" ]; then
  if command -v kosoku >/dev/null 2>&1; then
    kosoku=kosoku
  else
    venv="$work/venv"
    if [ ! -x "$venv/bin/kosoku" ]; then
      # Debian ships `venv` without `ensurepip` unless python3-venv is installed.
      python3 -c 'import venv, ensurepip' 2>/dev/null ||
        fail "python3 cannot create virtual environments; install python3-venv (Debian: sudo apt-get install -y python3-venv)"
      echo "autobahn: installing kosoku==$KOSOKU_VERSION into $venv" >&2
      rm -rf "$venv"
      python3 -m venv "$venv" || { rm -rf "$venv"; fail "python3 -m venv $venv failed (Debian: install python3-venv)"; }
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION" ||
        { rm -rf "$venv"; fail "pip could not install kosoku==$KOSOKU_VERSION from PyPI (offline? set KOSOKU to an installed runner)"; }
    fi
    kosoku="$venv/bin/kosoku"
  fi
fi

bin="${GATEWAY_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --quiet --locked -p gateway --bin gateway
  bin=target/debug/gateway
fi
[ -x "$bin" ] || fail "no gateway binary at $bin"

# The node picks its own port; its first log line (at `info`, whatever RUST_LOG says) says which.
log="$work/gateway.log"
RUST_LOG=info "$bin" --listen 127.0.0.1:0 --node-id autobahn --log-format json --echo-endpoint \
  --max-message-size 16777216 2>"$log" >/dev/null &
gateway_pid=$!
trap 'kill "$gateway_pid" 2>/dev/null || true; wait "$gateway_pid" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 150); do
  addr=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if fields.get("message") == "gateway node serving":
        print(fields["listen"]); break
' "$log")
  [ -n "$addr" ] && break
  kill -0 "$gateway_pid" 2>/dev/null || { cat "$log" >&2; echo "autobahn: the gateway did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { cat "$log" >&2; echo "autobahn: the gateway did not report its address" >&2; exit 1; }

started=$(date +%s.%N)
# kosoku exits 1 when a case fails; the comparison below is what decides.
"$kosoku" "ws://$addr/test/echo" -x '12.*' -x '13.*' -x '9.1.6' -x '9.2.6' \
  -p "${AUTOBAHN_PARALLELISM:-8}" -o "$work/reports" >"$work/kosoku.out" 2>&1 || true
elapsed=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$started")
# The node must have survived every case, without a single panic (a panicking connection task
# does not take the process down, so the log is checked too).
if ! kill -0 "$gateway_pid" 2>/dev/null; then
  cat "$log" >&2
  fail "the gateway died during the run (log above: $log)"
fi
if grep -q 'panicked' "$log"; then
  cat "$log" >&2
  fail "the gateway panicked during the run (log above: $log)"
fi
[ -f "$work/reports/index.json" ] || { cat "$work/kosoku.out" >&2; fail "kosoku produced no report"; }

# One line per case: [behavior, behaviorClose, close code the server sent (null: none)].
python3 - "$work/reports/index.json" "$work/results.json" <<'PY'
import json, sys
(agent, cases), = json.load(open(sys.argv[1])).items()
key = lambda case: [int(p) for p in case.split(".")]
lines = [f'  "{case}": {json.dumps([c["behavior"], c["behaviorClose"], c["remoteCloseCode"]])}'
         for case, c in sorted(cases.items(), key=lambda kv: key(kv[0]))]
with open(sys.argv[2], "w") as out:
    out.write("{\n" + ",\n".join(lines) + "\n}\n")
PY
summary=$(python3 -c '
import collections, json, sys
r = json.load(open(sys.argv[1]))
print(len(r), "cases:", ", ".join(f"{n} {b}" for b, n in sorted(collections.Counter(v[0] for v in r.values()).items())))
' "$work/results.json")
echo "autobahn: $summary in ${elapsed}s (reports: $work/reports/index.html)"

if [ "$mode" = update ]; then
  cp "$work/results.json" "$here/expected.json"
  echo "autobahn: wrote $here/expected.json"
elif ! diff -u "$here/expected.json" "$work/results.json"; then
  echo "autobahn: results differ from $here/expected.json (details: $work/reports/)" >&2
  exit 1
fi
