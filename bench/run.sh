#!/usr/bin/env bash
# The gateway's standard benchmark suite.
#
#   bench/run.sh                  # full suite, REPEATS=3, writes docs/benchmarks.md
#   QUICK=1 bench/run.sh          # smoke test: 3 s runs, 1 repeat, writes $OUT/benchmarks.md
#   SCENARIOS="fanout-1k idle-10k" REPEATS=5 bench/run.sh
#
# Builds the release binaries, starts a private redis-server (random free port, never 6379,
# no persistence), then for every repeat and scenario starts two fresh gateway nodes on that
# Redis, runs target/release/gateway-bench against both (with their PIDs, for server CPU and
# RSS), and stops them. Finally it writes the medians over the repeats as markdown.
# Everything listens on 127.0.0.1, every step has a timeout, and only processes this script
# started are stopped, by PID (trap on EXIT).
#
# Environment knobs [defaults]:
#   QUICK [0]       1 = short runs, 1 repeat, the doc goes to $OUT unless DOC is set
#   REPEATS [3]     runs per scenario (QUICK: 1)
#   SCENARIOS [fanout-1k fanout-5k idle-10k churn max-rate]
#   DURATION [10]   fan-out publishing seconds (QUICK: 3)
#   HOLD [10]       idle hold seconds (QUICK: 3)
#   OUT [target/bench/run-DATE]   raw output (runs.jsonl, logs/)
#   DOC [docs/benchmarks.md]      the markdown written at the end
#   SKIP_BUILD [0]  1 = use the binaries already built
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  REPEATS="${REPEATS:-1}"
  DURATION="${DURATION:-3}"
  HOLD="${HOLD:-3}"
else
  REPEATS="${REPEATS:-3}"
  DURATION="${DURATION:-10}"
  HOLD="${HOLD:-10}"
fi
SCENARIOS="${SCENARIOS:-fanout-1k fanout-5k idle-10k churn max-rate}"
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="${OUT:-$ROOT/target/bench/run-$STAMP}"
if [ "$QUICK" = 1 ]; then DOC="${DOC:-$OUT/benchmarks.md}"; else DOC="${DOC:-$ROOT/docs/benchmarks.md}"; fi
SKIP_BUILD="${SKIP_BUILD:-0}"
GATEWAY="$ROOT/target/release/gateway"
BENCH="$ROOT/target/release/gateway-bench"

mkdir -p "$OUT/logs"
RUNS="$OUT/runs.jsonl"      # one gateway-bench JSON summary per run
COMMANDS="$OUT/commands.txt" # every command run, with the ports of that run
: >"$RUNS"
: >"$COMMANDS"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ------------------------------------------------------------------ processes we started
STARTED=()

stop_pid() {
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${STARTED[@]:-}"; do
    [ -n "$pid" ] && stop_pid "$pid"
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ helpers
free_port() {
  local port
  while :; do
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    [ "$port" != 6379 ] && { echo "$port"; return; }
  done
}

wait_port() { # wait_port PORT PID: until 127.0.0.1:PORT accepts (15 s)
  local port="$1" pid="$2"
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

wait_ready() { # wait_ready PORT PID: until GET /readyz answers 200 (15 s)
  local port="$1" pid="$2" status
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || return 1
    status="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port/readyz" || true)"
    [ "$status" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

# ------------------------------------------------------------------ build
if [ "$SKIP_BUILD" != 1 ]; then
  log "cargo build --release -p gateway -p gateway-bench"
  timeout 3600 cargo build --release -p gateway -p gateway-bench
fi
[ -x "$GATEWAY" ] || { log "missing $GATEWAY"; exit 1; }
[ -x "$BENCH" ] || { log "missing $BENCH"; exit 1; }
command -v redis-server >/dev/null || { log "redis-server is not installed (apt-get install redis-server)"; exit 1; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open-files limit $(ulimit -n); output in $OUT"

# ------------------------------------------------------------------ redis
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --protected-mode yes >"$OUT/logs/redis.log" 2>&1 &
REDIS_PID=$!
STARTED+=("$REDIS_PID")
wait_port "$REDIS_PORT" "$REDIS_PID" || { log "redis-server did not start (see $OUT/logs/redis.log)"; exit 1; }
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
log "private redis-server pid $REDIS_PID on $REDIS_URL"

# ------------------------------------------------------------------ gateway nodes
NODE_PIDS=()
URLS=()
start_nodes() { # start_nodes TAG
  local tag="$1" i port pid
  NODE_PIDS=()
  URLS=()
  for i in 1 2; do
    port="$(free_port)"
    RUST_LOG=warn "$GATEWAY" --listen "127.0.0.1:$port" --redis-url "$REDIS_URL" --node-id "bench-$i" \
      >"$OUT/logs/$tag-node$i.log" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    NODE_PIDS+=("$pid")
    if ! wait_ready "$port" "$pid"; then
      log "gateway node $i did not become ready (see $OUT/logs/$tag-node$i.log)"
      return 1
    fi
    URLS+=(--url "ws://127.0.0.1:$port/ws")
  done
}

stop_nodes() {
  local pid
  for pid in "${NODE_PIDS[@]}"; do stop_pid "$pid"; done
  NODE_PIDS=()
}

# ------------------------------------------------------------------ scenarios
# scenario_args NAME: sets KIND and ARGS for the scenario.
scenario_args() {
  case "$1" in
    fanout-1k) KIND=fanout; ARGS=(--subscribers 1000 --publishers 2 --rate 1000 --duration "$DURATION" --payload 100) ;;
    fanout-5k) KIND=fanout; ARGS=(--subscribers 5000 --publishers 2 --rate 200 --duration "$DURATION" --payload 100 --connect-timeout 30) ;;
    idle-10k) KIND=idle; ARGS=(--connections 10000 --channels 100 --hold "$HOLD" --connect-timeout 30) ;;
    churn) KIND=churn; ARGS=(--workers 32 --duration "$DURATION") ;;
    max-rate)
      KIND=max-rate
      if [ "$QUICK" = 1 ]; then
        ARGS=(--subscribers 1000 --publishers 2 --payload 100 --low 100 --high 10000 --resolution 400 --probe-duration 2 --cooldown 1 --p99-bound-ms 100)
      else
        ARGS=(--subscribers 1000 --publishers 2 --payload 100 --low 100 --high 10000 --resolution 50 --probe-duration 5 --cooldown 2 --p99-bound-ms 100)
      fi
      ;;
    *) log "unknown scenario $1"; return 1 ;;
  esac
}

