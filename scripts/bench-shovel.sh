#!/usr/bin/env bash
# Shovel throughput benchmark: Warren's shovel (Warren → Warren) beside RabbitMQ's shovel
# plugin (RabbitMQ → RabbitMQ), in the same run, each as a fraction of a direct PerfTest run
# against the same broker. Not a timed test.
#
#   scripts/bench-shovel.sh                      # 100000 messages of 1 KiB
#   BENCH_MESSAGES=300000 scripts/bench-shovel.sh
#   BENCH_SIZE=4096 BENCH_SECONDS=20 scripts/bench-shovel.sh
#   BENCH_MODE=persistent scripts/bench-shovel.sh  # persistent messages, durable queues
#
# For each broker kind, two nodes on this machine ("data centres"; for RabbitMQ a second
# private instance of scripts/rabbitmq-ref.sh on other ports):
#
#   1. PerfTest fills queue bench-src on node 1 with BENCH_MESSAGES messages (-C, confirms).
#   2. A dynamic shovel on node 1 moves bench-src to bench-dst on node 2: src-uri amqp://
#      (node 1 itself), dest-uri node 2, ack-mode on-confirm, src-prefetch-count 1000.
#   3. The time from creating the shovel until node 2's bench-dst holds every message
#      (counted exactly, AMQP passive declare every 50 ms) gives the shovel's rate.
#   4. Direct PerfTest against node 1: 1 producer with confirms (-c 1000), 1 consumer with
#      manual acks (-q 1000), same size and mode, BENCH_SECONDS: the receive rate is what one
#      client pair moves through that broker — the baseline the shovel rate is divided by.
#
# Output: a markdown table in bench-results/<timestamp>/shovel.md with both rates, the
# Warren/RabbitMQ ratio and each shovel as a fraction of its broker's direct rate.
# Everything started here is stopped on exit.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

MESSAGES="${BENCH_MESSAGES:-100000}"
SIZE="${BENCH_SIZE:-1024}"
SECONDS_DIRECT="${BENCH_SECONDS:-20}"
MODE="${BENCH_MODE:-transient}"
case "$MODE" in transient | persistent) ;; *) die "BENCH_MODE must be transient or persistent" ;; esac

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$WARREN_ROOT/bench-results/$STAMP"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-bench-shovel.XXXXXX")"
PIDS=()
REF1_STARTED=""
REF2_ENV=(WARREN_REF_DIR="$WORK/ref2" WARREN_REF_NODE="warren-bench2@localhost"
    WARREN_REF_AMQP_PORT=5684 WARREN_REF_MGMT_PORT=15684 WARREN_REF_PROM_PORT=15694
    WARREN_REF_DIST_PORT=25684)

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do stop_warren "$pid"; done
    env "${REF2_ENV[@]}" "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop >/dev/null 2>&1
    if [ -n "$REF1_STARTED" ]; then "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop >/dev/null 2>&1; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

header "dependencies"
"$WARREN_ROOT/scripts/deps.sh" rabbitmq perftest python

header "cargo build --release -p warren-broker"
cargo build --release -p warren-broker
BIN="$(cargo_target_dir)/release/warren-broker"

header "two Warren nodes"
declare -A AMQP MGMT
for n in 1 2; do
    port="$(free_port)"
    start_warren "$BIN" "$port" "$WORK/warren$n" "$OUT/warren$n.log"
    PIDS+=("$WARREN_PID")
    AMQP[warren$n]="amqp://guest:guest@127.0.0.1:$port/%2f"
    MGMT[warren$n]="http://127.0.0.1:$WARREN_MGMT_PORT"
done

header "two RabbitMQ nodes (scripts/rabbitmq-ref.sh)"
if ! "$WARREN_ROOT/scripts/rabbitmq-ref.sh" status 2>/dev/null; then REF1_STARTED=1; fi
AMQP[rabbitmq1]="$("$WARREN_ROOT/scripts/rabbitmq-ref.sh" start)"
MGMT[rabbitmq1]="http://127.0.0.1:${WARREN_REF_MGMT_PORT:-15673}"
AMQP[rabbitmq2]="$(env "${REF2_ENV[@]}" "$WARREN_ROOT/scripts/rabbitmq-ref.sh" start)"
MGMT[rabbitmq2]="http://127.0.0.1:15684"

java -jar "$PERFTEST_JAR" --version 2>/dev/null | head -n1 | sed 's/\x1b\[[0-9;]*m//g' >"$OUT/perftest-version.txt"
FLAGS=()
QFLAGS=(--auto-delete false)
if [ "$MODE" = persistent ]; then FLAGS=(-f persistent); fi

perftest() { # LOG ARGS...: runs PerfTest, output to LOG (colour codes stripped)
    local log="$1"
    shift
    echo "java -jar $PERFTEST_JAR $*" | tee "$log" >&2
    timeout 600 java -jar "$PERFTEST_JAR" "$@" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >>"$log" ||
        die "PerfTest failed; see $log"
}

