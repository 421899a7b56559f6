#!/usr/bin/env bash
# Memory per idle connection and per queue: Warren beside RabbitMQ, in the same run.
#
#   scripts/bench-memory.sh                          # 10,000 connections, 100,000 queues
#   MEM_CONNECTIONS=2000 MEM_QUEUES=20000 scripts/bench-memory.sh
#   BENCH_ONLY=warren scripts/bench-memory.sh        # one side (warren | rabbitmq)
#
# For each broker, twice fresh: its resident memory (RSS of the process; the Erlang VM for
# RabbitMQ) and what it reports itself (`mem_used` of /api/nodes) at rest, then with
# MEM_CONNECTIONS idle connections (a channel each) held by broker/examples/idle_load.rs;
# at rest again, then with MEM_QUEUES transient queues declared. The differences divided by
# the counts are the cost of one connection and of one queue. Writes
# bench-results/memory-<stamp>/results.md.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

CONNS="${MEM_CONNECTIONS:-10000}"
QUEUES="${MEM_QUEUES:-100000}"
ONLY="${BENCH_ONLY:-}"
case "$ONLY" in "" | warren | rabbitmq) ;; *) die "BENCH_ONLY must be warren or rabbitmq" ;; esac
BROKERS=()
[ "$ONLY" = rabbitmq ] || BROKERS+=(warren)
[ "$ONLY" = warren ] || BROKERS+=(rabbitmq)
# Each connection is a socket on both ends.
need=$((CONNS + 1000))
if [ "$(ulimit -n)" -lt "$need" ]; then
    ulimit -n "$need" 2>/dev/null || die "open files limit $(ulimit -n) < $need and cannot be raised; lower MEM_CONNECTIONS"
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$WARREN_ROOT/bench-results/memory-$STAMP"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-mem.XXXXXX")"
WARREN_PID=""
REF_STARTED=""
LOAD_PID=""
cleanup() {
    local rc=$?
    [ -z "$LOAD_PID" ] || kill "$LOAD_PID" 2>/dev/null || true
    [ -n "$WARREN_PID" ] && stop_warren "$WARREN_PID"
    [ -n "$REF_STARTED" ] && { "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop || true; }
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

header "dependencies"
"$WARREN_ROOT/scripts/deps.sh" rabbitmq
header "cargo build --release -p warren-broker --bin warren-broker --example idle_load"
cargo build --release -p warren-broker --bin warren-broker --example idle_load
BIN="$(cargo_target_dir)/release/warren-broker"
LOAD="$(cargo_target_dir)/release/examples/idle_load"

rss_kib() { ps -o rss= -p "$1" | tr -d ' '; }
mem_used() { # bytes, from the management API's /api/nodes
    curl -fsS -u guest:guest "$1/api/nodes" | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["mem_used"])'
}
# sample PID MGMT: "rss_kib mem_used_bytes", after the broker settles.
sample() {
    sleep 3
    echo "$(rss_kib "$1") $(mem_used "$2")"
}
# hold WHAT URL N: starts idle_load, waits for its "ready" line (LOAD_PID set).
hold() {
    rm -f "$WORK/load.fifo" "$WORK/load.out"
    mkfifo "$WORK/load.fifo"
    "$LOAD" "$1" "$2" "$3" <"$WORK/load.fifo" >"$WORK/load.out" 2>&1 &
    LOAD_PID=$!
    exec 7>"$WORK/load.fifo"
    local i
    for i in $(seq 1 1200); do
        grep -q '^ready' "$WORK/load.out" 2>/dev/null && { cat "$WORK/load.out"; return 0; }
        kill -0 "$LOAD_PID" 2>/dev/null || { cat "$WORK/load.out" >&2; die "idle_load $1 failed"; }
        sleep 0.5
    done
    die "idle_load $1 not ready in 600 s"
}
release() {
    exec 7>&-
    wait "$LOAD_PID" 2>/dev/null || true
    LOAD_PID=""
}

start_broker() {
    if [ "$1" = warren ]; then
        PORT="$(free_port)"
        header "start warren on 127.0.0.1:$PORT"
        rm -rf "$WORK/warren-data"
        start_warren "$BIN" "$PORT" "$WORK/warren-data" "$OUT/warren-$2.log"
        PID="$WARREN_PID"
        URL="amqp://guest:guest@127.0.0.1:$PORT/%2f"
        MGMT="http://127.0.0.1:$WARREN_MGMT_PORT"
    else
        header "start reference rabbitmq (fresh)"
        "$WARREN_ROOT/scripts/rabbitmq-ref.sh" reset >/dev/null
        REF_STARTED=1
        URL="$("$WARREN_ROOT/scripts/rabbitmq-ref.sh" start)"
        PID="$(ref_rabbitmq_pid)"
        [ -n "$PID" ] || die "the reference RabbitMQ wrote no pid file"
        MGMT="http://${WARREN_REF_BIND:-127.0.0.1}:${WARREN_REF_MGMT_PORT:-15673}"
    fi
}
stop_broker() {
    if [ "$1" = warren ]; then
        stop_warren "$WARREN_PID"
        WARREN_PID=""
    else
        "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop >/dev/null || true
        REF_STARTED=""
    fi
}

# Each measurement on a fresh broker: its memory at rest, then with the load held.
declare -A RES
for broker in "${BROKERS[@]}"; do
    for what in connections queues; do
        start_broker "$broker" "$what"
        read -r "RES[$broker,$what,rss0]" "RES[$broker,$what,mem0]" < <(sample "$PID" "$MGMT")
        header "$broker: $what"
        if [ "$what" = connections ]; then n="$CONNS"; else n="$QUEUES"; fi
        hold "$what" "$URL" "$n"
        read -r "RES[$broker,$what,rss1]" "RES[$broker,$what,mem1]" < <(sample "$PID" "$MGMT")
        release
        stop_broker "$broker"
    done
done

per() { awk -v a="$1" -v b="$2" -v n="$3" -v k="$4" 'BEGIN { printf "%.1f", (b - a) * k / n }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
report="$OUT/results.md"
{
    echo "# Memory per connection and per queue, $STAMP"
    echo
    echo "- command: \`MEM_CONNECTIONS=$CONNS MEM_QUEUES=$QUEUES${ONLY:+ BENCH_ONLY=$ONLY} scripts/bench-memory.sh\`"
    echo "- load: $CONNS idle AMQP connections with a channel each, and $QUEUES transient classic queues, each on a fresh broker; RSS of the process and the broker's own \`mem_used\` (/api/nodes), 3 s after each step"
    echo "- reference: RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?') (Debian)"
    echo "- host: $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg); git $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
    echo
    echo "| broker | RSS at rest (MiB) | RSS with $CONNS connections (MiB) | per connection (KiB, RSS) | per connection (KiB, mem_used) | RSS with $QUEUES queues (MiB) | per queue (KiB, RSS) | per queue (KiB, mem_used) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    for b in "${BROKERS[@]}"; do
        c=connections q=queues
        echo "| $b | $(mib "${RES[$b,$c,rss0]}") | $(mib "${RES[$b,$c,rss1]}") | $(per "${RES[$b,$c,rss0]}" "${RES[$b,$c,rss1]}" "$CONNS" 1) | $(per "${RES[$b,$c,mem0]}" "${RES[$b,$c,mem1]}" "$CONNS" 0.0009765625) | $(mib "${RES[$b,$q,rss1]}") | $(per "${RES[$b,$q,rss0]}" "${RES[$b,$q,rss1]}" "$QUEUES" 1) | $(per "${RES[$b,$q,mem0]}" "${RES[$b,$q,mem1]}" "$QUEUES" 0.0009765625) |"
    done
} >"$report"
header "results ($report)"
cat "$report"
