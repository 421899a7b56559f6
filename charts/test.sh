#!/usr/bin/env bash
# Tests of the Helm chart charts/warren-operator, with the real helm (v4).
#
#   bash charts/test.sh            # static checks, then install/upgrade/uninstall on the
#                                  # control plane in KUBECONFIG (e2e/run.sh calls it so)
#   bash charts/test.sh --static   # only the checks that need no cluster
#
# Static:
#   * Chart.yaml version/appVersion = the Cargo workspace version; files/crds and
#     files/dashboards are copies of crds/ and dashboards/; the default render matches the
#     committed snapshot tests/snapshot/default.yaml (charts/sync.sh --check; regenerate
#     everything with `bash charts/sync.sh`)
#   * helm lint --strict, with the defaults and with every charts/tests/values/*.yaml
#   * helm template with the defaults and every values file: each manifest validated
#     against the Kubernetes 1.33 schemas by kubernetes-validate (strict; CRDs as
#     CustomResourceDefinition objects), the Prometheus Operator objects against the
#     prometheus-operator CRD schemas (@kubernetes-models/prometheus-operator, npm)
#   * every charts/tests/invalid/*.yaml is rejected, with the message its `# expect:` names
#   * the PrometheusRule's rules pass `promtool check rules` and the unit tests in
#     charts/tests/alerts_test.yaml (`promtool test rules`; Debian's prometheus)
# Live (KUBECONFIG of a control plane from e2e/control-plane.sh):
#   * helm install in cluster scope; the operator binary runs out of cluster with the
#     chart's ServiceAccount token and the Deployment's own flags, so the chart's RBAC is
#     the only authority it has: samples/rabbitcluster-minimal.yaml in another namespace
#     must reach AllReplicasReady, a resize must be judged against the StorageClasses, a
#     scale-down must drain a node, a volume expansion must resize the claim, Events and
#     the Lease must be written — and its log must show no Forbidden error
#   * helm upgrade (2 replicas, PodDisruptionBudget) while it runs
#   * a second release in namespace scope (crds.install=false): the same with --namespace,
#     and the ServiceAccount must not reach any other namespace
#   * helm uninstall of both: everything removed but the CRDs (kept on purpose)
#
# Installs what it uses: helm/kubectl (scripts/kubetools.sh), kubernetes-validate (PyPI,
# venv .deps/chart-venv), @kubernetes-models/prometheus-operator (npm, charts/tests),
# Debian's prometheus for promtool and curl (apt-get). Builds warren-operator and warren-broker
# (cargo build), unless WARREN_OPERATOR_BIN and WARREN_BROKER_BIN name binaries to use.
# Prints "N passed, 0 failed" at the end; any failure exits non-zero.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$WARREN_ROOT"

CHART=charts/warren-operator
K8S_SCHEMA_VERSION=1.33.0
KUBE_VALIDATE_VERSION=1.37.0
CHART_VENV="$WARREN_ROOT/.deps/chart-venv"

mode=all
case "${1:-}" in
"") ;;
--static) mode=static ;;
*) die "usage: $0 [--static]" ;;
esac

