#!/usr/bin/env bash
# Where Warren's time goes on the hot path: a CPU flamegraph and counts per message.
#
#   scripts/profile.sh                      # 16 B transient, 1 producer / 1 consumer
#   PROFILE_SIZE=1024 scripts/profile.sh    # message size
#   PROFILE_SECONDS=20 scripts/profile.sh   # PerfTest duration (recording: the middle half)
#   PROFILE_MODE=persistent scripts/profile.sh  # durable queue, persistent, confirms
#   PROFILE_BIN=/path/to/warren-broker scripts/profile.sh   # that binary, no build
#   scripts/profile.sh --publish            # also copy the results to
#                                           # docs/bench/profile-<mode>-<size>/ (README)
#
# Builds the release broker (it carries debug info), starts it on a free port, runs RabbitMQ
# PerfTest flat out (as scripts/bench.sh does) and, over the middle half of the run:
#   * `perf record --call-graph dwarf` of the broker -> a flamegraph (inferno) and the top
#     functions by self time;
#   * `perf stat` of the broker: syscalls, context switches, CPU time;
#   * the broker's own counters (Prometheus: messages published and delivered) over the same
#     window, to divide by.
# Writes bench-results/profile-<stamp>/ (flamegraph.svg, top.txt, summary.md) and prints the
# summary: syscalls, context switches and CPU microseconds per message.
# Needs perf (Debian's linux-perf, installed if missing) and inferno (cargo install into
# ~/.cache/warren/tools if missing); runs as root (perf's tracepoints).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

SECONDS_RUN="${PROFILE_SECONDS:-20}"
SIZE="${PROFILE_SIZE:-16}"
MODE="${PROFILE_MODE:-transient}"
case "$MODE" in transient | persistent) ;; *) die "PROFILE_MODE must be transient or persistent" ;; esac
[ "$SECONDS_RUN" -ge 8 ] || die "PROFILE_SECONDS must be at least 8"
TOOLS="$WARREN_CACHE/tools"
PUBLISH=""
for arg in "$@"; do
    case "$arg" in
        --publish) PUBLISH=1 ;;
        *) die "usage: scripts/profile.sh [--publish]  (settings are PROFILE_* variables)" ;;
    esac
