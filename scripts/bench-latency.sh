#!/usr/bin/env bash
# Consumer latency at a fixed publish rate with the least client (broker/examples/latency.rs:
# two blocking sockets speaking AMQP by hand, no client library or JVM), Warren beside
# Debian's RabbitMQ in the same run, rounds alternating between them.
#
#   bash scripts/bench-latency.sh
#   BENCH_RATE=10000 BENCH_SECONDS=15 BENCH_SIZE=1024 BENCH_ROUNDS=3 bash scripts/bench-latency.sh
#   BENCH_MODE=confirm bash scripts/bench-latency.sh   # a durable queue, persistent messages,
#                                                      # publisher confirms: confirm latency too
#   BENCH_MODE=confirm-ack bash scripts/bench-latency.sh   # the same, the consumer acking
#                                                      # (a message is still queued when confirmed)
#
# PerfTest (scripts/bench.sh with BENCH_RATE) measures the same thing through the Java client,
# whose own thread hand-offs and pauses put milliseconds into the tail on this 2-core machine;
# this one shows the brokers' share. Prints one line per round and broker (latencies in µs,
# after a 1 s warm-up) and writes them to bench-results/<stamp>-latency/results.md.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

RATE="${BENCH_RATE:-10000}"
SECS="${BENCH_SECONDS:-15}"
SIZE="${BENCH_SIZE:-1024}"
ROUNDS="${BENCH_ROUNDS:-3}"
MODE="${BENCH_MODE:-transient}"
case "$MODE" in transient | confirm | confirm-ack) ;; *) die "BENCH_MODE is transient, confirm or confirm-ack, not $MODE" ;; esac
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$WARREN_ROOT/bench-results/$STAMP-latency-$MODE"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
WARREN_PID=""
REF_STARTED=""
cleanup() {
    local rc=$?
    [ -n "$WARREN_PID" ] && stop_warren "$WARREN_PID"
    [ -z "$REF_STARTED" ] || "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

header "dependencies"
"$WARREN_ROOT/scripts/deps.sh" rabbitmq
header "cargo build --release -p warren-broker --bin warren-broker --example latency"
cargo build --release -p warren-broker --bin warren-broker --example latency
BIN="$(cargo_target_dir)/release/warren-broker"
PROBE="$(cargo_target_dir)/release/examples/latency"
PORT="$(free_port)"
header "start warren on 127.0.0.1:$PORT"
start_warren "$BIN" "$PORT" "$WORK/warren-data" "$OUT/warren.log"
declare -A URL
URL[warren]="amqp://guest:guest@127.0.0.1:$PORT/%2f"
header "start reference rabbitmq"
"$WARREN_ROOT/scripts/rabbitmq-ref.sh" status >/dev/null 2>&1 || REF_STARTED=1
URL[rabbitmq]="$("$WARREN_ROOT/scripts/rabbitmq-ref.sh" start | tail -n1)"

{
    if [ "$MODE" = confirm ]; then
        echo "# Consumer and confirm latency at $RATE msg/s, $SIZE B, persistent, confirms, autoack — $STAMP"
    elif [ "$MODE" = confirm-ack ]; then
        echo "# Consumer and confirm latency at $RATE msg/s, $SIZE B, persistent, confirms, manual acks (prefetch 1000) — $STAMP"
    else
        echo "# Consumer latency at $RATE msg/s, $SIZE B, transient, autoack — $STAMP"
    fi
    echo
    echo "- command: \`BENCH_MODE=$MODE BENCH_RATE=$RATE BENCH_SECONDS=$SECS BENCH_SIZE=$SIZE BENCH_ROUNDS=$ROUNDS scripts/bench-latency.sh\`"
    echo "- client: broker/examples/latency.rs (1 publisher and 1 consumer connection, AMQP by hand)"
    echo "- host: $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg) before the run; git $(git rev-parse --short HEAD)"
    echo
    echo "| round | broker | received (msg/s) | p50 (µs) | p95 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | confirm p50 / p99 / p99.9 (µs) |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
} >"$OUT/results.md"
for round in $(seq 1 "$ROUNDS"); do
    for broker in warren rabbitmq; do
        header "round $round: $broker"
        line="$("$PROBE" "${URL[$broker]}" "$RATE" "$SECS" "$SIZE" "$MODE")"
        echo "$line"
        declare -A f=()
        for kv in $line; do f[${kv%%=*}]="${kv#*=}"; done
        confirm="—"
        [ "$MODE" = transient ] || confirm="${f[c50]} / ${f[c99]} / ${f[c999]}"
        echo "| $round | $broker | ${f[received]} | ${f[p50]} | ${f[p95]} | ${f[p99]} | ${f[p999]} | ${f[max]} | $confirm |" >>"$OUT/results.md"
    done
done
header "results ($OUT/results.md)"
cat "$OUT/results.md"
