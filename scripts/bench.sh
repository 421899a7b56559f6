#!/usr/bin/env bash
# Throughput/latency benchmark: Warren beside RabbitMQ, in the same run.
#
# How to run (from anywhere in the checkout):
#
#   scripts/bench.sh                       # 30 s per case, both brokers
#   BENCH_SECONDS=10 scripts/bench.sh      # shorter cases
#   BENCH_ONLY=rabbitmq scripts/bench.sh   # only one side (warren | rabbitmq)
#   BENCH_SIZES="16 1024 4096" scripts/bench.sh
#   BENCH_RATE=5000 scripts/bench.sh       # fixed publish rate (msg/s) instead of
#                                          # flat out; latency at a known load
#   BENCH_MODE=persistent scripts/bench.sh # durable queue, persistent messages,
#                                          # confirms (-c 100), manual acks
#                                          # (-q 200 -A 100); reports confirm
#                                          # latency and Warren's records per fsync
#   BENCH_MODE=replicated scripts/bench.sh # 3-node Warren cluster vs 3-node RabbitMQ
#                                          # cluster (scripts/rabbitmq-cluster.sh),
#                                          # replicated (quorum) queue with 3 replicas,
#                                          # persistent + confirms as above, 1 KiB by
#                                          # default; producer and consumer on node 1
#   BENCH_SCENARIO=10q scripts/bench.sh    # 10 producers / 10 consumers / 10 queues
#   BENCH_SCENARIO=100q scripts/bench.sh   # 100 queues x 1p1c at a fixed total rate
#                                          # (BENCH_RATE, default 10000 msg/s, shared)
#   BENCH_SCENARIO=fanout scripts/bench.sh # 1 producer -> fanout -> 10 consumers
#                                          # (default 1p1c; every case also reports the
#                                          # broker's peak RSS, sampled each second)
#   scripts/bench.sh --report              # also charts (throughput, latency
#                                          # percentiles, per-second rate; PNG and
#                                          # SVG, matplotlib) and report.md in the
#                                          # run's directory, copied to
#                                          # docs/bench/<mode>/ for the README
#   python scripts/bench_report.py bench-results/<stamp>   # charts for a past run
#
# What it does: installs deps (scripts/deps.sh rabbitmq perftest), builds
# `cargo build --release -p warren-broker`, starts Warren on a free port with a
# temp data dir, starts the reference RabbitMQ (scripts/rabbitmq-ref.sh, port
# 5673), then for each message size runs RabbitMQ PerfTest against each broker
# one after the other:
#
#   1 producer, 1 consumer, consumer autoack, transient (non-persistent)
#   messages, server-named exclusive queue, BENCH_SECONDS per case,
#   consumer latency measured by PerfTest (timestamp in the message body).
#
# From PerfTest's summary it takes "receiving rate avg" (msg/s) and the consumer
# latency percentiles, prints a markdown table with Warren/RabbitMQ ratios, and
# saves it with the raw PerfTest output to bench-results/<timestamp>/.
# Producer and consumer run flat out unless BENCH_RATE is set, so latency is
# latency under saturation (queueing included). Broker, PerfTest and the build
# share this machine's cores: compare the ratios, not the absolute numbers.
# The reference RabbitMQ is left as it was found (stopped if bench started it).
set -euo pipefail

REPORT=""
for arg in "$@"; do
    case "$arg" in
        --report) REPORT=1 ;;
        *) echo "usage: scripts/bench.sh [--report]  (settings are BENCH_* variables; see the top of this file)" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

SECONDS_PER_CASE="${BENCH_SECONDS:-30}"
MODE="${BENCH_MODE:-transient}"
if [ "$MODE" = replicated ]; then
    SIZES="${BENCH_SIZES:-1024}"
else
    SIZES="${BENCH_SIZES:-16 1024}"
