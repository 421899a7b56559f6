#!/usr/bin/env bash
# Reference RabbitMQ (Debian's rabbitmq-server 3.10.x) as a private, throw-away
# instance that never conflicts with Warren or with a system RabbitMQ:
#
#   node name      warren-ref@localhost
#   AMQP           127.0.0.1:5673   -> amqp://guest:guest@127.0.0.1:5673/%2f
#   management     127.0.0.1:15673  (HTTP API, guest/guest)
#   prometheus     127.0.0.1:15693  (/metrics)
#   distribution   25673            (Erlang dist; CLI tools use 35672-35682)
#   state          ${TMPDIR:-/tmp}/warren-rabbitmq-ref  (mnesia, logs, config,
#                  enabled_plugins, and its own HOME with its own .erlang.cookie)
#
# Plugins: management, federation(+management), shovel(+management), prometheus.
#
# Usage: scripts/rabbitmq-ref.sh start    start detached (no-op if running), wait, print URL
#        scripts/rabbitmq-ref.sh stop     stop it (no-op if not running)
#        scripts/rabbitmq-ref.sh url      print the AMQP URL
#        scripts/rabbitmq-ref.sh status   exit 0 if running
#        scripts/rabbitmq-ref.sh reset    stop and wipe all state (next start is fresh)
#        scripts/rabbitmq-ref.sh ctl ARGS...    rabbitmqctl against this node
#        scripts/rabbitmq-ref.sh plugins ARGS... rabbitmq-plugins against this node
#        scripts/rabbitmq-ref.sh logs     print the node's log file(s)
#
# Environment overrides (all optional): WARREN_REF_DIR, WARREN_REF_NODE,
# WARREN_REF_BIND (default 127.0.0.1), WARREN_REF_AMQP_PORT, WARREN_REF_MGMT_PORT,
# WARREN_REF_PROM_PORT, WARREN_REF_DIST_PORT, WARREN_REF_START_TIMEOUT (seconds, 120).
#
# Requires Debian's rabbitmq-server package (scripts/deps.sh installs it). The
# package's /usr/sbin wrappers `su` to the rabbitmq user; we call the real
# scripts in /usr/lib/rabbitmq/bin directly as the current user instead, with
# HOME pointed at the state directory so the server and the CLI share a private
# Erlang cookie.
set -euo pipefail

BASE="${WARREN_REF_DIR:-${TMPDIR:-/tmp}/warren-rabbitmq-ref}"
NODE="${WARREN_REF_NODE:-warren-ref@localhost}"
BIND="${WARREN_REF_BIND:-127.0.0.1}"
AMQP_PORT="${WARREN_REF_AMQP_PORT:-5673}"
MGMT_PORT="${WARREN_REF_MGMT_PORT:-15673}"
PROM_PORT="${WARREN_REF_PROM_PORT:-15693}"
DIST_PORT="${WARREN_REF_DIST_PORT:-25673}"
START_TIMEOUT="${WARREN_REF_START_TIMEOUT:-120}"
RMQ_BIN="${WARREN_REF_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"

URL="amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f"

