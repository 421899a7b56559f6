#!/usr/bin/env bash
# The broker in real pods: the e2e control plane plus the real node of e2e/kubelet.sh, the
# broker image built by scripts/image.sh, then `cargo test -p warren-e2e --test real_pods
# -- --ignored`.
#
#   bash e2e/real-pods.sh [cargo test filter...]
#
# Needs root (containerd, mounts, the bridge). Starts the control plane unless one already
# answers in WARREN_K8S_DIR (then it is reused and left running); always stops the node it
# started, and the control plane if it started it, unless KEEP=1. Cached outside the
# checkout: the control plane and node binaries (~/.cache/warren/k8s), the musl build of the
# image (~/.cache/warren/target-image). Each step prints its duration.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

T0=$SECONDS
T=""
step() {
    if [[ -n "$T" ]]; then printf '[real-pods] ... %d s\n' "$((SECONDS - T))"; fi
    T=$SECONDS
    header "$*"
}

KUBETOOLS="$(bash scripts/kubetools.sh | tail -1)"
export PATH="$KUBETOOLS:$PATH"
export KUBECTL="$KUBETOOLS/kubectl"

started_cp=0
cleanup() {
    if [[ "${KEEP:-}" == 1 ]]; then
        echo "[real-pods] KEEP=1: node and control plane left running" >&2
        return
    fi
    bash e2e/kubelet.sh stop >&2 || true
    # The tests' hostPath volumes (e2e/tests/real_pods.rs volumes_root).
    rm -rf "${TMPDIR:-/tmp}/warren-real-pods"
    if ((started_cp)); then bash e2e/control-plane.sh stop >&2 || true; fi
}
trap cleanup EXIT

step "control plane (e2e/control-plane.sh)"
if bash e2e/control-plane.sh status >/dev/null 2>&1; then
    echo "[real-pods] reusing the running control plane"
else
    started_cp=1
    # A fresh etcd: no namespaces or Nodes left over from an earlier run.
    bash e2e/control-plane.sh stop --wipe >/dev/null 2>&1 || true
    bash e2e/control-plane.sh start >/dev/null
fi
eval "$(bash e2e/control-plane.sh env)"

step "broker image (scripts/image.sh)"
image_out="$(bash scripts/image.sh)"
tail -4 <<<"$image_out"
# The broker image just built is the one the node imports (not an older tag in podman).
WARREN_KUBELET_IMAGES="$(grep -o 'ghcr\.io/warren-dev/warren-broker:[^ ]*' <<<"$image_out" | tail -1)"
[[ -n "$WARREN_KUBELET_IMAGES" ]] || die "scripts/image.sh printed no broker image name"
export WARREN_KUBELET_IMAGES

step "real node (e2e/kubelet.sh start)"
# Captured first: a failed start must stop the run (`eval "$(...)"` would hide its status).
node_env="$(bash e2e/kubelet.sh start)"
eval "$node_env"

step "cargo build (operator binary)"
cargo build -p warren-operator -p warren-broker --bins

step "cargo test -p warren-e2e --test real_pods -- --ignored"
cargo test -p warren-e2e --test real_pods -- --ignored "$@"

step "done"
echo "[real-pods] total $((SECONDS - T0)) s"