fi
ONLY="${BENCH_ONLY:-}"
RATE="${BENCH_RATE:-}"
SCENARIO="${BENCH_SCENARIO:-1p1c}"
case "$SCENARIO" in 1p1c | 10q | 100q | fanout) ;; *) die "BENCH_SCENARIO must be 1p1c, 10q, 100q or fanout" ;; esac
case "$MODE" in transient | persistent | replicated) ;; *) die "BENCH_MODE must be transient, persistent or replicated" ;; esac
case "$ONLY" in "" | warren | rabbitmq) ;; *) die "BENCH_ONLY must be warren or rabbitmq" ;; esac
[ "$MODE" != replicated ] || [ "$SCENARIO" = 1p1c ] || die "BENCH_MODE=replicated runs BENCH_SCENARIO=1p1c only"
BROKERS=()
[ "$ONLY" = rabbitmq ] || BROKERS+=(warren)
[ "$ONLY" = warren ] || BROKERS+=(rabbitmq)

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
# The machine's load before the run (benchmarks share it with whatever else runs).
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
OUT="$WARREN_ROOT/bench-results/$STAMP"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-bench.XXXXXX")"
WARREN_PID=""
REF_STARTED=""
CLUSTER_PIDS=()
RSS_SAMPLER=""

# The pid whose memory is sampled for a broker: Warren's (node 1 of a cluster), or the
# reference RabbitMQ's Erlang VM (single node only).
broker_pid() {
    if [ "$1" = warren ]; then
        echo "${WARREN_PID:-${CLUSTER_PIDS[0]:-}}"
    elif [ "$MODE" != replicated ]; then
        ref_rabbitmq_pid
    fi
}

