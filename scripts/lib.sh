# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this
# Shared helpers for scripts/*.sh. Source it; it does not run anything.

# Repository root (scripts/..), absolute.
WARREN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Cache outside the checkout (PerfTest, CI target dir).
WARREN_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/warren"
# PerfTest: latest 2.x on Maven Central. Maven Central carries only the thin
# jar (the uber jar is published on GitHub releases only), so deps.sh fetches
# the thin jar plus its runtime dependencies into lib/ and writes a launcher
# jar whose manifest has Main-Class and Class-Path; `java -jar` runs it.
PERFTEST_VERSION="${PERFTEST_VERSION:-2.22.1}"
PERFTEST_DIR="$WARREN_CACHE/perf-test-$PERFTEST_VERSION"
PERFTEST_JAR="$PERFTEST_DIR/perf-test-$PERFTEST_VERSION-with-dependencies.jar"

# Python venv with pika/pytest (gitignored).
WARREN_VENV="$WARREN_ROOT/.deps/venv"

header() {
    printf '\n\033[1m==== %s ====\033[0m\n' "$*"
}

die() {
    printf '\033[31mERROR: %s\033[0m\n' "$*" >&2
    exit 1
}

# Print a TCP port that is free on 127.0.0.1 right now.
# A free loopback port for a process started later: from tests/freeport.py (below the kernel's
# ephemeral range, so neither the next free_port nor an outgoing connection takes it first).
# Ports handed out are remembered in a file per calling script (named by its pid, removed
# once that process is gone), so one script never gets the same port twice.
free_port() {
    local dir="${TMPDIR:-/tmp}/warren-ports"
    mkdir -p "$dir"
    python3 - "$dir/$$" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests" <<'PY'
import os
import sys
sys.path.insert(0, sys.argv[2])
import freeport
d = os.path.dirname(sys.argv[1])
for name in os.listdir(d):
    if name.isdigit() and not os.path.exists("/proc/" + name):
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass
try:
    with open(sys.argv[1]) as f:
        freeport._given.update(int(line) for line in f if line.strip())
except FileNotFoundError:
    pass
port = freeport.free_port()
with open(sys.argv[1], "a") as f:
    f.write("%d\n" % port)
print(port)
PY
}

# true if something accepts TCP connections on 127.0.0.1:$1
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Absolute path of the cargo target dir (honours CARGO_TARGET_DIR, relative
# values are relative to the repository root where cargo runs).
cargo_target_dir() {
    local d="${CARGO_TARGET_DIR:-target}"
    case "$d" in
    /*) echo "$d" ;;
    *) echo "$WARREN_ROOT/$d" ;;
    esac
}

# start_warren BINARY PORT DATA_DIR LOG_FILE
# (flags in the array WARREN_EXTRA_ARGS, if set, are passed on)
# Starts the broker in the background, sets WARREN_PID, waits until the AMQP
# port accepts connections (30 s), fails loudly (with the log) otherwise.
# The management and Prometheus listeners (default 0.0.0.0:15672/15692) get
# free loopback ports too, so several brokers never collide; they are put in
# WARREN_MGMT_PORT / WARREN_PROM_PORT (empty if the binary lacks the flags).
start_warren() {
    local bin="$1" port="$2" data="$3" logf="$4"
    [ -x "$bin" ] || die "Warren binary not found at $bin (did cargo build succeed? CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-<unset>})"
    mkdir -p "$data"
    local extra=() help
    help="$("$bin" --help 2>&1 || true)"
    WARREN_MGMT_PORT=""
    WARREN_PROM_PORT=""
    if [[ "$help" == *--management-listen* ]]; then
        WARREN_MGMT_PORT="$(free_port)"
        extra+=(--management-listen "127.0.0.1:$WARREN_MGMT_PORT")
    fi
    if [[ "$help" == *--prometheus-listen* ]]; then
        WARREN_PROM_PORT="$(free_port)"
        extra+=(--prometheus-listen "127.0.0.1:$WARREN_PROM_PORT")
    fi
    # Extra flags for this broker (e.g. the AMQPS listener), from the caller's array.
    extra+=("${WARREN_EXTRA_ARGS[@]+"${WARREN_EXTRA_ARGS[@]}"}")
    # A WARREN_CONFIG/WARREN_* in the caller's environment must not redirect
    # the test broker (clap reads them as flag defaults). NO_COLOR: plain log files.
    env -u WARREN_CONFIG -u WARREN_DATA_DIR -u WARREN_AMQP_LISTEN NO_COLOR=1 \
        "$bin" --amqp-listen "127.0.0.1:$port" --data-dir "$data" "${extra[@]}" \
        --log-level info >"$logf" 2>&1 &
    WARREN_PID=$!
    local i
    for i in $(seq 1 300); do
        if ! kill -0 "$WARREN_PID" 2>/dev/null; then
            echo "---- warren log ($logf) ----" >&2
            tail -n 50 "$logf" >&2 || true
            die "warren-broker exited during startup"
        fi
        if port_open "$port"; then
            echo "warren-broker pid $WARREN_PID listening on 127.0.0.1:$port (data $data, log $logf)"
            return 0
        fi
        sleep 0.1
    done
    tail -n 50 "$logf" >&2 || true
    die "warren-broker did not listen on 127.0.0.1:$port within 30 s"
}

# stop_warren PID: SIGTERM, then SIGKILL after 10 s.
stop_warren() {
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# The reference RabbitMQ's Erlang VM pid (scripts/rabbitmq-ref.sh writes it), or nothing.
ref_rabbitmq_pid() {
    cat "${WARREN_REF_DIR:-${TMPDIR:-/tmp}/warren-rabbitmq-ref}/rabbitmq.pid" 2>/dev/null || true
}
