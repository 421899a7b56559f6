#!/usr/bin/env bash
# The single test command: every tier except benchmarks.
#
#   scripts/test.sh
#
# 1. scripts/deps.sh (Debian rabbitmq-server, .deps/venv with pika+pytest,
#    npm packages, PerfTest)
#    and tests/bench: the benchmark report tool (scripts/bench_report.py) on kept
#    PerfTest output
# 2. cargo test --workspace
# 3. cargo build -p warren-broker
# 4. Python client suite (pika):  tests/clients/python   against a fresh Warren
#    (which also serves AMQPS with a test PKI from scripts/test-pki.sh)
# 5. Node client suite (amqplib): tests/clients/node     against a fresh Warren
# 6. differential suite: tests/differential/run.py, a fresh Warren vs the
#    reference RabbitMQ (scripts/rabbitmq-ref.sh, wiped before start)
# 7. cluster differential: tests/cluster/differential.py, 3 Warren processes vs a
#    3-node reference RabbitMQ cluster (scripts/rabbitmq-cluster.sh, wiped before start)
# 8. links: tests/links/test_rabbitmq.py (shovels and federation, Warren ↔ RabbitMQ) and
#    tests/links/netns.sh (two namespaces, the link cut with iptables; needs root)
#
# Each Warren runs on a free 127.0.0.1 port with a temp data dir; suites get
# AMQP_URL=amqp://guest:guest@127.0.0.1:PORT/%2f. All brokers are stopped on
# exit. Any failure (including a missing suite) fails the script.
# Honours CARGO_TARGET_DIR (the broker binary is taken from it).
# Set WARREN_KEEP_LOGS=1 to keep broker logs (path printed at the end).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-test.XXXXXX")"
WARREN_PIDS=()
REF_USED=""
RMQ_CLUSTER_USED=""
CURRENT_STEP=""
STEP_START=0
SUMMARY=()