cleanup() {
    local rc=$?
    [ -z "$RSS_SAMPLER" ] || kill "$RSS_SAMPLER" 2>/dev/null || true
    [ -n "$WARREN_PID" ] && stop_warren "$WARREN_PID"
    local p
    for p in "${CLUSTER_PIDS[@]+"${CLUSTER_PIDS[@]}"}"; do stop_warren "$p"; done
    if [ -n "$REF_STARTED" ]; then
        if [ "$MODE" = replicated ]; then
            "$WARREN_ROOT/scripts/rabbitmq-cluster.sh" stop || true
        else
            "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop || true
        fi
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

header "dependencies"
if [ -n "$REPORT" ]; then
    # The charts need matplotlib in .deps/venv (tests/bench/requirements.txt).
    "$WARREN_ROOT/scripts/deps.sh" rabbitmq perftest python
else
    "$WARREN_ROOT/scripts/deps.sh" rabbitmq perftest
fi

declare -A URL
if [[ " ${BROKERS[*]} " == *" warren "* ]]; then
    header "cargo build --release -p warren-broker"
    cargo build --release -p warren-broker
    BIN="$(cargo_target_dir)/release/warren-broker"
    if [ "$MODE" = replicated ]; then
        # Three nodes on this host (ports, not namespaces), each with its own data dir.
        header "start a 3-node warren cluster"
        head -c 32 /dev/urandom | base64 >"$WORK/cluster-secret"
        AMQP_PORTS=() MGMT_PORTS=() CLUSTER_PORTS=()
        for n in 1 2 3; do
            AMQP_PORTS+=("$(free_port)") MGMT_PORTS+=("$(free_port)") CLUSTER_PORTS+=("$(free_port)")
        done
        PEERS="127.0.0.1:${CLUSTER_PORTS[0]},127.0.0.1:${CLUSTER_PORTS[1]},127.0.0.1:${CLUSTER_PORTS[2]}"
        for n in 0 1 2; do
            mkdir -p "$WORK/warren-data$n"
            env -u WARREN_CONFIG -u WARREN_DATA_DIR -u WARREN_AMQP_LISTEN NO_COLOR=1 \
                "$BIN" --node-name "warren$((n + 1))@localhost" \
                --amqp-listen "127.0.0.1:${AMQP_PORTS[$n]}" \
                --management-listen "127.0.0.1:${MGMT_PORTS[$n]}" --prometheus-listen none \
                --cluster-listen "127.0.0.1:${CLUSTER_PORTS[$n]}" \
                --cluster-advertise "127.0.0.1:${CLUSTER_PORTS[$n]}" \
                --cluster-peers "$PEERS" --cluster-secret-file "$WORK/cluster-secret" \
                --data-dir "$WORK/warren-data$n" --default-user guest --default-pass guest \
                --log-level info >"$OUT/warren$((n + 1)).log" 2>&1 &
            CLUSTER_PIDS+=("$!")
        done
        for n in 0 1 2; do
            ok=""
            for _ in $(seq 1 120); do
                if curl -fsS -u guest:guest "http://127.0.0.1:${MGMT_PORTS[$n]}/api/health/checks/virtual-hosts" >/dev/null 2>&1; then
                    ok=1
                    break
                fi
                sleep 0.5
            done
            [ -n "$ok" ] || die "warren node $((n + 1)) not ready in 60 s; see $OUT/warren$((n + 1)).log"
        done
        URL[warren]="amqp://guest:guest@127.0.0.1:${AMQP_PORTS[0]}/%2f"
    else
        PORT="$(free_port)"
        header "start warren on 127.0.0.1:$PORT"
        start_warren "$BIN" "$PORT" "$WORK/warren-data" "$OUT/warren.log"
        URL[warren]="amqp://guest:guest@127.0.0.1:$PORT/%2f"
    fi
fi
if [[ " ${BROKERS[*]} " == *" rabbitmq "* ]] && [ "$MODE" = replicated ]; then
    header "start the 3-node reference rabbitmq cluster"
    if ! "$WARREN_ROOT/scripts/rabbitmq-cluster.sh" status >/dev/null 2>&1; then
        REF_STARTED=1
    fi
    "$WARREN_ROOT/scripts/rabbitmq-cluster.sh" start
    URL[rabbitmq]="$("$WARREN_ROOT/scripts/rabbitmq-cluster.sh" urls | awk '$1 == 1 {print $3}')"
elif [[ " ${BROKERS[*]} " == *" rabbitmq "* ]]; then
    header "start reference rabbitmq"
    if ! "$WARREN_ROOT/scripts/rabbitmq-ref.sh" status 2>/dev/null; then
        REF_STARTED=1
    fi
    URL[rabbitmq]="$("$WARREN_ROOT/scripts/rabbitmq-ref.sh" start)"
fi

java -jar "$PERFTEST_JAR" --version 2>/dev/null | head -n1 | sed 's/\x1b\[[0-9;]*m//g' >"$OUT/perftest-version.txt"
PT_VERSION="$(cat "$OUT/perftest-version.txt")"

# results: RES[broker,size,field]
declare -A RES
for size in $SIZES; do
    for broker in "${BROKERS[@]}"; do
        header "PerfTest: $broker, ${size} B, ${SECONDS_PER_CASE} s"
        log="$OUT/perftest-$broker-$size.txt"
        args=(-h "${URL[$broker]}" -s "$size" -z "$SECONDS_PER_CASE"
            -o "$OUT/perftest-$broker-$size.csv")
        # The queue(s): one named queue (1p1c), a pattern of queues with a producer and a
        # consumer each, or a fanout exchange with a server-named queue per consumer.
        case "$SCENARIO" in
            1p1c)
                args+=(-x 1 -y 1)
                [ "$MODE" = transient ] || args+=(-u "bench-$MODE-$size")
                ;;
            10q | 100q)
                n="${SCENARIO%q}"
                args+=(-x "$n" -y "$n" --queue-pattern "bench-$MODE-$size-%d"
                    --queue-pattern-from 1 --queue-pattern-to "$n")
                ;;
            fanout) args+=(-x 1 -y 10 -t fanout -e "bench-fanout-$size") ;;
        esac
        if [ "$MODE" = persistent ]; then
            # PerfTest declares named queues durable (kept: each run has fresh brokers).
            args+=(-f persistent -c 100 -q 200 -A 100 --auto-delete false)
        elif [ "$MODE" = replicated ]; then
            # A quorum queue: 3 replicas on both sides (every node of the 3-node cluster).
            args+=(-f persistent -c 100 -q 200 -A 100 --auto-delete false -qa x-queue-type=quorum)
        else
            args+=(-a)
        fi
        if [ "$SCENARIO" = 100q ]; then
            # A fixed total rate, shared by the 100 producers.
            args+=(-r "$(( ${RATE:-10000} / 100 ))")
        elif [ -n "$RATE" ]; then
            args+=(-r "$RATE")
        fi
        # The broker's resident memory, once a second while PerfTest runs.
        rss_pid="$(broker_pid "$broker")"
        rss_file="$OUT/rss-$broker-$size.txt"
        : >"$rss_file"
        if [ -n "$rss_pid" ]; then
            (while kill -0 "$rss_pid" 2>/dev/null; do
                ps -o rss= -p "$rss_pid" >>"$rss_file" 2>/dev/null || true
                sleep 1
            done) &
            RSS_SAMPLER=$!
        fi
        echo "java -jar $PERFTEST_JAR ${args[*]}" | tee "$log"
        # PerfTest stops itself after -z seconds; the timeout is a backstop.
        if ! timeout "$((SECONDS_PER_CASE + 60))" java -jar "$PERFTEST_JAR" "${args[@]}" 2>&1 |
            sed 's/\x1b\[[0-9;]*m//g' | tee -a "$log" | grep -E 'time [0-9.]+ s|rate avg|latency min'; then
            die "PerfTest against $broker (size $size) failed; see $log"
        fi
        [ -n "$RSS_SAMPLER" ] && kill "$RSS_SAMPLER" 2>/dev/null && wait "$RSS_SAMPLER" 2>/dev/null || true
        RSS_SAMPLER=""
        # Summary lines (PerfTest 2.x):
        #   id: X, receiving rate avg: 12847 msg/s
        #   id: X, consumer latency min/median/75th/95th/99th 1784/146237/396403/740283/845222 µs
        recv="$(grep -oE 'receiving rate avg: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+$' || true)"
        sent="$(grep -oE 'sending rate avg: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+$' || true)"
        if [ "$MODE" != transient ]; then
            lat="$(grep -oE 'confirm latency min/median/75th/95th/99th [0-9/]+ [µm]s' "$log" | tail -n1 || true)"
        else
            lat="$(grep -oE 'consumer latency min/median/75th/95th/99th [0-9/]+ [µm]s' "$log" | tail -n1 || true)"
        fi
        [ -n "$recv" ] && [ -n "$lat" ] || die "could not parse PerfTest summary in $log"
        unit="$(echo "$lat" | awk '{print $NF}')"
        nums="$(echo "$lat" | awk '{print $(NF-1)}')"
        p50="$(echo "$nums" | cut -d/ -f2)"
        p99="$(echo "$nums" | cut -d/ -f5)"
        if [ "$unit" = ms ]; then p50=$((p50 * 1000)); p99=$((p99 * 1000)); fi
        RES[$broker,$size,recv]="$recv"
        RES[$broker,$size,sent]="${sent:-?}"
        RES[$broker,$size,p50]="$p50" # microseconds
        RES[$broker,$size,p99]="$p99" # microseconds
        RES[$broker,$size,rss]="$(sort -n "$rss_file" | tail -n1 | awk '{ if ($1 > 0) printf "%.0f", $1 / 1024; else print "?" }')"
        [ -n "${RES[$broker,$size,rss]}" ] || RES[$broker,$size,rss]="?"
        # Let the broker drain and settle between cases.
        sleep 2
    done
