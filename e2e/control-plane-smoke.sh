#!/usr/bin/env bash
# Smoke check of e2e/control-plane.sh: build (cached), start, then exercise
# what the operator's end-to-end tests rely on:
#   - the real scheduler places StatefulSet pods on the kwok nodes and kwok
#     makes them Ready (kubectl rollout status),
#   - the garbage collector deletes dependents through ownerReferences,
#   - RBAC is enforced (kubectl auth can-i, with and without a binding),
#   - the server reports its real version, helm talks to the cluster.
#
#   KEEP=1 e2e/control-plane-smoke.sh   leave the control plane running
#
# Without KEEP=1 the control plane is stopped at the end (also on failure);
# its state dir (logs!) is kept either way.
set -euo pipefail

_caller_cache="${WARREN_CACHE:-}"
# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
export WARREN_CACHE="${_caller_cache:-$WARREN_CACHE}"

CP="$WARREN_ROOT/e2e/control-plane.sh"
NS="cp-smoke-$$"
KEEP="${KEEP:-0}"

fail() { die "control-plane smoke: $*"; }

cleanup() {
    local rc=$?
    if [[ -n "${KUBECONFIG:-}" ]] && command -v kubectl >/dev/null 2>&1; then
        kubectl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    fi
    if ((rc != 0)); then
        echo "control-plane smoke FAILED (exit $rc); logs: ${WARREN_K8S_DIR:-/tmp/warren-k8s}/logs" >&2
    fi
    if [[ "$KEEP" == 1 ]]; then
        echo "KEEP=1: control plane left running; $("$CP" env)" >&2
    else
        "$CP" stop || true
    fi
    exit "$rc"
}

# retry SECONDS CMD...: run CMD every second until it succeeds.
retry() {
    local timeout="$1" t0=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < timeout)) || return 1
        sleep 1
    done
}

header "kubectl and helm"
PATH="$(bash "$WARREN_ROOT/scripts/kubetools.sh" | tail -1):$PATH"
export PATH
kubectl version --client
helm version --short

header "build"
t0=$SECONDS
"$CP" build
echo "build: $((SECONDS - t0)) s"

header "start"
trap cleanup EXIT
t0=$SECONDS
eval "$("$CP" start | grep '^export KUBECONFIG=')"
[[ -n "${KUBECONFIG:-}" ]] || fail "start printed no KUBECONFIG"
echo "start: $((SECONDS - t0)) s"
"$CP" status

header "server version"
server="$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
echo "server: $server"
[[ "$server" == v1.33.* ]] || fail "server reports version '$server', expected v1.33.x"
kubectl get nodes -o wide

header "StatefulSet on kwok nodes"
kubectl create namespace "$NS"
kubectl -n "$NS" apply -f - <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: None
  selector: {app: web}
  ports:
  - {name: amqp, port: 5672}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  serviceName: web
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: broker
        # never pulled: kwok runs no containers
        image: registry.invalid/warren:smoke
        ports:
        - {name: amqp, containerPort: 5672}
EOF
kubectl -n "$NS" rollout status statefulset/web --timeout=120s ||
    fail "StatefulSet web did not become ready (scheduler/kwok?): $(kubectl -n "$NS" get pods -o wide 2>&1)"
kubectl -n "$NS" get pods -o wide
ready="$(kubectl -n "$NS" get pods -l app=web -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$' || true)"
[[ "$ready" == 2 ]] || fail "expected 2 Ready pods, got $ready"
for p in web-0 web-1; do
    node="$(kubectl -n "$NS" get pod "$p" -o jsonpath='{.spec.nodeName}')"
    [[ "$node" == kwok-node-* ]] || fail "pod $p is on node '$node', not a kwok node"
done

header "garbage collector (ownerReference cascade)"
uid="$(kubectl -n "$NS" get statefulset web -o jsonpath='{.metadata.uid}')"
kubectl -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-owned
  ownerReferences:
  - apiVersion: apps/v1
    kind: StatefulSet
    name: web
    uid: $uid
data:
  k: v
EOF
kubectl -n "$NS" delete statefulset web --wait=true --timeout=60s
# shellcheck disable=SC2016  # expanded by the inner bash
retry 60 bash -c '! kubectl -n "$1" get configmap web-owned' _ "$NS" ||
    fail "garbage collector did not delete ConfigMap web-owned owned by the deleted StatefulSet"
echo "ConfigMap web-owned deleted by the garbage collector"
# shellcheck disable=SC2016
retry 60 bash -c '[[ -z "$(kubectl -n "$1" get pods -l app=web -o name)" ]]' _ "$NS" ||
    fail "pods of the deleted StatefulSet still exist: $(kubectl -n "$NS" get pods 2>&1)"
echo "pods of StatefulSet web deleted"

header "RBAC"
expect_can_i() { # expect_can_i yes|no ARGS...
    local want="$1" got
    shift
    got="$(kubectl auth can-i "$@" 2>/dev/null || true)"
    [[ "$got" == "$want" ]] || fail "kubectl auth can-i $* -> '$got', expected '$want'"
    echo "can-i $* -> $got"
}
expect_can_i yes list secrets --all-namespaces
expect_can_i no list secrets --as=system:serviceaccount:default:nobody
kubectl -n "$NS" create serviceaccount reader
kubectl -n "$NS" create role secret-reader --verb=get,list --resource=secrets
kubectl -n "$NS" create rolebinding reader --role=secret-reader --serviceaccount="$NS:reader"
expect_can_i yes list secrets -n "$NS" --as="system:serviceaccount:$NS:reader"
expect_can_i no list secrets -n default --as="system:serviceaccount:$NS:reader"
# Not only the authorizer's answer: a real request under that identity.
kubectl -n default get secrets --as="system:serviceaccount:$NS:reader" >/dev/null 2>&1 &&
    fail "reader could list secrets in default"
echo "a real list of secrets in default as $NS:reader is forbidden"

header "helm"
helm version
helm list --all-namespaces >/dev/null || fail "helm cannot talk to the cluster"
echo "helm list against the cluster: ok"

echo
echo "control-plane-smoke: 1 passed, 0 failed"
