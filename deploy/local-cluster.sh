#!/usr/bin/env bash
# shellcheck disable=SC2016  # the bash -c snippets expand their own "$1"
# The docker-compose topology without Docker, on 127.0.0.1: a private Redis,
# NODES gateway processes and HAProxy (same deploy/haproxy/haproxy.cfg as compose,
# with a rendered backend of static servers instead of the DNS template).
#
#   deploy/local-cluster.sh up          start everything, wait until ready, print the URLs
#   deploy/local-cluster.sh status      what runs, and each node's /readyz
#   deploy/local-cluster.sh stop-node I send SIGTERM to node I (a drain; does not wait)
#   deploy/local-cluster.sh down        stop exactly what `up` started (TERM, wait, KILL)
#   deploy/local-cluster.sh render      print the HAProxy backend `up` would use
#
# Environment (defaults):
#   GATEWAY_BIN  target/release/gateway     NODES      3
#   BASE_PORT    18081 (node i: BASE_PORT+i-1)   LB_PORT 18080
#   REDIS_PORT   first free from 16379      STATS_PORT first free from 18404
#   STATE_DIR    .local-cluster/ in the repo (PIDs, logs, rendered config)
#   DOWN_TIMEOUT 30 (seconds to wait for a process after SIGTERM before SIGKILL)
# Other GATEWAY_* variables (GATEWAY_API_KEY, GATEWAY_SHUTDOWN_GRACE, ...) and
# RUST_LOG pass through to the nodes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/gateway}
NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-18081}
LB_PORT=${LB_PORT:-18080}
STATE_DIR=${STATE_DIR:-$ROOT/.local-cluster}
DOWN_TIMEOUT=${DOWN_TIMEOUT:-30}
PIDS=$STATE_DIR/pids            # one line per process: name pid starttime
BACKEND=$STATE_DIR/backend-local.cfg

log() { printf '%s\n' "$*" >&2; }
die() { log "local-cluster: $*"; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_busy() { timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }
first_free_port() { local p=$1; while port_busy "$p"; do p=$((p + 1)); done; echo "$p"; }

# Minimal HTTP GET on 127.0.0.1 without curl: prints the raw response.
http_get() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$2" >&3
        cat <&3' _ "$1" "$2" 2>/dev/null || true
}
http_status() { http_get "$1" "$2" | awk 'NR == 1 { print $2; exit }'; }
redis_ping() {
    timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "PING\r\n" >&3; read -r line <&3; [[ $line == +PONG* ]]' _ "$1" 2>/dev/null
}

# Process identity = pid + start time, so a recycled pid is never signalled.
starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
# Alive = exists, not a zombie, same start time as recorded.
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z && $(starttime "$1") == "$2" ]]
}

# spawn NAME CMD... : start in the background, logs to STATE_DIR/NAME.log.
spawn() {
    local name=$1; shift
    "$@" </dev/null >>"$STATE_DIR/$name.log" 2>&1 &
    echo "$name $! $(starttime $!)" >>"$PIDS"
}
pid_of() { awk -v n="$1" '$1 == n { print $2 }' "$PIDS" 2>/dev/null; }
check_alive() { # name: fail `up` with the log's tail if the process died
    local line
    line=$(awk -v n="$1" '$1 == n' "$PIDS")
    # shellcheck disable=SC2086
    set -- $line
    alive "${2:-}" "${3:-}" || fail_up "$1 exited; last lines of $STATE_DIR/$1.log:
$(tail -n 20 "$STATE_DIR/$1.log")"
}
# wait_for SECONDS WHAT NAME CMD...: poll CMD every 0.1s while NAME stays alive.
wait_for() {
    local limit=$1 what=$2 name=$3 deadline=$((SECONDS + $1)); shift 3
    until "$@"; do
        check_alive "$name"
        ((SECONDS < deadline)) || fail_up "timed out after ${limit}s waiting for $what"
        sleep 0.1
    done
}
fail_up() { log "local-cluster: $*"; do_down; exit 1; }

node_port() { echo $((BASE_PORT + $1 - 1)); }
node_ready() { [[ $(http_status "$(node_port "$1")" /readyz) == 200 ]]; }

render() {
    echo "# Rendered by deploy/local-cluster.sh: $NODES static gateway nodes on 127.0.0.1."
    echo "backend gateways"
    for i in $(seq 1 "$NODES"); do
        echo "    server node$i 127.0.0.1:$(node_port "$i")"
    done
}

servers_up() { # all NODES servers UP in HAProxy's CSV stats (column 18 = status)
    local n
    n=$(http_get "$STATS_PORT" '/stats;csv' | awk -F, '$1 == "gateways" && $2 ~ /^node/ && $18 == "UP"' | wc -l)
    ((n == NODES))
}