done

fmt_us() { # microseconds -> human
    awk -v u="$1" 'BEGIN { if (u >= 1000000) printf "%.2f s", u/1e6; else if (u >= 1000) printf "%.1f ms", u/1e3; else printf "%d µs", u }'
}
ratio() { # a/b with 2 decimals, or n/a
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a/b; else print "n/a" }'
}

report="$OUT/results.md"
COMMAND="BENCH_MODE=$MODE BENCH_SECONDS=$SECONDS_PER_CASE BENCH_SIZES=\"$SIZES\"${ONLY:+ BENCH_ONLY=$ONLY}${RATE:+ BENCH_RATE=$RATE}"
[ "$SCENARIO" = 1p1c ] || COMMAND+=" BENCH_SCENARIO=$SCENARIO"
COMMAND+=" scripts/bench.sh"
case "$SCENARIO" in
    1p1c) SHAPE="1 producer / 1 consumer, one queue" ;;
    10q) SHAPE="10 producers / 10 consumers over 10 queues (a producer and a consumer per queue)" ;;
    100q) SHAPE="100 queues with a producer and a consumer each, at a fixed total rate" ;;
    fanout) SHAPE="1 producer to a fanout exchange with 10 consumers, a queue each (receive rate counts every copy)" ;;
esac
if [ "$SCENARIO" = 100q ]; then
    RATE_TEXT="${RATE:-10000} msg/s in total"
else
    RATE_TEXT="${RATE:-unlimited}${RATE:+ msg/s per producer}"