PASSED=0
LAST_PASS=$SECONDS
pass() {
    PASSED=$((PASSED + 1))
    printf '  ok  %s (%d s)\n' "$*" $((SECONDS - LAST_PASS))
    LAST_PASS=$SECONDS
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-chart-test.XXXXXX")"
PIDS=()
CLEANUP_CMDS=()
cleanup() {
    local rc=$?
    set +e
    local pid c
    for pid in "${PIDS[@]}"; do stop_warren "$pid"; done
    if [ "$rc" != 0 ] && [ -n "${RUN_ID:-}" ] && [ -n "${KUBECTL:-}" ]; then
        # What the control plane saw, before cleanup deletes it.
        local ns
        for ns in $("$KUBECTL" get ns -o name 2>/dev/null | grep -- "-$RUN_ID\$" | cut -d/ -f2); do
            echo "---- objects and events in $ns ----" >&2
            "$KUBECTL" -n "$ns" get rabbitclusters,statefulsets,pods,pvc -o wide >&2
            "$KUBECTL" -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -n 30 >&2
        done
        "$KUBECTL" get pv -l "warren.dev/chart-test=$RUN_ID" -o wide >&2
    fi
    for c in "${CLEANUP_CMDS[@]}"; do eval "$c" >/dev/null 2>&1; done
    if [ "$rc" != 0 ]; then
        for f in "$WORK"/*.log; do
            [ -f "$f" ] || continue
            echo "---- tail of $f ----" >&2
            tail -n 40 "$f" >&2
        done
        echo "$PASSED passed, 1 failed"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
header "tools"
KUBETOOLS="$(bash scripts/kubetools.sh | tail -1)"
HELM="$KUBETOOLS/helm"
KUBECTL="$KUBETOOLS/kubectl"
export HELM
"$HELM" version --short

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

if ! command -v promtool >/dev/null 2>&1; then
    # Debian's prometheus package ships promtool; keep its service from starting.
    command -v apt-get >/dev/null 2>&1 || die "promtool missing and no apt-get to install Debian's prometheus"
    echo "installing Debian prometheus (for promtool)"
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
promtool --version 2>&1 | head -1
if ! command -v curl >/dev/null 2>&1; then
    echo "installing curl (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl >/dev/null ||
        { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl; } ||
        die "curl is missing and could not be installed"
fi

if ! "$CHART_VENV/bin/python" -c "import kubernetes_validate, yaml, sys; sys.exit(kubernetes_validate.version.__version__ != '$KUBE_VALIDATE_VERSION')" 2>/dev/null; then
    echo "installing kubernetes-validate $KUBE_VALIDATE_VERSION into $CHART_VENV"
    [ -x "$CHART_VENV/bin/python" ] || python3 -m venv "$CHART_VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$CHART_VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "kubernetes-validate==$KUBE_VALIDATE_VERSION" pyyaml
fi
echo "kubernetes-validate $("$CHART_VENV/bin/python" -c 'import kubernetes_validate; print(kubernetes_validate.version.__version__)')"

command -v npm >/dev/null 2>&1 || die "npm not found (needed for @kubernetes-models/prometheus-operator)"
stamp="$(sha256sum charts/tests/package.json charts/tests/package-lock.json | sha256sum | cut -c1-16)"
if [ "$(cat charts/tests/node_modules/.warren-stamp 2>/dev/null || true)" != "$stamp" ]; then
    (cd charts/tests && npm ci --no-audit --no-fund --loglevel=error)
    echo "$stamp" >charts/tests/node_modules/.warren-stamp
fi

# ---------------------------------------------------------------- static
header "chart version, copies and snapshot"
want="$(python3 -c 'import re; t=open("Cargo.toml").read(); s=re.search(r"^\[workspace\.package\]\s*$(.*?)^\[", t+"\n[", re.M|re.S).group(1); print(re.search(r"^version\s*=\s*\"([^\"]+)\"", s, re.M).group(1))')"
have_version="$(sed -n 's/^version: *//p' $CHART/Chart.yaml)"
have_app="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' $CHART/Chart.yaml)"
{ [ "$have_version" = "$want" ] && [ "$have_app" = "$want" ]; } ||
    die "Chart.yaml has version $have_version, appVersion $have_app; the workspace version (Cargo.toml) is $want: run \`bash charts/sync.sh\`"
pass "Chart.yaml version and appVersion = workspace version $want"
bash charts/sync.sh --check
pass "files/crds = crds/, files/dashboards = dashboards/, default render = tests/snapshot/default.yaml"

header "helm lint"
"$HELM" lint --strict "$CHART" >"$WORK/lint.out" 2>&1 || { cat "$WORK/lint.out"; die "helm lint failed"; }
pass "helm lint --strict (defaults)"
for f in charts/tests/values/*.yaml; do
    "$HELM" lint --strict "$CHART" -f "$f" >"$WORK/lint.out" 2>&1 || { cat "$WORK/lint.out"; die "helm lint -f $f failed"; }
    pass "helm lint --strict -f $f"
done

header "helm template + kubernetes-validate ($K8S_SCHEMA_VERSION) + prometheus-operator schemas"
mkdir -p "$WORK/render" "$WORK/custom"
"$HELM" template warren "$CHART" --namespace warren-system >"$WORK/render/default.yaml"
for f in charts/tests/values/*.yaml; do
    "$HELM" template warren-operator "$CHART" --namespace warren-system -f "$f" \
        >"$WORK/render/$(basename "$f")"
done
"$CHART_VENV/bin/python" charts/tests/validate_manifests.py \
    --kubernetes-version "$K8S_SCHEMA_VERSION" --custom-out "$WORK/custom" \
    --dashboards dashboards "$WORK"/render/*.yaml
pass "every rendered manifest (defaults + $(ls charts/tests/values/*.yaml | wc -l) values files) valid against Kubernetes $K8S_SCHEMA_VERSION"
ls "$WORK"/custom/*.json >/dev/null 2>&1 || die "no ServiceMonitor/PodMonitor/PrometheusRule rendered: the monitoring values files should render them"
(cd charts/tests && node validate-monitoring.mjs "$WORK"/custom/*.json)
pass "ServiceMonitor, PodMonitors, PrometheusRules valid against the prometheus-operator schemas"
grep -q '^kind: Deployment' "$WORK/render/default.yaml" || die "default render has no Deployment"
for kind in CustomResourceDefinition ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding Service ConfigMap; do
    grep -q "^kind: $kind\$" "$WORK/render/default.yaml" || die "default render has no $kind"
done
[ "$(grep -c '^kind: CustomResourceDefinition$' "$WORK/render/default.yaml")" = "$(ls crds/*.yaml | wc -l)" ] ||
    die "default render does not carry every CRD of crds/"
pass "default render has CRDs, ServiceAccount, RBAC, Deployment, metrics Service, dashboards"

header "values.schema.json and template guards reject bad values"
for f in charts/tests/invalid/*.yaml; do
    expect="$(sed -n 's/^# expect: //p' "$f")"
    [ -n "$expect" ] || die "$f has no '# expect: ' line"
    if out="$("$HELM" template t "$CHART" -f "$f" 2>&1)"; then
        die "$f was accepted; expected an error containing: $expect"
    fi
    grep -qF -- "$expect" <<<"$out" || die "$f was rejected, but not with '$expect':
$out"
    pass "rejects $(basename "$f"): $expect"
done

header "alerts: promtool check rules + promtool test rules"
mkdir -p "$WORK/rules"
"$CHART_VENV/bin/python" charts/tests/validate_manifests.py \
    --kubernetes-version "$K8S_SCHEMA_VERSION" --custom-out "$WORK/custom" \
    --rules-out "$WORK/rules/rules.yaml" "$WORK/render/monitoring.yaml" >/dev/null
promtool check rules "$WORK/rules/rules.yaml"
pass "promtool check rules (monitoring.yaml render)"
"$CHART_VENV/bin/python" charts/tests/validate_manifests.py \
    --kubernetes-version "$K8S_SCHEMA_VERSION" --custom-out "$WORK/custom" \
    --rules-out "$WORK/rules/everything-rules.yaml" "$WORK/render/everything.yaml" >/dev/null
promtool check rules "$WORK/rules/everything-rules.yaml"
pass "promtool check rules (everything.yaml render: namespace scope, non-default thresholds)"
cp charts/tests/alerts_test.yaml "$WORK/rules/"
promtool test rules "$WORK/rules/alerts_test.yaml"
pass "promtool test rules charts/tests/alerts_test.yaml"

if [ "$mode" = static ]; then
    echo
    echo "$PASSED passed, 0 failed"
    exit 0
fi

# ---------------------------------------------------------------- live
header "live: helm install/upgrade/uninstall on the control plane"
[ -n "${KUBECONFIG:-}" ] || die "KUBECONFIG is not set: the live chart tests need the control plane (bash e2e/run.sh runs them; or start one with bash e2e/control-plane.sh start and eval \"\$(bash e2e/control-plane.sh env)\"; --static runs only the static checks)"
kc() { "$KUBECTL" "$@"; }
kc version >/dev/null 2>&1 || die "the API server in KUBECONFIG ($KUBECONFIG) does not answer"
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
[ -x "$OPERATOR_BIN" ] || die "no operator binary at $OPERATOR_BIN"
[ -x "$BROKER_BIN" ] || die "no broker binary at $BROKER_BIN"

RUN_ID="$(python3 -c 'import secrets; print(secrets.token_hex(3))')"
SERVER="$(kc config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')"
CA_DATA="$(kc config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"

# wait_until WHAT TIMEOUT_S CMD...: poll CMD every second.
# While an operator runs (CURRENT_OP_LOG), an RBAC denial in its log fails at once.
CURRENT_OP_LOG=""
wait_until() {
    local what="$1" timeout="$2" t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ -z "$CURRENT_OP_LOG" ] || no_forbidden "$CURRENT_OP_LOG"
        ((SECONDS - t0 < timeout)) || die "timed out after ${timeout}s waiting for $what"
        sleep 1
    done
}

# Static PersistentVolumes for a cluster's claims (no provisioner on this control plane).
volumes_for() { # NS CLUSTER SIZE COUNT [CLASS]
    local ns="$1" cluster="$2" size="$3" n="$4" class="${5:-}" i
    for ((i = 0; i < n; i++)); do
        kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $ns-$cluster-$i
  labels: {warren.dev/chart-test: "$RUN_ID"}
spec:
  capacity: {storage: $size}
  accessModes: [ReadWriteOnce]
  hostPath: {path: /tmp/$ns-$cluster-$i}
  ${class:+storageClassName: $class}
  claimRef: {namespace: $ns, name: persistence-$cluster-server-$i}
EOF
    done
}
CLEANUP_CMDS+=("'$KUBECTL' delete pv -l warren.dev/chart-test=$RUN_ID --wait=false")

# On a failure, RabbitClusters left behind would hold their namespace in Terminating (their
# finalizer needs a running operator): drop the finalizers before deleting namespaces.
drop_finalizers() { # NS...
    local ns rc
    for ns in "$@"; do
        for rc in $(kc -n "$ns" get rabbitcluster -o name 2>/dev/null); do
            kc -n "$ns" patch "$rc" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
        done
    done
}

# helm_install RELEASE NAMESPACE ARGS...: install, adopting CRDs that exist without
# belonging to a release of this chart (applied by hand with `kubectl apply -f crds/`, or
# left by an earlier release: they are kept on uninstall).
helm_install() {
    local release="$1" ns="$2"
    shift 2
    local adopt=()
    local owner
    owner="$(kc get crd rabbitclusters.warren.dev -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}/{.metadata.annotations.meta\.helm\.sh/release-namespace}' 2>/dev/null || true)"
    if [[ " $* " == *" crds.install=false "* ]]; then
        :
    elif kc get crd rabbitclusters.warren.dev >/dev/null 2>&1 && [ "$owner" != "$release/$ns" ]; then
        echo "the CRDs exist (owner '${owner:-none}'): installing with --take-ownership to adopt them"
        adopt=(--take-ownership)
    fi
    # The brokers standing in for pods are local processes that the operator reaches through a
    # warren.dev/management-uri annotation on 127.0.0.1, which it refuses by default.
    "$HELM" install "$release" "$CHART" --namespace "$ns" --create-namespace --wait --timeout 3m \
        --set security.allowAnyManagementUri=true "${adopt[@]}" "$@"
}

# operator_as RELEASE NAMESPACE LOG: runs warren-operator out of cluster as the release's
# ServiceAccount, with the args of the Deployment the chart installed. Sets OP_PID, OP_PORT.
operator_as() {
    local release="$1" ns="$2" log="$3"
    local deploy sa token kcfg
    deploy="$(kc -n "$ns" get deploy -l "app.kubernetes.io/instance=$release" -o jsonpath='{.items[0].metadata.name}')"
    sa="$(kc -n "$ns" get deploy "$deploy" -o jsonpath='{.spec.template.spec.serviceAccountName}')"
    token="$(kc -n "$ns" create token "$sa" --duration=2h)"
    kcfg="$WORK/kubeconfig-$release"
    (umask 077 && cat >"$kcfg" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: warren
  cluster:
    server: $SERVER
    certificate-authority-data: $CA_DATA
users:
- name: $sa
  user:
    token: $token
contexts:
- name: warren
  context: {cluster: warren, user: $sa, namespace: $ns}
current-context: warren
EOF
)
    # The Deployment's args, one per line; --metrics-addr moves to loopback and a free port.
    OP_PORT="$(free_port)"
    local args=()
    while IFS= read -r a; do
        case "$a" in
        --metrics-addr=*) args+=("--metrics-addr=127.0.0.1:$OP_PORT") ;;
        *) args+=("$a") ;;
        esac
    done < <(kc -n "$ns" get deploy "$deploy" -o json | python3 -c 'import json,sys; [print(a) for a in json.load(sys.stdin)["spec"]["template"]["spec"]["containers"][0]["args"]]')
    echo "running $OPERATOR_BIN ${args[*]} as system:serviceaccount:$ns:$sa"
    env -u WARREN_OPERATOR_NAMESPACE KUBECONFIG="$kcfg" POD_NAME="$deploy-chart-test" POD_NAMESPACE="$ns" \
        RUST_LOG="info,warren_operator=debug" "$OPERATOR_BIN" "${args[@]}" >"$log" 2>&1 &
    OP_PID=$!
    PIDS+=("$OP_PID")
    CURRENT_OP_LOG="$log"
    wait_until "the operator's /readyz" 30 curl -fsS "http://127.0.0.1:$OP_PORT/readyz"
}

condition() { # NS NAME TYPE -> status
    kc -n "$1" get rabbitcluster "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].status}"
}
condition_message() {
    kc -n "$1" get rabbitcluster "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].message}"
}
is_ready() { # NS NAME REPLICAS
    [ "$(condition "$1" "$2" AllReplicasReady)" = True ] &&
        [ "$(kc -n "$1" get rabbitcluster "$2" -o jsonpath='{.status.readyReplicas}')" = "$3" ]
}
cond_is() { # NS NAME TYPE STATUS
    [ "$(condition "$1" "$2" "$3")" = "$4" ]
}
field_is() { # NS OBJECT JSONPATH VALUE
    [ "$(kc -n "$1" get "$2" -o jsonpath="$3")" = "$4" ]
}
message_has() { # NS NAME TYPE TEXT
    condition_message "$1" "$2" "$3" | grep -qF -- "$4"
}
# RBAC denials read `User "system:serviceaccount:..." cannot VERB resource "R" in API group "G"`.
RBAC_DENIED='cannot [a-z]+ resource'
no_forbidden() { # LOG
    if grep -qE "$RBAC_DENIED" "$1"; then
        grep -E "$RBAC_DENIED" "$1" | head -5 >&2
        die "the operator hit a Forbidden error: the chart's RBAC lacks a permission it needs (log $1)"
    fi
}

# exercise NS OPERATOR_LOG: what the operator does with the API, as the chart allows it.
exercise() {
    local ns="$1" log="$2"
    volumes_for "$ns" hello-warren 10Gi 3
    kc apply -n "$ns" -f samples/rabbitcluster-minimal.yaml >/dev/null
    wait_until "hello-warren in $ns: AllReplicasReady with 3 nodes" 180 is_ready "$ns" hello-warren 3
    pass "$ns: samples/rabbitcluster-minimal.yaml reconciled to AllReplicasReady (3 of 3)"
    for obj in statefulset/hello-warren-server service/hello-warren service/hello-warren-nodes \
        secret/hello-warren-default-user secret/hello-warren-cluster-secret configmap/hello-warren-config \
        serviceaccount/hello-warren-server poddisruptionbudget/hello-warren-server; do
        kc -n "$ns" get "$obj" >/dev/null || die "$obj missing in $ns"
    done
    [ -n "$(kc -n "$ns" get events.events.k8s.io --field-selector reason=Created -o name)" ] ||
        die "no Created Event in $ns: the operator could not write Events"
    pass "$ns: owned objects exist, Events written"

    # Growing the volumes reads the StorageClasses: no default class allows expansion here.
    kc -n "$ns" patch rabbitcluster hello-warren --type merge -p '{"spec":{"persistence":{"storage":"20Gi"}}}' >/dev/null
    wait_until "the resize to be refused for the StorageClass" 60 message_has "$ns" hello-warren ReconcileSuccess "does not allow volume expansion"
    kc -n "$ns" patch rabbitcluster hello-warren --type merge -p '{"spec":{"persistence":{"storage":"10Gi"}}}' >/dev/null
    wait_until "ReconcileSuccess again" 60 cond_is "$ns" hello-warren ReconcileSuccess True
    pass "$ns: a resize is checked against the StorageClasses (refused: no class allows expansion)"

    # Scale-down drains the node through its management API: a real broker stands in for
    # hello-warren-server-2, with the cluster's default user.
    local user pass mgmt amqp
    user="$(kc -n "$ns" get secret hello-warren-default-user -o jsonpath='{.data.username}' | base64 -d)"
    pass="$(kc -n "$ns" get secret hello-warren-default-user -o jsonpath='{.data.password}' | base64 -d)"
    amqp="$(free_port)"
    WARREN_EXTRA_ARGS=(--default-user "$user" --default-pass "$pass")
    start_warren "$BROKER_BIN" "$amqp" "$WORK/broker-$ns" "$WORK/broker-$ns.log" >/dev/null
    WARREN_EXTRA_ARGS=()
    PIDS+=("$WARREN_PID")
    mgmt="http://127.0.0.1:$WARREN_MGMT_PORT"
    wait_until "the broker's management API" 30 curl -fsS -u "$user:$pass" "$mgmt/api/overview"
    kc -n "$ns" annotate rabbitcluster hello-warren "warren.dev/management-uri=$mgmt" --overwrite >/dev/null
    kc -n "$ns" patch rabbitcluster hello-warren --type merge -p '{"spec":{"replicas":2}}' >/dev/null
    wait_until "hello-warren scaled down to 2 after a drain" 120 is_ready "$ns" hello-warren 2
    kc -n "$ns" get rabbitcluster hello-warren -o jsonpath='{.status.drainedNodes[*].pod}' | grep -q hello-warren-server-2 ||
        die "status.drainedNodes does not name hello-warren-server-2"
    curl -fsS -u "$user:$pass" "$mgmt/api/warren/drain" | grep -q '"being_drained":true' ||
        die "the broker standing in for hello-warren-server-2 was not drained"
    pass "$ns: scale-down 3 -> 2 drained the node (pods read, StatefulSet patched)"

    # A Policy reaches the broker of hello-warren (the same stand-in), and leaves it when deleted.
    kc apply -n "$ns" -f samples/policy.yaml >/dev/null
    wait_until "Policy orders-limits Ready" 60 field_is "$ns" policy/orders-limits '{.status.conditions[?(@.type=="Ready")].status}' True
    curl -fsS -u "$user:$pass" "$mgmt/api/policies/%2F/orders-limits" | grep -q 'orders' ||
        die "the broker has no policy orders-limits"
    kc -n "$ns" delete policy orders-limits --wait --timeout=60s >/dev/null
    [ "$(curl -s -o /dev/null -w '%{http_code}' -u "$user:$pass" "$mgmt/api/policies/%2F/orders-limits")" = 404 ] ||
        die "deleting the Policy did not delete it from the broker"
    pass "$ns: samples/policy.yaml written to the broker, and removed with the Policy"

    # The other topology kinds on the same broker, with the chart's RBAC: the User with a
    # generated password makes the operator create its credentials Secret.
    kc apply -n "$ns" -f samples/vhost.yaml -f samples/user.yaml -f samples/permission.yaml \
        -f samples/topicpermission.yaml -f samples/queue.yaml -f samples/exchange.yaml \
        -f samples/binding.yaml -f samples/operatorpolicy.yaml >/dev/null
    local r
    for r in vhosts.warren.dev/orders users.warren.dev/orders-app users.warren.dev/orders-monitor \
        permissions.warren.dev/orders-app topicpermissions.warren.dev/orders-app-amq-topic \
        queues.warren.dev/orders-incoming exchanges.warren.dev/orders-events \
        bindings.warren.dev/orders-created operatorpolicies.warren.dev/orders-limits-hard; do
        wait_until "$r Ready" 60 field_is "$ns" "$r" '{.status.conditions[?(@.type=="Ready")].status}' True
    done
    [ -n "$(kc -n "$ns" get secret orders-app-user-credentials -o jsonpath='{.data.password}')" ] ||
        die "no generated Secret orders-app-user-credentials"
    curl -fsS -u "$user:$pass" "$mgmt/api/permissions/orders/orders-app" | grep -q 'orders' ||
        die "the broker has no permissions of orders-app in orders"
    curl -fsS -u "$user:$pass" "$mgmt/api/vhost-limits/orders" | grep -q '"max-queues":500' ||
        die "the broker has no limits on vhost orders"
    curl -fsS -u "$user:$pass" "$mgmt/api/bindings/orders/e/orders.events/q/orders.incoming" | grep -q 'order.created' ||
        die "the broker has no binding orders.events -> orders.incoming"
    kc -n "$ns" delete bindings.warren.dev --all --wait --timeout=60s >/dev/null
    curl -fsS -u "$user:$pass" "$mgmt/api/bindings/orders/e/orders.events/q/orders.incoming" | grep -q 'order.created' &&
        die "deleting the Binding did not delete it from the broker"
    kc -n "$ns" delete operatorpolicies.warren.dev,exchanges.warren.dev,queues.warren.dev,topicpermissions.warren.dev,permissions.warren.dev,users.warren.dev,vhosts.warren.dev \
        --all --wait --timeout=60s >/dev/null
    [ "$(curl -s -o /dev/null -w '%{http_code}' -u "$user:$pass" "$mgmt/api/vhosts/orders")" = 404 ] ||
        die "deleting the Vhost did not delete it from the broker"
    pass "$ns: samples vhost/user/permission/topicpermission/queue/exchange/binding/operatorpolicy written to the broker, and removed"

    # Volume expansion: a class that allows it; the claim is resized and the StatefulSet
    # re-created with the new claim template.
    local class="chart-test-expandable-$RUN_ID"
    kc apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $class
  labels: {warren.dev/chart-test: "$RUN_ID"}
provisioner: kubernetes.io/no-provisioner
allowVolumeExpansion: true
volumeBindingMode: Immediate
EOF
    CLEANUP_CMDS+=("'$KUBECTL' delete storageclass -l warren.dev/chart-test=$RUN_ID --wait=false")
    volumes_for "$ns" vol 4Gi 1 "$class"
    kc apply -n "$ns" -f - >/dev/null <<EOF
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata:
  name: vol
spec:
  replicas: 1
  persistence: {storage: 1Gi, storageClassName: $class}
EOF
    wait_until "vol ready" 120 is_ready "$ns" vol 1
    kc -n "$ns" patch rabbitcluster vol --type merge -p '{"spec":{"persistence":{"storage":"2Gi"}}}' >/dev/null
    wait_until "the claim of vol resized to 2Gi" 120 field_is "$ns" pvc/persistence-vol-server-0 '{.spec.resources.requests.storage}' 2Gi
    wait_until "vol's StatefulSet re-created with a 2Gi claim template" 120 field_is "$ns" statefulset/vol-server '{.spec.volumeClaimTemplates[0].spec.resources.requests.storage}' 2Gi
    wait_until "vol ready again" 120 is_ready "$ns" vol 1
    pass "$ns: volume expansion resized the claim and re-created the StatefulSet"
    no_forbidden "$log"
    pass "$ns: the operator's log has no Forbidden error"
}

# ---- cluster scope
OP_NS="warren-chart-$RUN_ID"
APPS_NS="warren-chart-apps-$RUN_ID"
CLEANUP_CMDS+=("'$HELM' uninstall warren -n $OP_NS --wait" "drop_finalizers $OP_NS $APPS_NS" "'$KUBECTL' delete namespace $OP_NS $APPS_NS --wait=false")
helm_install warren "$OP_NS" >"$WORK/helm-install.out" 2>&1 || { cat "$WORK/helm-install.out"; die "helm install failed"; }
for crd in rabbitclusters policies federations shovels vhosts users permissions topicpermissions queues exchanges bindings operatorpolicies; do
    kc wait --for=condition=Established "crd/$crd.warren.dev" --timeout=60s >/dev/null
    [ "$(kc get crd "$crd.warren.dev" -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}')" = warren ] ||
        die "CRD $crd.warren.dev is not managed by the release"
done
[ "$(kc -n "$OP_NS" get deploy warren-warren-operator -o jsonpath='{.status.readyReplicas}')" = 1 ] ||
    die "the operator Deployment is not ready"
pass "helm install (cluster scope): CRDs established and owned by the release, Deployment ready"

kc create namespace "$APPS_NS" >/dev/null
operator_as warren "$OP_NS" "$WORK/operator-cluster.log"
[ "$(kc -n "$OP_NS" get lease warren-warren-operator -o jsonpath='{.spec.holderIdentity}')" = warren-warren-operator-chart-test ] ||
    die "the operator did not take the Lease warren-warren-operator in $OP_NS"
pass "cluster scope: the operator (ServiceAccount token) leads through the Lease in $OP_NS"
exercise "$APPS_NS" "$WORK/operator-cluster.log"

"$HELM" upgrade warren "$CHART" --namespace "$OP_NS" --reuse-values --set replicaCount=2 \
    --set logFormat=text --wait --timeout 3m >"$WORK/helm-upgrade.out" 2>&1 || { cat "$WORK/helm-upgrade.out"; die "helm upgrade failed"; }
[ "$(kc -n "$OP_NS" get deploy warren-warren-operator -o jsonpath='{.status.readyReplicas}')" = 2 ] ||
    die "after the upgrade the Deployment does not have 2 ready replicas"
kc -n "$OP_NS" get pdb warren-warren-operator >/dev/null || die "no PodDisruptionBudget after the upgrade to 2 replicas"
kc -n "$OP_NS" get deploy warren-warren-operator -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q -- '--log-format=text' ||
    die "the upgrade did not change the operator's flags"
[ "$("$HELM" history warren -n "$OP_NS" -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 2 ] ||
    die "helm history does not show 2 revisions"
kc -n "$APPS_NS" patch rabbitcluster hello-warren --type merge -p '{"spec":{"replicas":3}}' >/dev/null
wait_until "hello-warren back to 3 after the upgrade" 120 is_ready "$APPS_NS" hello-warren 3
no_forbidden "$WORK/operator-cluster.log"
pass "helm upgrade: 2 replicas, PodDisruptionBudget, new flags; the operator keeps reconciling"

# ---- namespace scope, second release, CRDs from the first
NS_NS="warren-chart-ns-$RUN_ID"
# A second watched namespace (rbac.watchNamespaces: a Role in each, --namespace a,b).
NS2_NS="warren-chart-ns2-$RUN_ID"
CLEANUP_CMDS+=("'$HELM' uninstall warren-team -n $NS_NS --wait" "drop_finalizers $NS_NS $NS2_NS" "'$KUBECTL' delete namespace $NS_NS $NS2_NS --wait=false")
kc create namespace "$NS2_NS" >/dev/null
helm_install warren-team "$NS_NS" --set rbac.scope=namespace --set crds.install=false \
    --set "rbac.watchNamespaces={$NS_NS,$NS2_NS}" \
    >"$WORK/helm-install-ns.out" 2>&1 || { cat "$WORK/helm-install-ns.out"; die "helm install (namespace scope) failed"; }
pass "helm install (namespace scope over two namespaces, crds.install=false) next to the first release"
SA_NS="system:serviceaccount:$NS_NS:warren-team-warren-operator"
[ "$(kc auth can-i list rabbitclusters.warren.dev -n "$APPS_NS" --as "$SA_NS")" = no ] ||
    die "the namespace-scoped ServiceAccount can list RabbitClusters in $APPS_NS"
[ "$(kc auth can-i list secrets -n "$APPS_NS" --as "$SA_NS")" = no ] ||
    die "the namespace-scoped ServiceAccount can list Secrets in $APPS_NS"
[ "$(kc auth can-i list secrets -n "$NS_NS" --as "$SA_NS")" = yes ] ||
    die "the namespace-scoped ServiceAccount cannot list Secrets in its own namespace"
[ "$(kc auth can-i patch vhosts.warren.dev/status -n "$NS2_NS" --as "$SA_NS")" = yes ] ||
    die "the namespace-scoped ServiceAccount cannot patch Vhost status in its second namespace"
kc -n "$NS_NS" get deploy warren-team-warren-operator -o jsonpath='{.spec.template.spec.containers[0].args}' |
    grep -qF -- "--namespace=$NS_NS,$NS2_NS" || die "the operator is not given --namespace=$NS_NS,$NS2_NS"
pass "namespace scope: the ServiceAccount reaches its two namespaces only"
# The cluster-scoped operator would reconcile this namespace too: remove its clusters (the
# finalizer needs it) and stop it.
kc -n "$APPS_NS" delete rabbitcluster --all --wait --timeout=60s >/dev/null
stop_warren "$OP_PID"
operator_as warren-team "$NS_NS" "$WORK/operator-namespace.log"
# The second namespace is watched with the chart's RBAC: a Vhost there is reconciled (its
# connection Secret is missing, which the operator reports in its status; retain lets it go
# without a broker).
kc apply -n "$NS2_NS" -f - >/dev/null <<EOF
apiVersion: warren.dev/v1alpha1
kind: Vhost
metadata: {name: second}
spec: {connectionSecret: {name: missing}, deletionPolicy: retain}
EOF
wait_until "the Vhost in $NS2_NS reconciled" 60 field_is "$NS2_NS" vhost/second '{.status.conditions[?(@.type=="Ready")].reason}' SecretNotFound
no_forbidden "$WORK/operator-namespace.log"
kc -n "$NS2_NS" delete vhost second --wait --timeout=60s >/dev/null
pass "namespace scope: the operator reconciles the second watched namespace"
exercise "$NS_NS" "$WORK/operator-namespace.log"

# ---- uninstall
kc -n "$NS_NS" delete rabbitcluster --all --wait --timeout=60s >/dev/null
stop_warren "$OP_PID"
for rel in "warren-team:$NS_NS" "warren:$OP_NS"; do
    "$HELM" uninstall "${rel%%:*}" --namespace "${rel#*:}" --wait --timeout 2m >/dev/null
    [ -z "$(kc -n "${rel#*:}" get deploy,sa,role,rolebinding,service,configmap -l "app.kubernetes.io/instance=${rel%%:*}" -o name)" ] ||
        die "objects of release ${rel%%:*} remain after helm uninstall"
    [ -z "$(kc get clusterrole,clusterrolebinding -l "app.kubernetes.io/instance=${rel%%:*}" -o name)" ] ||
        die "cluster-scoped RBAC of release ${rel%%:*} remains after helm uninstall"
done
for crd in rabbitclusters policies federations shovels vhosts users permissions topicpermissions queues exchanges bindings operatorpolicies; do
    kc get crd "$crd.warren.dev" >/dev/null || die "CRD $crd.warren.dev was deleted by helm uninstall (crds.keep is on)"
done
pass "helm uninstall: Deployment, ServiceAccount, RBAC, Service, dashboards gone; CRDs kept"

echo
echo "$PASSED passed, 0 failed"