RUN_NO=0
run_one() { # run_one SCENARIO REPEAT
  local sc="$1" rep="$2" tag limit status=0 pid pids=()
  RUN_NO=$((RUN_NO + 1))
  tag="$(printf '%02d' "$RUN_NO")-$sc-r$rep"
  scenario_args "$sc"
  if ! start_nodes "$tag"; then
    stop_nodes
    printf '{"scenario":"%s","label":"%s","error":"gateway nodes did not start"}\n' "$KIND" "$sc" >>"$RUNS"
    return 0
  fi
  for pid in "${NODE_PIDS[@]}"; do pids+=(--server-pid "$pid"); done
  limit=$((DURATION + HOLD + 900))
  log "$sc (repeat $rep/$REPEATS): gateway-bench $KIND ${ARGS[*]}"
  printf '%s\n' "gateway-bench $KIND ${URLS[*]} ${pids[*]} --redis-pid $REDIS_PID --label $sc --json-out runs.jsonl ${ARGS[*]}" >>"$COMMANDS"
  timeout --kill-after=10 "$limit" "$BENCH" "$KIND" "${URLS[@]}" "${pids[@]}" --redis-pid "$REDIS_PID" \
    --label "$sc" --json-out "$RUNS" "${ARGS[@]}" >"$OUT/$tag.json" 2>"$OUT/logs/$tag.bench.log" || status=$?
  if [ "$status" != 0 ]; then
    log "$sc: gateway-bench exited with $status (see $OUT/logs/$tag.bench.log)"
    printf '{"scenario":"%s","label":"%s","error":"gateway-bench exit %s"}\n' "$KIND" "$sc" "$status" >>"$RUNS"
  fi
  for pid in "${NODE_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || log "$sc: gateway node pid $pid died during the run (see $OUT/logs/$tag-node*.log)"
  done
  tail -n 3 "$OUT/logs/$tag.bench.log" | sed 's/^/    /' >&2 || true
  stop_nodes
}

for rep in $(seq 1 "$REPEATS"); do
  for sc in $SCENARIOS; do
    run_one "$sc" "$rep"
  done
done

# ------------------------------------------------------------------ report
cpu_model="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
{
  echo "date=$(date '+%Y-%m-%d %H:%M %Z')"
  echo "nproc=$(nproc)"
  echo "cpu=${cpu_model:-unknown}"
  echo "kernel=$(uname -sr)"
  echo "mem=$(awk '/^MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "rustc=$(rustc --version 2>/dev/null || echo unknown)"
  echo "redis=$(redis-server --version | awk '{print $3}' | sed 's/v=//')"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "nofile=$(ulimit -n)"
  echo "quick=$QUICK"
  echo "repeats=$REPEATS"
  echo "duration=$DURATION"
  echo "hold=$HOLD"
  echo "scenarios=$SCENARIOS"
} >"$OUT/machine.txt"

mkdir -p "$(dirname "$DOC")"
python3 "$ROOT/bench/report.py" "$RUNS" "$OUT/machine.txt" "$COMMANDS" "$DOC"
log "raw summaries: $RUNS; commands: $COMMANDS; report: $DOC"