cleanup() {
    local rc=$?
    set +e
    for pid in "${WARREN_PIDS[@]}"; do stop_warren "$pid"; done
    if [ -n "$REF_USED" ]; then
        "$WARREN_ROOT/scripts/rabbitmq-ref.sh" stop
    fi
    if [ -n "$RMQ_CLUSTER_USED" ]; then
        "$WARREN_ROOT/scripts/rabbitmq-cluster.sh" stop
    fi
    if { [ "$rc" != 0 ] || [ -n "${WARREN_KEEP_LOGS:-}" ]; } && [ -n "$(ls -A "$WORK")" ]; then
        echo "broker logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    echo
    for line in "${SUMMARY[@]}"; do echo "$line"; done
    if [ "$rc" = 0 ]; then
        printf '\033[32mALL TESTS PASSED\033[0m\n'
    else
        printf '\033[31mFAILED%s (exit %s)\033[0m\n' "${CURRENT_STEP:+ in step: $CURRENT_STEP}" "$rc"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() {
    if [ -n "$CURRENT_STEP" ]; then
        SUMMARY+=("  ok  $CURRENT_STEP ($((SECONDS - STEP_START)) s)")
    fi
    CURRENT_STEP="$1"
    STEP_START=$SECONDS
    [ -n "$1" ] && header "$1"
    return 0
}

# A suite that is missing is a failure, never a skip.
require_suite() {
    [ -e "$1" ] || die "test suite missing: $1 does not exist (it is part of the README test command; a missing suite is a failure, not a skip)"
}

# Fresh Warren for one suite (the previous suite's broker is stopped first);
# sets URL and exports AMQP_URL, WARREN_URL, and WARREN_MGMT_URL /
# WARREN_PROMETHEUS_URL when the binary has those listeners.
fresh_warren() {
    local name="$1" port pid
    for pid in "${WARREN_PIDS[@]}"; do stop_warren "$pid"; done
    WARREN_PIDS=()
    port="$(free_port)"
    start_warren "$BIN" "$port" "$WORK/data-$name" "$WORK/warren-$name.log"
    WARREN_PIDS+=("$WARREN_PID")
    URL="amqp://guest:guest@127.0.0.1:$port/%2f"
    export AMQP_URL="$URL" WARREN_URL="$URL"
    if [ -n "$WARREN_MGMT_PORT" ]; then
        export WARREN_MGMT_URL="http://127.0.0.1:$WARREN_MGMT_PORT"
    fi
    if [ -n "$WARREN_PROM_PORT" ]; then
        export WARREN_PROMETHEUS_URL="http://127.0.0.1:$WARREN_PROM_PORT/metrics"
    fi
}

# run_suite NAME CMD...: run CMD; on failure show the broker's log tail.
run_suite() {
    local name="$1"
    shift
    echo "+ AMQP_URL=$AMQP_URL $*"
    if ! "$@"; then
        echo "---- tail of Warren log for $name ($WORK/warren-$name.log) ----" >&2
        tail -n 40 "$WORK/warren-$name.log" >&2 || true
        die "$name suite failed"
    fi
}

step "check test suites are present"
require_suite tests/clients/python
require_suite tests/clients/node
require_suite tests/differential/run.py
require_suite tests/cluster/differential.py
require_suite scripts/rabbitmq-cluster.sh
require_suite tests/management/compat.py
require_suite tests/management/rabbitmqadmin_test.sh
require_suite tests/metrics/prometheus_scrape_test.sh
require_suite tests/links/test_rabbitmq.py
require_suite tests/links/netns.sh
require_suite tests/bench/test_report.py
[ -n "$(find tests/clients/node -name node_modules -prune -o -type f -regextype posix-extended \
    -regex '.*/([^/]*[._-]test|test-[^/]*|test)\.[cm]?js' -print)" ] ||
    die "tests/clients/node has no test files (*.test.js); node --test would pass vacuously"
echo "tests/clients/python, tests/clients/node, tests/differential/run.py, tests/cluster/differential.py present"

step "dependencies (scripts/deps.sh)"
"$WARREN_ROOT/scripts/deps.sh"

step "benchmark report tool (tests/bench: scripts/bench_report.py on kept PerfTest output)"
"$WARREN_VENV/bin/python" -m pytest -q tests/bench

step "cargo test --workspace (all but the Kubernetes e2e tests)"
cargo test --workspace --exclude warren-e2e

step "operator on a real Kubernetes control plane (e2e/run.sh)"
bash "$WARREN_ROOT/e2e/run.sh"

step "cargo build -p warren-broker"
cargo build -p warren-broker
BIN="$(cargo_target_dir)/debug/warren-broker"
[ -x "$BIN" ] || die "expected the broker binary at $BIN"
echo "binary: $BIN"

step "Prometheus: Debian prometheus scrapes Warren under a workload"
tests/metrics/prometheus_scrape_test.sh "$BIN"

step "python client suite (pika) against Warren"
# This broker also serves AMQPS with mutual TLS, for test_tls.py.
"$WARREN_ROOT/scripts/test-pki.sh" "$WORK/tls"
AMQPS_PORT="$(free_port)"
WARREN_EXTRA_ARGS=(--amqps-listen "127.0.0.1:$AMQPS_PORT"
    --tls-cert-file "$WORK/tls/tls.crt" --tls-key-file "$WORK/tls/tls.key"
    --tls-ca-file "$WORK/tls/ca.crt")
fresh_warren python
WARREN_EXTRA_ARGS=()
export AMQPS_PORT WARREN_TLS_DIR="$WORK/tls"
run_suite python "$WARREN_VENV/bin/pytest" -q tests/clients/python

step "node client suite (amqplib) against Warren"
fresh_warren node
run_suite node node --test tests/clients/node/

step "differential suite: Warren vs reference RabbitMQ"
fresh_warren differential
REF_USED=1
"$WARREN_ROOT/scripts/rabbitmq-ref.sh" reset
RABBITMQ_URL="$("$WARREN_ROOT/scripts/rabbitmq-ref.sh" start)"
export RABBITMQ_URL
export RABBITMQ_MGMT_URL="http://127.0.0.1:${WARREN_REF_MGMT_PORT:-15673}"
export RABBITMQ_PROMETHEUS_URL="http://127.0.0.1:${WARREN_REF_PROM_PORT:-15693}/metrics"
run_suite differential "$WARREN_VENV/bin/python" tests/differential/run.py \
    --warren "$WARREN_URL" --rabbitmq "$RABBITMQ_URL"

step "cluster differential: 3 Warren nodes vs a 3-node reference RabbitMQ cluster"
# Starts its own three warren-broker processes; resets, starts (join_cluster) and stops the
# RabbitMQ cluster itself (scripts/rabbitmq-cluster.sh); the trap stops it if it is interrupted.
RMQ_CLUSTER_USED=1
echo "+ tests/cluster/differential.py --warren-bin $BIN"
"$WARREN_VENV/bin/python" tests/cluster/differential.py --warren-bin "$BIN" ||
    die "cluster differential failed (Warren logs: see the path printed above)"

step "management API: same calls against Warren and reference RabbitMQ"
[ -n "${WARREN_MGMT_URL:-}" ] || die "the broker binary serves no management API"
run_suite differential python3 tests/management/compat.py \
    --warren "$WARREN_MGMT_URL" --rabbitmq "$RABBITMQ_MGMT_URL"

step "links: shovels and federation between Warren and reference RabbitMQ, both ways"
# Its own Warren nodes (restarted mid-test); the running reference RabbitMQ, which some tests
# stop and start again (scripts/rabbitmq-ref.sh, same WARREN_REF_* environment).
WARREN_BIN="$BIN" run_suite links "$WARREN_VENV/bin/pytest" -q tests/links/test_rabbitmq.py

step "links: two data centres in network namespaces, the link cut and restored (root)"
tests/links/netns.sh "$BIN"

step "management API: rabbitmqadmin against Warren"
fresh_warren rabbitmqadmin
run_suite rabbitmqadmin env WARREN_MGMT_PORT="$WARREN_MGMT_PORT" \
    tests/management/rabbitmqadmin_test.sh --no-start

step ""