fi
{
    echo "# Warren vs RabbitMQ — PerfTest, $STAMP"
    echo
    echo "- command: \`$COMMAND\`"
    if [ "$MODE" = replicated ]; then
        echo "- load: PerfTest 1 producer / 1 consumer on node 1 of a 3-node cluster, replicated queue (\`x-queue-type: quorum\`, 3 replicas), persistent messages, confirms (-c 100), manual acks (-q 200 -A 100), ${SECONDS_PER_CASE} s per case; latency columns are **confirm** latency"
    elif [ "$MODE" = persistent ]; then
        echo "- load: PerfTest $SHAPE, durable queues, persistent messages, confirms (-c 100), manual acks (-q 200 -A 100), ${SECONDS_PER_CASE} s per case; latency columns are **confirm** latency"
        totals="$(grep -a 'message store totals' "$OUT/warren.log" 2>/dev/null | tail -n1 || true)"
        if [ -n "$totals" ]; then
            rec="$(echo "$totals" | grep -oE 'records=[0-9]+' | cut -d= -f2)"
            fs="$(echo "$totals" | grep -oE 'fsyncs=[0-9]+' | cut -d= -f2)"
            by="$(echo "$totals" | grep -oE 'bytes=[0-9]+' | cut -d= -f2)"
            echo "- Warren message store over the whole run: $rec records in $fs fsyncs ($(ratio "$rec" "$fs") records per fsync; a message is one enqueue and one remove record), $by bytes written ($(ratio "$by" "$((rec / 2))") bytes per message)"
        fi
    else
        echo "- load: PerfTest $SHAPE, autoack, transient messages, ${SECONDS_PER_CASE} s per case, publish rate $RATE_TEXT"
    fi
    echo "- tool: $PT_VERSION; reference: RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?') (Debian)"
    echo "- host: $(nproc) cores, $(uname -sr), load average $LOAD_BEFORE before the run; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo
    echo "| broker | size (B) | send rate (msg/s) | receive rate (msg/s) | p50 latency | p99 latency | peak RSS (MiB) |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for size in $SIZES; do
        for broker in "${BROKERS[@]}"; do
            echo "| $broker | $size | ${RES[$broker,$size,sent]} | ${RES[$broker,$size,recv]} | $(fmt_us "${RES[$broker,$size,p50]}") | $(fmt_us "${RES[$broker,$size,p99]}") | ${RES[$broker,$size,rss]} |"
        done
    done
    if [ ${#BROKERS[@]} = 2 ]; then
        echo
        echo "| size (B) | receive rate Warren/RabbitMQ (higher is better) | p99 latency Warren/RabbitMQ (lower is better) |"
        echo "|---:|---:|---:|"
        for size in $SIZES; do
            echo "| $size | $(ratio "${RES[warren,$size,recv]}" "${RES[rabbitmq,$size,recv]}") | $(ratio "${RES[warren,$size,p99]}" "${RES[rabbitmq,$size,p99]}") |"
        done
    fi
} >"$report"

header "results ($report)"
cat "$report"

# What the report tool needs to label its charts (scripts/bench_report.py).
BENCH_COMMAND="$COMMAND" \
    BENCH_LOAD="$(grep -m1 '^- load: ' "$report" | sed 's/^- load: //')" \
    BENCH_TOOL="$PT_VERSION" \
    BENCH_REFERENCE="RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?') (Debian)" \
    BENCH_HOST="$(nproc) cores, $(uname -sr), load average $LOAD_BEFORE before the run" \
    BENCH_GIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')" \
    BENCH_STAMP="$STAMP" BENCH_MODE_NAME="$MODE" BENCH_SCENARIO_NAME="$SCENARIO" \
    python3 -c 'import json, os; print(json.dumps({k: os.environ["BENCH_" + v] for k, v in [("command", "COMMAND"), ("load", "LOAD"), ("tool", "TOOL"), ("reference", "REFERENCE"), ("host", "HOST"), ("git", "GIT"), ("stamp", "STAMP"), ("mode", "MODE_NAME"), ("scenario", "SCENARIO_NAME")]}, indent=2))' \
    >"$OUT/meta.json"

if [ -n "$REPORT" ]; then
    header "charts (scripts/bench_report.py)"
    "$WARREN_VENV/bin/python" "$WARREN_ROOT/scripts/bench_report.py" "$OUT" --publish "$WARREN_ROOT/docs/bench/$MODE$([ "$SCENARIO" = 1p1c ] || echo "-$SCENARIO")"
fi