# shovel_rate KIND: fills kind1, shovels to kind2, prints messages per second.
shovel_rate() {
    local kind="$1" log="$OUT/shovel-$1.txt"
    perftest "$OUT/fill-$kind.txt" -h "${AMQP[${kind}1]}" -x 1 -y 0 -C "$MESSAGES" -s "$SIZE" \
        -c 1000 -u bench-src "${QFLAGS[@]}" "${FLAGS[@]}"
    "$WARREN_VENV/bin/python" - "${AMQP[${kind}1]}" "${AMQP[${kind}2]}" "${MGMT[${kind}1]}" \
        "$MESSAGES" "$MODE" >"$log" <<'EOF'
import base64, json, sys, time, urllib.request
import pika
src_url, dest_url, mgmt, n, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def count(url, q):
    c = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return c.channel().queue_declare(q, passive=True).method.message_count
    finally:
        c.close()
assert count(src_url, "bench-src") == n, "the fill did not put every message in bench-src"
dest = pika.BlockingConnection(pika.URLParameters(dest_url))
ch = dest.channel()
ch.queue_declare("bench-dst", durable=True)
value = {"src-protocol": "amqp091", "src-uri": "amqp://", "src-queue": "bench-src",
         "dest-protocol": "amqp091", "dest-uri": dest_url, "dest-queue": "bench-dst",
         "ack-mode": "on-confirm", "src-prefetch-count": 1000}
req = urllib.request.Request(f"{mgmt}/api/parameters/shovel/%2F/bench", method="PUT",
                             data=json.dumps({"value": value}).encode())
req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
req.add_header("Content-Type", "application/json")
start = time.monotonic()
urllib.request.urlopen(req, timeout=10).read()
first = None
while True:
    got = ch.queue_declare("bench-dst", passive=True).method.message_count
    if got and first is None:
        first = time.monotonic()
    if got >= n:
        break
    if time.monotonic() - start > 600:
        sys.exit(f"the shovel moved {got} of {n} in 600 s")
    time.sleep(0.05)
end = time.monotonic()
req = urllib.request.Request(f"{mgmt}/api/parameters/shovel/%2F/bench", method="DELETE")
req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
urllib.request.urlopen(req, timeout=10).read()
ch.queue_delete("bench-dst")
dest.close()
print(f"moved {n} in {end - start:.2f} s ({end - first:.2f} s after the first arrived)")
print(f"rate {n / (end - start):.0f}")
EOF
    cat "$log" >&2
    grep -oE '^rate [0-9]+' "$log" | grep -oE '[0-9]+$'
}

# direct_rate KIND: direct PerfTest against kind1, prints the receive rate.
direct_rate() {
    local kind="$1" log="$OUT/direct-$1.txt"
    perftest "$log" -h "${AMQP[${kind}1]}" -x 1 -y 1 -s "$SIZE" -c 1000 -q 1000 \
        -z "$SECONDS_DIRECT" -u bench-direct "${QFLAGS[@]}" "${FLAGS[@]}"
    grep -oE 'receiving rate avg: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+$'
}

declare -A SHOVEL DIRECT
for kind in warren rabbitmq; do
    header "$kind: shovel $MESSAGES messages of $SIZE B, node 1 → node 2, on-confirm"
    SHOVEL[$kind]="$(shovel_rate "$kind")"
    header "$kind: direct PerfTest, ${SECONDS_DIRECT} s"
    DIRECT[$kind]="$(direct_rate "$kind")"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "n/a" }'; }
report="$OUT/shovel.md"
{
    echo "# Shovel throughput, Warren vs RabbitMQ — $STAMP"
    echo
    echo "- command: \`BENCH_MESSAGES=$MESSAGES BENCH_SIZE=$SIZE BENCH_SECONDS=$SECONDS_DIRECT BENCH_MODE=$MODE scripts/bench-shovel.sh\`"
    echo "- shovel: $MESSAGES messages of $SIZE B ($MODE) from bench-src on node 1 to bench-dst on node 2, ack-mode on-confirm, prefetch 1000; rate = messages / time from creating the shovel to the last one arriving"
    echo "- direct: PerfTest 1 producer (confirms, -c 1000) and 1 consumer (manual acks, -q 1000) against node 1, ${SECONDS_DIRECT} s"
    echo "- load average when the report was written: $(cut -d' ' -f1-3 /proc/loadavg) (other processes share these cores: compare within a run)"
    echo "- $(cat "$OUT/perftest-version.txt"); RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?') (Debian); $(nproc) cores, $(uname -sr); git $(git rev-parse --short HEAD)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo
    echo "| broker | shovel (msg/s) | direct PerfTest (msg/s) | shovel / direct |"
    echo "|---|---:|---:|---:|"
    for kind in warren rabbitmq; do
        echo "| $kind | ${SHOVEL[$kind]} | ${DIRECT[$kind]} | $(ratio "${SHOVEL[$kind]}" "${DIRECT[$kind]}") |"
    done
    echo
    echo "Warren's shovel / RabbitMQ's shovel: **$(ratio "${SHOVEL[warren]}" "${SHOVEL[rabbitmq]}")** (target ≥ 2)"
} >"$report"
header "results ($report)"
cat "$report"
