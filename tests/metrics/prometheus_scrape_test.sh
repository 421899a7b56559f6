#!/usr/bin/env bash
# A real Prometheus scrapes a running Warren; the values are checked through the
# Prometheus HTTP API (/api/v1/query), including a RabbitMQ-Overview dashboard query
# that joins on rabbitmq_identity_info.
#
#   tests/metrics/prometheus_scrape_test.sh [PATH_TO_WARREN_BROKER]
#
# The binary defaults to $(cargo_target_dir)/debug/warren-broker (honours
# CARGO_TARGET_DIR); build it first (cargo build -p warren-broker). Needs
# .deps/venv with pika (scripts/deps.sh). Installs Debian's `prometheus` with
# apt-get if it is missing, without letting the Debian service start (and stops
# it if it runs); Warren and Prometheus run on free 127.0.0.1 ports with temp
# directories and are stopped on exit. Prints "1 passed, 0 failed" on success.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
cd "$WARREN_ROOT"

BIN="${1:-$(cargo_target_dir)/debug/warren-broker}"
[ -x "$BIN" ] || die "Warren binary not found at $BIN (run cargo build -p warren-broker)"
[ -x "$WARREN_VENV/bin/python" ] || die "$WARREN_VENV missing: run scripts/deps.sh"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

# The Debian service must never keep 9090 (or anything) bound.
stop_debian_prometheus() {
    if [ -d /run/systemd/system ]; then
        as_root systemctl stop prometheus >/dev/null 2>&1 || true
        as_root systemctl disable prometheus >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
        as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
}

if ! command -v prometheus >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "prometheus not installed and no apt-get"
    echo "installing Debian prometheus (apt-get update + install)"
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        own_policy=1
    fi
    rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
    if [ "$rc" = 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            prometheus || rc=$?
    fi
    [ -n "$own_policy" ] && as_root rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || die "apt-get install prometheus failed (rc $rc)"
fi
stop_debian_prometheus

WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-prom.XXXXXX")"
WARREN_PID=""
PROM_PID=""
cleanup() {
    local rc=$?
    set +e
    [ -n "$PROM_PID" ] && stop_warren "$PROM_PID" # SIGTERM, then SIGKILL: fine for Prometheus too
    [ -n "$WARREN_PID" ] && stop_warren "$WARREN_PID"
    if [ "$rc" != 0 ]; then
        echo "---- warren log ----" >&2
        tail -n 30 "$WORK/warren.log" >&2
        echo "---- prometheus log ----" >&2
        tail -n 30 "$WORK/prometheus.log" >&2
        echo "0 passed, 1 failed"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

AMQP_PORT="$(free_port)"
start_warren "$BIN" "$AMQP_PORT" "$WORK/data" "$WORK/warren.log"
[ -n "$WARREN_PROM_PORT" ] || die "$BIN has no --prometheus-listen flag"
for _ in $(seq 1 100); do port_open "$WARREN_PROM_PORT" && break; sleep 0.1; done
port_open "$WARREN_PROM_PORT" || die "Warren's Prometheus endpoint did not listen on $WARREN_PROM_PORT"

PROM_PORT="$(free_port)"
cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: warren
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$WARREN_PROM_PORT"]
  - job_name: warren-per-object
    metrics_path: /metrics/per-object
    static_configs:
      - targets: ["127.0.0.1:$WARREN_PROM_PORT"]
YAML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
for _ in $(seq 1 300); do
    kill -0 "$PROM_PID" 2>/dev/null || die "prometheus exited during startup"
    port_open "$PROM_PORT" && break
    sleep 0.1
done
port_open "$PROM_PORT" || die "prometheus did not listen on $PROM_PORT"
echo "prometheus pid $PROM_PID on 127.0.0.1:$PROM_PORT scraping 127.0.0.1:$WARREN_PROM_PORT"

AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f" \
    PROMETHEUS_URL="http://127.0.0.1:$PROM_PORT" \
    "$WARREN_VENV/bin/python" "$WARREN_ROOT/tests/metrics/prometheus_workload.py"
echo "1 passed, 0 failed"
