#!/usr/bin/env bash
# A private 3-node reference RabbitMQ cluster (Debian's rabbitmq-server 3.10.x)
# on this machine, for differential tests of Warren's clustering
# (tests/cluster/differential.py). Each node is one scripts/rabbitmq-ref.sh
# instance with its own node name, ports and state directory (its WARREN_REF_*
# overrides); the three share one Erlang cookie, and nodes 2 and 3 join node 1
# with `rabbitmqctl stop_app / join_cluster / start_app`.
#
#   node N (1..3)  warren-refN@localhost
#   AMQP           127.0.0.1:568N   -> amqp://guest:guest@127.0.0.1:568N/%2f
#   management     127.0.0.1:1568N  (HTTP API, guest/guest)
#   prometheus     127.0.0.1:1578N
#   distribution   2568N            (CLI tools use 3568N-3569N)
#   state          ${TMPDIR:-/tmp}/warren-rabbitmq-cluster/nodeN (+ cookie)
#
# None of these clash with scripts/rabbitmq-ref.sh (5673/15673/15693/25673) or
# with Warren's defaults (5672/15672/15692/25672).
#
# Usage: scripts/rabbitmq-cluster.sh start         start the three nodes (no-op for a running
#                                                  one), join 2 and 3 to 1, wait, print URLs
#        scripts/rabbitmq-cluster.sh stop          stop all three (no-op if not running)
#        scripts/rabbitmq-cluster.sh reset         stop and wipe all state
#        scripts/rabbitmq-cluster.sh status        per node: running or not; exit 0 only if all
#                                                  three run and node 1 sees all three running
#        scripts/rabbitmq-cluster.sh urls          one line per node: N NODE AMQP_URL MGMT_URL
#        scripts/rabbitmq-cluster.sh ctl N ARGS... rabbitmqctl against node N
#        scripts/rabbitmq-cluster.sh stop-node N   stop node N's Erlang VM (the others keep it
#                                                  as a stopped member)
#        scripts/rabbitmq-cluster.sh start-node N  start node N again (it rejoins by itself)
#
# Environment overrides (all optional): WARREN_RMQC_DIR (state root),
# WARREN_RMQC_AMQP_BASE (5680), WARREN_RMQC_MGMT_BASE (15680),
# WARREN_RMQC_PROM_BASE (15780), WARREN_RMQC_DIST_BASE (25680): node N uses
# BASE+N; WARREN_RMQC_NODE_PREFIX (warren-ref, node N is PREFIXN@localhost);
# WARREN_REF_START_TIMEOUT and WARREN_REF_RABBITMQ_BIN pass through to
# scripts/rabbitmq-ref.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REF="$HERE/rabbitmq-ref.sh"
ROOT="${WARREN_RMQC_DIR:-${TMPDIR:-/tmp}/warren-rabbitmq-cluster}"
AMQP_BASE="${WARREN_RMQC_AMQP_BASE:-5680}"
MGMT_BASE="${WARREN_RMQC_MGMT_BASE:-15680}"
PROM_BASE="${WARREN_RMQC_PROM_BASE:-15780}"
DIST_BASE="${WARREN_RMQC_DIST_BASE:-25680}"
PREFIX="${WARREN_RMQC_NODE_PREFIX:-warren-ref}"
NODES=(1 2 3)

log() { printf '[rabbitmq-cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$REF" ] || die "$REF not found or not executable"

node_name() { echo "${PREFIX}$1@localhost"; }
amqp_url() { echo "amqp://guest:guest@127.0.0.1:$((AMQP_BASE + $1))/%2f"; }
mgmt_url() { echo "http://127.0.0.1:$((MGMT_BASE + $1))"; }

check_n() {
    case "${1:-}" in
    1 | 2 | 3) ;;
    *) die "node number must be 1, 2 or 3 (got '${1:-}')" ;;
    esac
}

# ref N ARGS...: scripts/rabbitmq-ref.sh ARGS... for node N (its env overrides).
ref() {
    local n="$1"
    shift
    WARREN_REF_DIR="$ROOT/node$n" \
        WARREN_REF_NODE="$(node_name "$n")" \
        WARREN_REF_BIND=127.0.0.1 \
        WARREN_REF_AMQP_PORT="$((AMQP_BASE + n))" \
        WARREN_REF_MGMT_PORT="$((MGMT_BASE + n))" \
        WARREN_REF_PROM_PORT="$((PROM_BASE + n))" \
        WARREN_REF_DIST_PORT="$((DIST_BASE + n))" \
        "$REF" "$@"
}

# The shared Erlang cookie: made once, copied into every node's private HOME
# (rabbitmq-ref.sh points HOME at <state>/home) before the node or a CLI tool
# runs, so the nodes and the CLI tools all authenticate with it.
install_cookie() {
    mkdir -p "$ROOT"
    if [ ! -s "$ROOT/cookie" ]; then
        (umask 077 && head -c 15 /dev/urandom | od -An -tx1 | tr -dc 'a-f0-9' | tr 'a-f' 'A-F' >"$ROOT/cookie")
    fi
    local n f
    for n in "${NODES[@]}"; do
        f="$ROOT/node$n/home/.erlang.cookie"
        mkdir -p "$ROOT/node$n/home"
        if [ ! -f "$f" ] || ! cmp -s "$ROOT/cookie" "$f"; then
            chmod 600 "$f" 2>/dev/null || true
            cp "$ROOT/cookie" "$f"
            chmod 400 "$f"
        fi
    done
}

