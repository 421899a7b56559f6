#!/usr/bin/env bash
# The operator's end-to-end tests on a real Kubernetes control plane.
#
#   bash e2e/run.sh [cargo test filter...]
#
# Installs kubectl and helm (scripts/kubetools.sh), builds the control plane once per
# pinned version (e2e/control-plane.sh build, cached under ~/.cache/warren/k8s), starts
# it from a wiped state dir, checks the committed CRDs match the Rust types, starts the
# reference RabbitMQ (scripts/rabbitmq-ref.sh), builds the operator and broker binaries and
# runs `cargo test -p warren-e2e`. Both are stopped afterwards unless KEEP=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KUBETOOLS="$(bash scripts/kubetools.sh | tail -1)"
export PATH="$KUBETOOLS:$PATH"
export KUBECTL="$KUBETOOLS/kubectl"

bash e2e/control-plane.sh build
bash e2e/control-plane.sh stop --wipe >/dev/null 2>&1 || true
if [ "${KEEP:-}" != 1 ]; then
    trap 'bash "$ROOT/e2e/control-plane.sh" stop >/dev/null 2>&1 || true' EXIT
fi
bash e2e/control-plane.sh start
eval "$(bash e2e/control-plane.sh env)"

echo "==== CRDs in crds/ match the Rust types ===="
GENERATED="$(mktemp -d)"
cargo run -q -p warren-operator --bin crdgen -- "$GENERATED" >/dev/null
if ! diff -ru crds "$GENERATED"; then
    echo "crds/ is stale: run \`cargo run -p warren-operator --bin crdgen\` and commit the result" >&2
    exit 1
fi
rm -rf "$GENERATED"

echo "==== reference RabbitMQ (the operator must configure a stock broker too) ===="
bash scripts/deps.sh rabbitmq >/dev/null
bash scripts/rabbitmq-ref.sh start >/dev/null
if [ "${KEEP:-}" != 1 ]; then
    trap 'bash "$ROOT/e2e/control-plane.sh" stop >/dev/null 2>&1 || true; bash "$ROOT/scripts/rabbitmq-ref.sh" stop >/dev/null 2>&1 || true' EXIT
fi
export RABBITMQ_MGMT_URL="http://127.0.0.1:${WARREN_REF_MGMT_PORT:-15673}"
export RABBITMQ_AMQP_PORT="${WARREN_REF_AMQP_PORT:-5673}"

echo "==== cargo build (operator and broker binaries) ===="
cargo build -p warren-operator -p warren-broker --bins

echo "==== cargo test -p warren-e2e ===="
cargo test -p warren-e2e -- "$@"

# On the same control plane: the Helm chart (install/upgrade/uninstall with the operator
# confined to the chart's RBAC) and the Grafana dashboards (every panel's query against a
# real Prometheus scraping a live broker and operator).
echo "==== Helm chart: charts/test.sh ===="
bash charts/test.sh

echo "==== Grafana dashboards: tests/dashboards/panels_test.sh ===="
bash tests/dashboards/panels_test.sh