log() { printf '[rabbitmq-ref] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

setup_env() {
    [ -x "$RMQ_BIN/rabbitmq-server" ] ||
        die "$RMQ_BIN/rabbitmq-server not found; install Debian's rabbitmq-server (run scripts/deps.sh)"
    mkdir -p "$BASE/home" "$BASE/mnesia" "$BASE/log"
    # Config: AMQP/dist ports come from env vars below; management and
    # prometheus listeners from this file. guest stays loopback-only (default).
    cat >"$BASE/rabbitmq.conf" <<EOF
management.tcp.port = ${MGMT_PORT}
management.tcp.ip = ${BIND}
prometheus.tcp.port = ${PROM_PORT}
prometheus.tcp.ip = ${BIND}
log.file.level = info
log.console = false
EOF
    echo '[rabbitmq_management,rabbitmq_federation,rabbitmq_federation_management,rabbitmq_shovel,rabbitmq_shovel_management,rabbitmq_prometheus].' \
        >"$BASE/enabled_plugins"
    # Empty env file so /etc/rabbitmq/rabbitmq-env.conf is not read.
    : >"$BASE/rabbitmq-env.conf"

    export HOME="$BASE/home"
    export RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf"
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_USE_LONGNAME=false
    export RABBITMQ_NODE_IP_ADDRESS="$BIND"
    export RABBITMQ_NODE_PORT="$AMQP_PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export RABBITMQ_CONFIG_FILE="$BASE/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$BASE/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$BASE/mnesia"
    export RABBITMQ_LOG_BASE="$BASE/log"
    export RABBITMQ_PID_FILE="$BASE/rabbitmq.pid"
    # Do not let a caller's RABBITMQ_* leftovers (e.g. a system node's) leak in.
    unset RABBITMQ_MNESIA_DIR RABBITMQ_PLUGINS_EXPAND_DIR RABBITMQ_FEATURE_FLAGS_FILE \
        RABBITMQ_QUORUM_DIR RABBITMQ_STREAM_DIR RABBITMQ_LOGS RABBITMQ_ERLANG_COOKIE || true
}

ctl() { "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

is_running() {
    # Cheap check first: is the pid alive? Then ask the node itself.
    [ -f "$BASE/rabbitmq.pid" ] || return 1
    local pid
    pid="$(cat "$BASE/rabbitmq.pid" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    timeout 30 "$RMQ_BIN/rabbitmq-diagnostics" -n "$NODE" -q ping >/dev/null 2>&1
}

port_busy() {
    # true if something listens on TCP port $1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_start() {
    setup_env
    if is_running; then
        log "already running ($NODE)"
        echo "$URL"
        return 0
    fi
    for p in "$AMQP_PORT" "$MGMT_PORT" "$PROM_PORT" "$DIST_PORT"; do
        if port_busy "$p"; then
            die "port $p is already in use by another process; cannot start $NODE (ss -ltnp | grep :$p)"
        fi
    done
    rm -f "$BASE/rabbitmq.pid"
    log "starting $NODE (amqp $BIND:$AMQP_PORT, mgmt $MGMT_PORT, prometheus $PROM_PORT, dist $DIST_PORT, state $BASE)"
    # -detached forks; stdout/stderr of the launcher go to a file.
    (cd "$BASE" && "$RMQ_BIN/rabbitmq-server" -detached) >"$BASE/log/launcher.log" 2>&1 ||
        { cat "$BASE/log/launcher.log" >&2; die "rabbitmq-server -detached failed"; }
    # The pid file is written by the node once the VM is up; wait for it so
    # await_startup has a pid to watch.
    local i=0
    while [ ! -s "$BASE/rabbitmq.pid" ]; do
        i=$((i + 1))
        if [ "$i" -gt $((START_TIMEOUT * 2)) ]; then
            cat "$BASE/log/launcher.log" >&2 || true
            die "node did not write its pid file within ${START_TIMEOUT}s; see $BASE/log"
        fi
        sleep 0.5
    done
    if ! timeout "$((START_TIMEOUT + 10))" "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q await_startup --timeout "$START_TIMEOUT" >&2; then
        log "startup failed; last log lines:"
        tail -n 40 "$BASE/log/"*.log >&2 || true
        die "$NODE did not finish booting within ${START_TIMEOUT}s"
    fi
    # Listener check: AMQP must accept TCP now.
    port_busy "$AMQP_PORT" || die "$NODE booted but nothing listens on $AMQP_PORT"
    log "ready: $URL  (management http://127.0.0.1:$MGMT_PORT/, metrics http://127.0.0.1:$PROM_PORT/metrics)"
    echo "$URL"
}

cmd_stop() {
    setup_env
    if ! is_running; then
        # Maybe the VM is alive but unresponsive: kill the pid we own.
        if [ -f "$BASE/rabbitmq.pid" ]; then
            local pid
            pid="$(cat "$BASE/rabbitmq.pid" 2>/dev/null || true)"
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
                log "node not answering; killing pid $pid"
                kill "$pid" 2>/dev/null || true
                sleep 2
                kill -9 "$pid" 2>/dev/null || true
            fi
            rm -f "$BASE/rabbitmq.pid"
        fi
        log "not running"
        return 0
    fi
    log "stopping $NODE"
    # With the pid file argument, `stop` waits until the OS process is gone.
    timeout 120 "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q stop "$BASE/rabbitmq.pid" >&2 || {
        local pid
        pid="$(cat "$BASE/rabbitmq.pid" 2>/dev/null || true)"
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    }
    rm -f "$BASE/rabbitmq.pid"
    log "stopped"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
url) echo "$URL" ;;
status)
    setup_env
    if is_running; then
        log "running: $URL"
    else
        log "not running"
        exit 1
    fi
    ;;
reset)
    cmd_stop
    log "wiping $BASE"
    rm -rf "$BASE"
    ;;
ctl)
    shift
    setup_env
    ctl "$@"
    ;;
plugins)
    shift
    setup_env
    "$RMQ_BIN/rabbitmq-plugins" -n "$NODE" "$@"
    ;;
logs)
    setup_env
    cat "$BASE/log/"*.log
    ;;
*)
    echo "usage: $0 start|stop|url|status|reset|ctl ARGS...|plugins ARGS...|logs" >&2
    exit 2
    ;;
esac
