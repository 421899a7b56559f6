#!/usr/bin/env bash
# Operator benchmarks on the real control plane (e2e/src/bin/operator-bench.rs and
# e2e/src/bin/topology-bench.rs).
#   BENCH_CLUSTERS=200 bash scripts/bench-operator.sh       RabbitClusters: time to ready, RSS
#   BENCH_TOPOLOGY=1 bash scripts/bench-operator.sh         topology objects instead:
#       BENCH_OBJECTS=2000 (half Queues, half Exchanges) in BENCH_NAMESPACES=20 namespaces,
#       reconciled against one real warren-broker: time to all Ready, operator RSS;
#       BENCH_CLUSTER_WIDE=1: the operator watches every namespace (one set of controllers)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PATH="$(bash scripts/kubetools.sh | tail -1):$PATH"
bash e2e/control-plane.sh build
bash e2e/control-plane.sh stop --wipe >/dev/null 2>&1 || true
trap 'bash "$ROOT/e2e/control-plane.sh" stop >/dev/null 2>&1 || true' EXIT
bash e2e/control-plane.sh start
eval "$(bash e2e/control-plane.sh env)"
cargo build --release -p warren-operator -p warren-broker -p warren-e2e --bins
bin="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
if [ -n "${BENCH_TOPOLOGY:-}" ]; then
    "$bin/topology-bench"
else
    "$bin/operator-bench"
fi
