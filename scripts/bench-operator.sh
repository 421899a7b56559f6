#!/usr/bin/env bash
# Operator benchmark on the real control plane (see e2e/src/bin/operator-bench.rs).
#   BENCH_CLUSTERS=200 bash scripts/bench-operator.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PATH="$(bash scripts/kubetools.sh | tail -1):$PATH"
bash e2e/control-plane.sh build
bash e2e/control-plane.sh stop --wipe >/dev/null 2>&1 || true
trap 'bash "$ROOT/e2e/control-plane.sh" stop >/dev/null 2>&1 || true' EXIT
bash e2e/control-plane.sh start
eval "$(bash e2e/control-plane.sh env)"
cargo build --release -p warren-operator -p warren-e2e --bins
"$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/operator-bench"