done
say() { printf '[profile] %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

header "dependencies"
"$WARREN_ROOT/scripts/deps.sh" perftest
if ! command -v perf >/dev/null 2>&1; then
    say "installing linux-perf (apt)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf
fi
if [ ! -x "$TOOLS/bin/inferno-flamegraph" ]; then
    say "cargo install inferno into $TOOLS"
    CARGO_TARGET_DIR="$WARREN_CACHE/tools-target" cargo install --locked --root "$TOOLS" inferno
fi

if [ -n "${PROFILE_BIN:-}" ]; then
    BIN="$PROFILE_BIN" # another build, for an A/B comparison
else
    header "cargo build --release -p warren-broker"
    cargo build --release -p warren-broker
    BIN="$(cargo_target_dir)/release/warren-broker"
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$WARREN_ROOT/bench-results/profile-$STAMP"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-profile.XXXXXX")"
WARREN_PID=""
cleanup() {
    local rc=$?
    [ -n "$WARREN_PID" ] && stop_warren "$WARREN_PID"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$(free_port)"
header "start warren on 127.0.0.1:$PORT"
start_warren "$BIN" "$PORT" "$WORK/data" "$OUT/warren.log"
[ -n "$WARREN_PROM_PORT" ] || die "the broker has no Prometheus listener to count messages with"

# Published + delivered (both kinds) so far, from the broker's aggregated counters.
messages() {
    curl -fsS "http://127.0.0.1:$WARREN_PROM_PORT/metrics" | awk '
        $1 == "rabbitmq_channel_messages_published_total" { p = $2 }
        $1 == "rabbitmq_channel_messages_delivered_total" || $1 == "rabbitmq_channel_messages_delivered_ack_total" { d += $2 }
        END { printf "%.0f %.0f\n", p, d }'
}

args=(-h "amqp://guest:guest@127.0.0.1:$PORT/%2f" -x 1 -y 1 -s "$SIZE" -z "$SECONDS_RUN")
if [ "$MODE" = persistent ]; then
    args+=(-f persistent -c 100 -q 200 -A 100 -u "profile-$SIZE" --auto-delete false)
else
    args+=(-a)
fi
header "PerfTest ${args[*]}"
java -jar "$PERFTEST_JAR" "${args[@]}" >"$OUT/perftest.txt" 2>&1 &
PT=$!
WINDOW=$((SECONDS_RUN / 2))
sleep $((SECONDS_RUN / 4))
read -r pub0 del0 < <(messages)
# Syscalls, context switches and CPU time; and the call graphs (dwarf: the release build
# keeps no frame pointers), for the same window.
perf stat -x, -o "$OUT/stat.csv" -e raw_syscalls:sys_enter,context-switches,task-clock \
    -p "$WARREN_PID" -- sleep "$WINDOW" &
STAT=$!
# PerfTest's own CPU time (the load generator shares the cores).
perf stat -x, -o "$OUT/stat-perftest.csv" -e task-clock -p "$PT" -- sleep "$WINDOW" &
STAT_PT=$!
perf record -q -F 249 --call-graph dwarf,16384 -p "$WARREN_PID" -o "$WORK/perf.data" \
    -- sleep "$WINDOW" 2>"$OUT/perf-record.log"
wait "$STAT" "$STAT_PT"
read -r pub1 del1 < <(messages)
wait "$PT" || die "PerfTest failed; see $OUT/perftest.txt"

header "flamegraph"
perf script -i "$WORK/perf.data" 2>/dev/null | "$TOOLS/bin/inferno-collapse-perf" >"$WORK/folded"
"$TOOLS/bin/inferno-flamegraph" --title "warren-broker, PerfTest 1p1c $MODE ${SIZE} B ($(git rev-parse --short HEAD))" \
    <"$WORK/folded" >"$OUT/flamegraph.svg"
perf report -i "$WORK/perf.data" --no-children -g none --sort sym --percent-limit 0.7 \
    --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40 >"$OUT/top.txt"

stat_of() { awk -F, -v e="$1" '$3 == e { print $1 }' "${2:-$OUT/stat.csv}"; }
syscalls="$(stat_of raw_syscalls:sys_enter)"
switches="$(stat_of context-switches)"
cpu_ms="$(stat_of task-clock)"
pt_cpu_ms="$(stat_of task-clock "$OUT/stat-perftest.csv")"
published=$((pub1 - pub0))
delivered=$((del1 - del0))
[ "$published" -gt 0 ] || die "no message was published during the window"
per() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
{
    echo "# Warren profile, $STAMP"
    echo
    echo "- command: \`PROFILE_MODE=$MODE PROFILE_SIZE=$SIZE PROFILE_SECONDS=$SECONDS_RUN scripts/profile.sh\`"
    echo "- load: PerfTest 1 producer / 1 consumer, $MODE, ${SIZE} B, flat out; measured over ${WINDOW} s in the middle of the run"
    echo "- host: $(nproc) cores, $(uname -sr), load average $(cut -d' ' -f1-3 /proc/loadavg); git $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
    echo
    echo "| in the window | total | per message published |"
    echo "|---|---:|---:|"
    echo "| messages published / delivered | $published / $delivered | |"
    echo "| syscalls | $syscalls | $(per "$syscalls" "$published") |"
    echo "| context switches | $switches | $(per "$switches" "$published") |"
    echo "| broker CPU (cores busy: $(awk -v m="$cpu_ms" -v w="$WINDOW" 'BEGIN { printf "%.2f", m / 1000 / w }')) | |  |"
    echo "| PerfTest CPU (cores busy: $(awk -v m="$pt_cpu_ms" -v w="$WINDOW" 'BEGIN { printf "%.2f", m / 1000 / w }')) | | |"
    echo "| broker CPU (µs) | $(awk -v m="$cpu_ms" 'BEGIN { printf "%.0f", m * 1000 }') | $(per "$(awk -v m="$cpu_ms" 'BEGIN { print m * 1000 }')" "$published") |"
    echo
    echo "Top functions by self time (\`perf report --no-children\`): top.txt; call graphs: flamegraph.svg"
} >"$OUT/summary.md"
header "summary ($OUT)"
cat "$OUT/summary.md"
echo
head -n 20 "$OUT/top.txt"
if [ -n "$PUBLISH" ]; then
    dest="$WARREN_ROOT/docs/bench/profile-$MODE-$SIZE"
    mkdir -p "$dest"
    cp "$OUT/flamegraph.svg" "$OUT/top.txt" "$OUT/summary.md" "$dest/"
    echo "published to $dest"
fi
