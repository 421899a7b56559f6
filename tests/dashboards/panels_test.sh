#!/usr/bin/env bash
# Every query of the Grafana dashboards in dashboards/ returns data from a real Prometheus
# scraping a live Warren broker under a small workload and a live Warren operator
# reconciling on the real control plane; and every alert of the chart's PrometheusRule
# selects metrics that exist.
#
#   KUBECONFIG=... bash tests/dashboards/panels_test.sh
#
# * warren-broker (cargo-built) on free loopback ports, cluster name hello-warren, with
#   tests/dashboards/workload.py (pika) publishing, consuming, requeueing, fetching,
#   publishing unroutable messages and churning connections;
# * warren-operator (cargo-built) against the control plane in KUBECONFIG, watching a fresh
#   namespace with two RabbitClusters: one that reconciles, and one whose Service the API
#   server rejects (an invalid annotation key), so reconcile errors are counted; the good
#   one is touched every 2 s so reconciliations keep coming;
# * Debian's prometheus scraping both every second, with the labels the chart's monitors
#   give them: the broker's per-object endpoint as the broker PodMonitor does (job
#   <namespace>/warren-operator-brokers, namespace, pod, warren_cluster), the operator as the
#   ServiceMonitor does (job warren-operator-metrics, namespace, pod);
# * tests/dashboards/panels_check.py resolves each dashboard variable and runs every
#   panel target through /api/v1/query: each must return a non-empty, finite result. Then
#   each vector selector of each alert (rendered from the chart with the PrometheusRule on,
#   release warren-operator in the operator's namespace) must select live series.
#
# RabbitMQ's own RabbitMQ-Overview dashboard is not checked here: its JSON is not in any
# package this machine can install (see README, "Monitoring").
#
# Installs what it uses: Debian prometheus (apt-get), .deps/venv with pika
# (scripts/deps.sh python), PyYAML in .deps/chart-venv, helm (scripts/kubetools.sh). Builds
# warren-broker and warren-operator, unless WARREN_OPERATOR_BIN and WARREN_BROKER_BIN are set.
# Prints "N passed, 0 failed".
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
cd "$WARREN_ROOT"

[ -n "${KUBECONFIG:-}" ] || die "KUBECONFIG is not set: this test needs the control plane (bash e2e/run.sh runs it; or bash e2e/control-plane.sh start and eval \"\$(bash e2e/control-plane.sh env)\")"
KUBETOOLS="$(bash scripts/kubetools.sh | tail -1)"
KUBECTL="$KUBETOOLS/kubectl"
HELM="$KUBETOOLS/helm"
kc() { "$KUBECTL" "$@"; }
kc version >/dev/null 2>&1 || die "the API server in KUBECONFIG ($KUBECONFIG) does not answer"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}
if ! command -v prometheus >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "prometheus not installed and no apt-get"
    echo "installing Debian prometheus"
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        own_policy=1
    fi
    rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
    [ "$rc" = 0 ] && { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus || rc=$?; }
    [ -n "$own_policy" ] && as_root rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || die "apt-get install prometheus failed (rc $rc)"
fi
if [ -d /run/systemd/system ]; then
    as_root systemctl stop prometheus >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
    as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
bash scripts/deps.sh python >/dev/null
CHECK_VENV="$WARREN_ROOT/.deps/chart-venv"
if ! "$CHECK_VENV/bin/python" -c 'import yaml' 2>/dev/null; then
    [ -x "$CHECK_VENV/bin/python" ] || python3 -m venv "$CHECK_VENV" || die "python3 -m venv failed"
    "$CHECK_VENV/bin/python" -m pip install -q --disable-pip-version-check pyyaml
fi

# The binaries: WARREN_OPERATOR_BIN / WARREN_BROKER_BIN when given (both), else built here.
if [ -n "${WARREN_OPERATOR_BIN:-}" ] && [ -n "${WARREN_BROKER_BIN:-}" ]; then
    OPERATOR_BIN="$WARREN_OPERATOR_BIN"
    BROKER_BIN="$WARREN_BROKER_BIN"
else
    TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
    cargo build -q -p warren-operator -p warren-broker --bins
    OPERATOR_BIN="$TARGET_DIR/debug/warren-operator"
    BROKER_BIN="$TARGET_DIR/debug/warren-broker"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-panels.XXXXXX")"