running() { ref "$1" status >/dev/null 2>&1; }

# Node names node 1 reports as running cluster members (one per line).
running_members() {
    ref 1 ctl -q cluster_status --formatter json 2>/dev/null |
        python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin).get("running_nodes", [])))'
}

all_members() {
    ref 1 ctl -q cluster_status --formatter json 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print("\n".join(d.get("disk_nodes", []) + d.get("ram_nodes", [])))'
}

cmd_start() {
    install_cookie
    # A node 1 with no state while 2 or 3 remember an old cluster: they would
    # refuse to boot (their cluster is gone). Start them fresh too.
    if [ ! -d "$ROOT/node1/mnesia" ]; then
        for n in 2 3; do
            if [ -d "$ROOT/node$n/mnesia" ]; then
                log "node 1 has no state; wiping node $n's old cluster state"
                ref "$n" reset >/dev/null 2>&1 || true
            fi
        done
        install_cookie
    fi
    # Boot the three in parallel: nodes that were clustered before wait for
    # each other while booting, and it is faster. Each one's output goes to its
    # own file and is shown if it fails.
    local pids=() n rc=0 t0=$SECONDS
    for n in "${NODES[@]}"; do
        ref "$n" start >"$ROOT/start-node$n.out" 2>&1 &
        pids+=($!)
    done
    for n in "${NODES[@]}"; do
        if wait "${pids[$((n - 1))]}"; then
            log "node $n ($(node_name "$n")) up"
        else
            rc=1
            log "node $n ($(node_name "$n")) failed to start:"
            sed 's/^/    /' "$ROOT/start-node$n.out" >&2
        fi
    done
    [ "$rc" = 0 ] || die "a node did not start (state in $ROOT; 'scripts/rabbitmq-cluster.sh reset' starts over from nothing)"
    local members
    members="$(all_members)" || die "cannot read node 1's cluster_status"
    for n in 2 3; do
        if grep -qx "$(node_name "$n")" <<<"$members"; then
            continue
        fi
        log "node $n joins $(node_name 1)"
        ref "$n" ctl -q stop_app >&2 || die "stop_app on node $n failed"
        ref "$n" ctl -q join_cluster "$(node_name 1)" >&2 ||
            die "join_cluster $(node_name 1) on node $n failed (see $ROOT/node$n/log)"
        ref "$n" ctl -q start_app >&2 || die "start_app on node $n failed (see $ROOT/node$n/log)"
    done
    # Wait until node 1 sees all three running.
    local i want got
    want="$(for n in "${NODES[@]}"; do node_name "$n"; done | sort)"
    for i in $(seq 1 60); do
        got="$(running_members | sort)"
        [ "$got" = "$want" ] && break
        [ "$i" = 60 ] && die "node 1 does not see all three nodes running after 60 s; it sees: $(echo "$got" | tr '\n' ' ')"
        sleep 1
    done
    log "cluster of 3 running ($((SECONDS - t0)) s): $(echo "$got" | tr '\n' ' ')"
    cmd_urls
}

cmd_stop() {
    local pids=() n
    [ -d "$ROOT" ] || { log "not running (no state in $ROOT)"; return 0; }
    install_cookie
    for n in "${NODES[@]}"; do
        ref "$n" stop &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
}

cmd_status() {
    local n rc=0
    [ -d "$ROOT" ] || { log "not running (no state in $ROOT)"; return 1; }
    install_cookie
    for n in "${NODES[@]}"; do
        if running "$n"; then
            log "node $n $(node_name "$n"): running ($(amqp_url "$n"), $(mgmt_url "$n"))"
        else
            log "node $n $(node_name "$n"): not running"
            rc=1
        fi
    done
    if [ "$rc" = 0 ]; then
        local got
        got="$(running_members | sort | tr '\n' ' ')"
        log "node 1 sees running: $got"
        [ "$(echo "$got" | wc -w)" = 3 ] || rc=1
    fi
    return "$rc"
}

cmd_urls() {
    local n
    for n in "${NODES[@]}"; do
        echo "$n $(node_name "$n") $(amqp_url "$n") $(mgmt_url "$n")"
    done
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
reset)
    cmd_stop
    log "wiping $ROOT"
    rm -rf "$ROOT"
    ;;
status) cmd_status ;;
urls) cmd_urls ;;
ctl)
    check_n "${2:-}"
    n="$2"
    shift 2
    install_cookie
    ref "$n" ctl "$@"
    ;;
stop-node)
    check_n "${2:-}"
    install_cookie
    ref "$2" stop
    ;;
start-node)
    check_n "${2:-}"
    install_cookie
    ref "$2" start >/dev/null
    log "node $2 ($(node_name "$2")) started"
    ;;
*)
    echo "usage: $0 start|stop|reset|status|urls|ctl N ARGS...|stop-node N|start-node N" >&2
    exit 2
    ;;
esac