do_up() {
    local missing=()
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v redis-server >/dev/null || missing+=(redis-server)
    if ((${#missing[@]})); then
        die "missing ${missing[*]}; install with: apt-get install -y --no-install-recommends ${missing[*]}"
    fi
    [[ -x $GATEWAY_BIN ]] || die "no gateway binary at $GATEWAY_BIN (cargo build --release -p gateway, or set GATEWAY_BIN)"
    [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer"
    mkdir -p "$STATE_DIR"
    if [[ -s $PIDS ]]; then
        while read -r _ pid st; do
            alive "$pid" "$st" && die "already up (pid $pid; state in $STATE_DIR): run down first"
        done <"$PIDS"
        rm -f "$PIDS"
    fi
    REDIS_PORT=${REDIS_PORT:-$(first_free_port 16379)}
    STATS_PORT=${STATS_PORT:-$(first_free_port 18404)}
    [[ $REDIS_PORT != 6379 ]] || die "REDIS_PORT 6379 is reserved for a real Redis; pick another"
    local ports=("$REDIS_PORT" "$LB_PORT" "$STATS_PORT") i
    for i in $(seq 1 "$NODES"); do ports+=("$(node_port "$i")"); done
    for i in "${ports[@]}"; do port_busy "$i" && die "port $i is in use"; done
    # What status/down need to know about this run.
    declare -p NODES BASE_PORT LB_PORT STATS_PORT REDIS_PORT >"$STATE_DIR/cluster.env"

    spawn redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$STATE_DIR" --daemonize no
    wait_for 10 "redis on port $REDIS_PORT" redis redis_ping "$REDIS_PORT"

    for i in $(seq 1 "$NODES"); do
        spawn "node$i" env REDIS_URL="redis://127.0.0.1:$REDIS_PORT" GATEWAY_NODE_ID="node$i" \
            GATEWAY_LISTEN="127.0.0.1:$(node_port "$i")" \
            GATEWAY_TRUSTED_PROXIES="${GATEWAY_TRUSTED_PROXIES:-127.0.0.1/32}" "$GATEWAY_BIN"
    done
    for i in $(seq 1 "$NODES"); do
        wait_for 20 "node$i /readyz" "node$i" node_ready "$i"
    done

    render >"$BACKEND"
    export LB_BIND="127.0.0.1:$LB_PORT" STATS_BIND="127.0.0.1:$STATS_PORT"
    local cfg=(-f "$ROOT/deploy/haproxy/haproxy.cfg" -f "$BACKEND")
    haproxy -c -q "${cfg[@]}" || fail_up "haproxy rejected its config (haproxy -c ${cfg[*]})"
    spawn haproxy haproxy -db "${cfg[@]}"
    wait_for 15 "HAProxy to see all $NODES nodes UP" haproxy servers_up

    cat <<EOF
local cluster up ($NODES nodes; state and logs in $STATE_DIR)
  clients   ws://127.0.0.1:$LB_PORT/ws
  publish   curl -XPOST http://127.0.0.1:$LB_PORT/api/publish -d '{"channel":"demo","data":"hi"}'
  haproxy   http://127.0.0.1:$STATS_PORT/stats   (metrics: /metrics)
  redis     redis://127.0.0.1:$REDIS_PORT
EOF
    for i in $(seq 1 "$NODES"); do
        echo "  node$i     http://127.0.0.1:$(node_port "$i")/metrics   (pid $(pid_of "node$i"))"
    done
}

# Stop processes by name prefix: SIGTERM, wait up to DOWN_TIMEOUT, then SIGKILL.
stop_group() {
    local prefix=$1 name pid st deadline=$((SECONDS + DOWN_TIMEOUT)) left
    while read -r name pid st; do
        [[ $name == "$prefix"* ]] && alive "$pid" "$st" && { kill -TERM "$pid" 2>/dev/null || true; }
    done <"$PIDS"
    while :; do
        left=()
        while read -r name pid st; do
            [[ $name == "$prefix"* ]] && alive "$pid" "$st" && left+=("$pid")
        done <"$PIDS"
        ((${#left[@]})) || return 0
        if ((SECONDS >= deadline)); then
            log "local-cluster: ${left[*]} still running after ${DOWN_TIMEOUT}s: SIGKILL"
            kill -KILL "${left[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
}

do_down() {
    [[ -f $PIDS ]] || { log "local-cluster: nothing to stop (no $PIDS)"; return 0; }
    # Nodes first, so they drain (1001 to their clients) through a live HAProxy.
    stop_group node
    stop_group haproxy
    stop_group redis
    rm -f "$PIDS" "$STATE_DIR/cluster.env"
    log "local-cluster: stopped (logs kept in $STATE_DIR)"
}

do_status() {
    [[ -f $PIDS ]] || { echo "down"; return 0; }
    # shellcheck source=/dev/null
    [[ -f $STATE_DIR/cluster.env ]] && source "$STATE_DIR/cluster.env"
    local name pid st state
    while read -r name pid st; do
        state=dead
        if alive "$pid" "$st"; then
            state=running
            if [[ $name == node* ]]; then
                state="running, /readyz $(http_status "$(node_port "${name#node}")" /readyz || true)"
            fi
        fi
        printf '%-8s pid %-8s %s\n' "$name" "$pid" "$state"
    done <"$PIDS"
    echo "clients: ws://127.0.0.1:$LB_PORT/ws"
}

do_stop_node() {
    local i=${1:?usage: stop-node I} line
    line=$(awk -v n="node$i" '$1 == n' "$PIDS" 2>/dev/null)
    [[ -n $line ]] || die "no node$i in $PIDS"
    # shellcheck disable=SC2086
    set -- $line
    alive "$2" "$3" || die "node$i (pid $2) is not running"
    kill -TERM "$2"
    echo "node$i (pid $2): SIGTERM sent"
}

case ${1:-} in
    up) do_up ;;
    down) do_down ;;
    status) do_status ;;
    stop-node) do_stop_node "${2:-}" ;;
    render) render ;;
    *) die "usage: $0 up|down|status|stop-node I|render" ;;
esac