NS="warren-panels-$(python3 -c 'import secrets; print(secrets.token_hex(3))')"
PIDS=()
TOUCH_PID=""
cleanup() {
    local rc=$?
    set +e
    [ -n "$TOUCH_PID" ] && kill "$TOUCH_PID" 2>/dev/null && wait "$TOUCH_PID" 2>/dev/null
    # Clusters first, while the operator still runs their finalizer.
    kc -n "$NS" delete rabbitcluster --all --wait --timeout=30s >/dev/null 2>&1
    local pid
    for pid in "${PIDS[@]}"; do stop_warren "$pid"; done
    for rc_name in $(kc -n "$NS" get rabbitcluster -o name 2>/dev/null); do
        kc -n "$NS" patch "$rc_name" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
    done
    kc delete namespace "$NS" --wait=false >/dev/null 2>&1
    if [ "$rc" != 0 ]; then
        for f in "$WORK"/*.log; do
            echo "---- tail of $f ----" >&2
            tail -n 25 "$f" >&2
        done
        echo "0 passed, 1 failed"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- broker + workload
AMQP_PORT="$(free_port)"
WARREN_EXTRA_ARGS=(--cluster-name hello-warren --node-name "warren@hello-warren-server-0")
start_warren "$BROKER_BIN" "$AMQP_PORT" "$WORK/data" "$WORK/broker.log"
WARREN_EXTRA_ARGS=()
PIDS+=("$WARREN_PID")
for _ in $(seq 1 100); do port_open "$WARREN_PROM_PORT" && break; sleep 0.1; done
# A shovel and a federation link on the broker, for the federation and shovels dashboard
# (both to and from the broker itself: `amqp://` is the local node).
mgmt() {
    curl -fsS -u guest:guest -X PUT -H 'content-type: application/json' \
        "http://127.0.0.1:$WARREN_MGMT_PORT$1" -d "$2" >/dev/null || die "PUT $1 failed"
}
mgmt /api/queues/%2F/panels.src '{"durable": true}'
mgmt /api/queues/%2F/panels.dst '{"durable": true}'
mgmt /api/parameters/shovel/%2F/panels-shovel \
    '{"value": {"src-uri": "amqp://", "src-queue": "panels.src", "dest-uri": "amqp://", "dest-queue": "panels.dst", "ack-mode": "on-confirm"}}'
mgmt /api/exchanges/%2F/panels.up '{"type": "fanout"}'
mgmt /api/exchanges/%2F/panels.fed '{"type": "fanout"}'
mgmt /api/parameters/federation-upstream/%2F/panels-up \
    "{\"value\": {\"uri\": \"amqp://guest:guest@127.0.0.1:$AMQP_PORT\", \"exchange\": \"panels.up\"}}"
mgmt /api/policies/%2F/panels-fed \
    '{"pattern": "^panels\\.fed$", "apply-to": "exchanges", "definition": {"federation-upstream": "panels-up"}}'

AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f" WORKLOAD_SECONDS=600 \
    "$WARREN_VENV/bin/python" tests/dashboards/workload.py >"$WORK/workload.log" 2>&1 &
PIDS+=("$!")

# ---- operator with one good and one failing cluster
# The CRDs (the test must not depend on what ran before it on this control plane).
kc apply --server-side --force-conflicts --field-manager warren-panels-test -f crds/ >/dev/null
kc wait --for condition=established --timeout=60s -f crds/ >/dev/null
kc create namespace "$NS" >/dev/null
OP_PORT="$(free_port)"
"$OPERATOR_BIN" --namespace "$NS" --lease-namespace "$NS" --metrics-addr "127.0.0.1:$OP_PORT" \
    --log-format text >"$WORK/operator.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 1 100); do port_open "$OP_PORT" && break; sleep 0.1; done
port_open "$OP_PORT" || die "the operator does not serve metrics on $OP_PORT"
kc apply -n "$NS" -f - >/dev/null <<'EOF'
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata:
  name: hello-warren
spec:
  replicas: 1
  persistence: {storage: "0"}
---
# The API server rejects its Service (an annotation key may not contain spaces): every
# reconcile fails with a Kubernetes API error, which the operator counts and retries.
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata:
  name: broken
spec:
  replicas: 1
  persistence: {storage: "0"}
  service:
    annotations:
      "not a valid key": "x"
EOF
# Keep reconciliations coming: a touch every 2 s (a label change is a watch event).
(
    i=0
    while true; do
        i=$((i + 1))
        kc -n "$NS" label rabbitcluster hello-warren "panels-test/touch=$i" --overwrite >/dev/null 2>&1 || true
        sleep 2
    done
) &
TOUCH_PID=$!

# ---- prometheus
PROM_PORT="$(free_port)"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  # As the chart's broker PodMonitor: per-object endpoint, warren_cluster from the pod label.
  - job_name: $NS/warren-operator-brokers
    metrics_path: /metrics/per-object
    static_configs:
      - targets: ["127.0.0.1:$WARREN_PROM_PORT"]
        labels: {namespace: "$NS", pod: hello-warren-server-0, container: warren, warren_cluster: hello-warren}
  # As the chart's ServiceMonitor: job = the metrics Service.
  - job_name: warren-operator-metrics
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$OP_PORT"]
        labels: {namespace: "$NS", pod: warren-operator-0, service: warren-operator-metrics}
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 1 300); do port_open "$PROM_PORT" && break; sleep 0.1; done
port_open "$PROM_PORT" || die "prometheus did not listen on $PROM_PORT"
echo "prometheus on 127.0.0.1:$PROM_PORT scraping the broker (127.0.0.1:$WARREN_PROM_PORT) and the operator (127.0.0.1:$OP_PORT, namespace $NS)"

# ---- the chart's alerts, as installed in the operator's namespace
"$HELM" template warren-operator charts/warren-operator --namespace "$NS" \
    --set prometheusRule.enabled=true --show-only templates/prometheusrule.yaml >"$WORK/prometheusrule.yaml"
"$CHECK_VENV/bin/python" - "$WORK/prometheusrule.yaml" "$WORK/rules.yaml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({"groups": doc["spec"]["groups"]}, open(sys.argv[2], "w"))
EOF

"$CHECK_VENV/bin/python" tests/dashboards/panels_check.py --prometheus "http://127.0.0.1:$PROM_PORT" \
    --timeout 150 --rules "$WORK/rules.yaml" dashboards/*.json
