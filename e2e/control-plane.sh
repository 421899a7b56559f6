#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, built from source.
#
#   e2e/control-plane.sh build         build etcd, kube-apiserver,
#                                      kube-controller-manager, kube-scheduler
#                                      and kwok (once per pinned version,
#                                      cached outside the checkout)
#   e2e/control-plane.sh start         start them on 127.0.0.1 (idempotent),
#                                      create the fake kwok nodes, write the
#                                      admin kubeconfig
#   e2e/control-plane.sh stop [--wipe] stop everything; --wipe also deletes
#                                      the state dir
#   e2e/control-plane.sh env           print `export KUBECONFIG=...`
#   e2e/control-plane.sh status        print which components run
#
# No kubelet and no container runtime: kwok plays the nodes. It marks the fake
# Nodes Ready and moves every Pod the real kube-scheduler binds to them through
# Pending -> Running/Ready, so StatefulSets, Deployments, RBAC, admission and
# the garbage collector all behave as in a real cluster, but no image is
# pulled and no container runs. Pod IPs (10.0.0.x, from kwok) and Service
# IPs (10.96.0.0/16) are bookkeeping only: nothing listens there and nothing
# routes there, so tests must never connect to them.
#
# start/smoke use kubectl from scripts/kubetools.sh (PyPI); openssl comes from
# apt-get if missing.
#
# Everything comes from the Go module proxy: k8s.io/kubernetes is built from a
# throwaway module that replaces its staging modules (k8s.io/api,
# k8s.io/client-go, ... required as v0.0.0) with their published v0.X.Y tags.
#
# Environment:
#   WARREN_CACHE      cache root (default ~/.cache/warren); binaries go to
#                     $WARREN_CACHE/k8s/<tag>/bin
#   WARREN_K8S_DIR    state dir: data, certs, logs, pid files, kubeconfig
#                     (default /tmp/warren-k8s)
#   WARREN_K8S_ETCD_PORT / WARREN_K8S_ETCD_PEER_PORT    (23790 / 23800)
#   WARREN_K8S_API_PORT                                 (16443)
#   WARREN_K8S_KCM_PORT / WARREN_K8S_SCHED_PORT         (10357 / 10359)
#   WARREN_K8S_NODES  number of fake nodes (3)
set -euo pipefail

# lib.sh sets WARREN_CACHE to its own default: keep a caller's value.
_caller_cache="${WARREN_CACHE:-}"
# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
WARREN_CACHE="${_caller_cache:-$WARREN_CACHE}"

# ---- pins --------------------------------------------------------------------
# Kubernetes 1.33 is tested against etcd 3.5.21 (the go.etcd.io/etcd/* v3.5.21
# requirements in k8s.io/kubernetes' go.mod). kwok v0.7.0 is built against
# k8s.io/client-go v0.33.
K8S_VERSION="${WARREN_K8S_VERSION:-v1.33.13}"
ETCD_VERSION="${WARREN_ETCD_VERSION:-v3.5.21}"
KWOK_VERSION="${WARREN_KWOK_VERSION:-v0.7.0}"

K8S_TAG="k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
K8S_HOME="$WARREN_CACHE/k8s/$K8S_TAG"
K8S_BIN="$K8S_HOME/bin"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

# ---- runtime settings ----------------------------------------------------------
STATE="${WARREN_K8S_DIR:-/tmp/warren-k8s}"
ETCD_PORT="${WARREN_K8S_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${WARREN_K8S_ETCD_PEER_PORT:-23800}"
API_PORT="${WARREN_K8S_API_PORT:-16443}"
KCM_PORT="${WARREN_K8S_KCM_PORT:-10357}"
SCHED_PORT="${WARREN_K8S_SCHED_PORT:-10359}"
NODES="${WARREN_K8S_NODES:-3}"
KUBECONFIG_FILE="$STATE/kubeconfig"
# Order of start; stop goes the other way.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

log() { printf '[control-plane] %s\n' "$*" >&2; }

# ==== build =====================================================================

need_go() {
    command -v go >/dev/null 2>&1 || die "go not found: Go >= 1.24 is needed to build the control plane"
    local v
    v="$(go env GOVERSION)" # go1.26.8
    v="${v#go}"
    local major="${v%%.*}" rest="${v#*.}"
    local minor="${rest%%.*}"
    if ((major < 1 || (major == 1 && minor < 24))); then
        die "Go $v is too old: Go >= 1.24 is needed (k8s.io/kubernetes $K8S_VERSION says go 1.24)"
    fi
}

# go_build_env ARGS...: the go command as the builds run it. Module mode, no
# workspace, no cgo (static binaries), default GOPATH/GOMODCACHE so the module
# cache is shared with every other Go build on the machine. nice: a 2-core box
# stays usable while kube-apiserver compiles.
go_build_env() {
    env GOWORK=off GO111MODULE=on CGO_ENABLED=0 nice -n 10 go "$@"
}

# module_dir MODULE@VERSION: download a module, print its dir in the module cache.
module_dir() {
    GOWORK=off GO111MODULE=on go mod download -json "$1" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

# new_module_dir NAME: a fresh throwaway module dir $K8S_HOME/src/NAME.
new_module_dir() {
    local d="$K8S_HOME/src/$1"
    rm -rf "$d"
    mkdir -p "$d"
    echo "$d"
}

build_etcd() {
    [[ -x "$K8S_BIN/etcd" ]] && return 0
    header "building etcd $ETCD_VERSION"
    local d
    d="$(new_module_dir etcd)"
    # etcd's own go.mod has `replace` directives pointing at sibling dirs; as a
    # dependency those are ignored and its versioned requirements (all
    # $ETCD_VERSION) are used, so a plain require is enough.
    cat >"$d/go.mod" <<EOF
module warren.local/etcd

go 1.23.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
    cat >"$d/main.go" <<'EOF'
// etcd, as the upstream binary: etcdmain is what etcd's own main calls.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
    (cd "$d" && go_build_env build -mod=mod -trimpath -ldflags "-s -w" -o "$d/etcd.out" .)
    mv "$d/etcd.out" "$K8S_BIN/etcd"
}

build_kwok() {
    [[ -x "$K8S_BIN/kwok" ]] && return 0
    header "building kwok $KWOK_VERSION"
    local d
    d="$(new_module_dir kwok)"
    # sigs.k8s.io/kwok has no replace directives; its defaults (version
    # strings, embedded stage configs) are compiled in.
    cat >"$d/go.mod" <<EOF
module warren.local/kwok

go 1.24.0

require sigs.k8s.io/kwok $KWOK_VERSION
EOF
    (cd "$d" && go_build_env build -mod=mod -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
        -o "$d/kwok.out" sigs.k8s.io/kwok/cmd/kwok)
    mv "$d/kwok.out" "$K8S_BIN/kwok"
}

build_kube() {
    if [[ -x "$K8S_BIN/kube-apiserver" && -x "$K8S_BIN/kube-controller-manager" && -x "$K8S_BIN/kube-scheduler" ]]; then
        return 0
    fi
    header "building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION"
    local src info
    src="$(module_dir "k8s.io/kubernetes@$K8S_VERSION")"
    [[ -f "$src/go.mod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
    # Staging modules: k8s.io/kubernetes requires them as v0.0.0 and replaces
    # them with ./staging/src/k8s.io/X. Those replaces only apply in its own
    # repo, so point each one at its published tag v0.<minor>.<patch>.
    local staging_ver="v0.${K8S_VERSION#v1.}"
    local staging
    staging="$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$src/go.mod")"
    [[ -n "$staging" ]] || die "no staging replace directives found in $src/go.mod"
    local d
    d="$(new_module_dir kubernetes)"
    {
        echo "module warren.local/kubernetes"
        echo
        echo "go 1.24.0"
        echo
        # Same GODEBUG defaults as the upstream binaries.
        grep '^godebug ' "$src/go.mod" || true
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "replace ("
        local m
        for m in $staging; do
            echo "	$m => $m $staging_ver"
        done
        echo ")"
    } >"$d/go.mod"
    # Version stamps, as hack/lib/version.sh sets them: clients (helm, kubectl,
    # client-go discovery) read the server's /version.
    info="$(GOWORK=off go mod download -json "k8s.io/kubernetes@$K8S_VERSION")"
    local commit date
    commit="$(sed -n 's/^[[:space:]]*"Hash": "\(.*\)",*$/\1/p' <<<"$info" | head -1)"
    date="$(sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' "$(sed -n 's/^[[:space:]]*"Info": "\(.*\)",$/\1/p' <<<"$info")" | head -1)"
    date="${date%%.*}"
    date="${date%Z}Z"
    local minor="${K8S_VERSION#v1.}"
    minor="${minor%%.*}"
    local ld="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$K8S_VERSION"
        ld+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ld+=" -X $pkg.gitCommit=${commit:-unknown} -X $pkg.gitTreeState=clean"
        ld+=" -X $pkg.buildDate=${date:-1970-01-01T00:00:00Z}"
    done
    mkdir -p "$d/out"
    # One go build for the three commands: they share most packages.
    (cd "$d" && go_build_env build -mod=mod -trimpath -ldflags "$ld" -o "$d/out/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler)
    local b
    for b in kube-apiserver kube-controller-manager kube-scheduler; do
        mv "$d/out/$b" "$K8S_BIN/$b"
    done
}

cmd_build() {
    local stamp="$K8S_BIN/.stamp"
    local want="k8s=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION bins=${BINARIES[*]}"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        local b ok=1
        for b in "${BINARIES[@]}"; do [[ -x "$K8S_BIN/$b" ]] || ok=0; done
        if ((ok)); then
            log "binaries up to date in $K8S_BIN ($want)"
            return 0
        fi
    fi
    need_go
    mkdir -p "$K8S_BIN"
    local t0=$SECONDS
    build_etcd
    build_kwok
    build_kube
    "$K8S_BIN/kube-apiserver" --version | grep -qx "Kubernetes $K8S_VERSION" ||
        die "kube-apiserver --version does not say $K8S_VERSION: $("$K8S_BIN/kube-apiserver" --version)"
    echo "$want" >"$stamp"
    # The throwaway modules are only needed to build; go.mod/go.sum stay for
    # reference, build outputs were moved to bin/.
    log "built in $((SECONDS - t0)) s: $K8S_BIN"
}

# ==== start / stop / status ====================================================

pid_file() { echo "$STATE/run/$1.pid"; }
log_file() { echo "$STATE/logs/$1.log"; }

# running NAME: true if NAME's pid file names a live process of that binary.
running() {
    local pf pid
    pf="$(pid_file "$1")"
    [[ -f "$pf" ]] || return 1
    pid="$(cat "$pf" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled pid: the process must run our binary.
    [[ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" == "$1" ]]
}

# https_ok URL: true if URL answers "ok" (healthz style). TLS is not verified:
# only used for loopback health endpoints, which allow anonymous access.
https_ok() {
    python3 - "$1" <<'EOF' 2>/dev/null
import ssl, sys, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], context=ssl._create_unverified_context(), timeout=3)
    sys.exit(0 if r.read().strip() == b"ok" else 1)
except Exception:
    sys.exit(1)
EOF
}

# launch NAME ARGS...: start $K8S_BIN/NAME in its own session (so it outlives
# the calling shell and its process group), log to logs/NAME.log, pid to
# run/NAME.pid. Skips it if it already runs.
launch() {
    local name="$1"
    shift
    if running "$name"; then
        log "$name already running (pid $(cat "$(pid_file "$name")"))"
        return 0
    fi
    local lf pf
    lf="$(log_file "$name")"
    pf="$(pid_file "$name")"
    {
        echo
        echo "==== $(date -u +%FT%TZ) starting $name ===="
    } >>"$lf"
    # setsid may fork (when we lead a process group), so the pid is written
    # by the process itself just before exec.
    # shellcheck disable=SC2016  # $$ and $@ expand in the inner bash
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pf" "$K8S_BIN/$name" "$@" \
        </dev/null >>"$lf" 2>&1 &
    local i
    for i in $(seq 1 50); do
        [[ -s "$pf" ]] && break
        sleep 0.1
    done
    log "$name started (pid $(cat "$pf" 2>/dev/null || echo '?'), log $lf)"
}

# wait_for WHAT TIMEOUT_S COMPONENT CMD...: poll CMD every second; die with
# COMPONENT's log tail if COMPONENT dies or the timeout passes.
wait_for() {
    local what="$1" timeout="$2" comp="$3"
    shift 3
    local t0=$SECONDS
    until "$@"; do
        if ! running "$comp"; then
            tail -n 40 "$(log_file "$comp")" >&2 || true
            die "$comp exited while waiting for $what (log: $(log_file "$comp"))"
        fi
        if ((SECONDS - t0 >= timeout)); then
            tail -n 40 "$(log_file "$comp")" >&2 || true
            die "timed out after ${timeout}s waiting for $what (log: $(log_file "$comp"))"
        fi
        sleep 1
    done
    log "$what: ok after $((SECONDS - t0)) s"
}

ensure_openssl() {
    command -v openssl >/dev/null 2>&1 && return 0
    log "openssl not found: installing it with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; } >&2 ||
        die "openssl is missing and could not be installed"
}

# ca NAME CN: a self-signed CA (key + certificate).
ca() {
    local name="$1" cn="$2" p="$STATE/pki"
    [[ -f "$p/$name.crt" && -f "$p/$name.key" ]] && return 0
    openssl genrsa -out "$p/$name.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$p/$name.key" -subj "/CN=$cn" -days 3650 -sha256 \
        -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[v3_ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature,keyEncipherment,keyCertSign\nsubjectKeyIdentifier=hash\n') \
        -extensions v3_ca -out "$p/$name.crt"
}

# cert NAME CN O EXTENSIONS [CA]: key + certificate signed by CA (default:
# the cluster CA "ca").
cert() {
    local name="$1" cn="$2" o="$3" ext="$4" ca="${5:-ca}" p="$STATE/pki"
    [[ -f "$p/$name.crt" && -f "$p/$name.key" ]] && return 0
    local subj="/CN=$cn"
    [[ -n "$o" ]] && subj="/O=$o$subj"
    openssl genrsa -out "$p/$name.key" 2048 2>/dev/null
    openssl req -new -key "$p/$name.key" -subj "$subj" -out "$p/$name.csr" \
        -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n')
    openssl x509 -req -in "$p/$name.csr" -CA "$p/$ca.crt" -CAkey "$p/$ca.key" \
        -CAserial "$p/$ca.srl" -CAcreateserial -days 3650 -sha256 \
        -extfile <(printf '[v3]\n%s\n' "$ext") -extensions v3 \
        -out "$p/$name.crt" 2>/dev/null
    rm -f "$p/$name.csr"
}

# All PKI of the cluster, generated once per state dir.
gen_pki() {
    ensure_openssl
    local p="$STATE/pki"
    mkdir -p "$p"
    chmod 700 "$p"
    [[ -f "$p/ca.crt" ]] || log "generating PKI in $p"
    ca ca warren-k8s-ca
    # Front-proxy (aggregation layer) CA, as kubeadm sets it up: without
    # --requestheader-client-ca-file the controller-manager and scheduler
    # log errors about the extension-apiserver-authentication ConfigMap.
    ca front-proxy-ca warren-k8s-front-proxy-ca
    local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    # Serving cert: loopback plus the in-cluster names and the first service
    # IP of 10.96.0.0/16 (the `kubernetes` Service), as kubeadm does.
    cert apiserver kube-apiserver "" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    # Identities: admin is cluster-admin through the system:masters group;
    # controller-manager and scheduler get their bootstrap RBAC roles by name.
    cert admin admin system:masters "$client"
    cert controller-manager system:kube-controller-manager "" "$client"
    cert scheduler system:kube-scheduler "" "$client"
    cert front-proxy-client front-proxy-client "" "$client" front-proxy-ca
    # The API server's identity towards kubelets (logs, exec, port-forward on the real node
    # of e2e/kubelet.sh, which authenticates callers by the cluster CA).
    cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters "$client"
    # Service-account token signing key pair.
    if [[ ! -f "$p/sa.key" ]]; then
        openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
        openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
    fi
    chmod 600 "$p"/*.key
}

# kubeconfig FILE CERT_NAME: kubeconfig with embedded CA and client cert.
kubeconfig() {
    local f="$1" n="$2" p="$STATE/pki"
    : >"$f.tmp"
    chmod 600 "$f.tmp"
    cat >"$f.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: warren-k8s
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 <"$p/ca.crt")
users:
- name: $n
  user:
    client-certificate-data: $(base64 -w0 <"$p/$n.crt")
    client-key-data: $(base64 -w0 <"$p/$n.key")
contexts:
- name: warren-k8s
  context:
    cluster: warren-k8s
    user: $n
current-context: warren-k8s
EOF
    mv "$f.tmp" "$f"
}

# kubectl from scripts/kubetools.sh (installed and cached by it).
KUBECTL=""
ensure_kubectl() {
    [[ -n "$KUBECTL" ]] && return 0
    local bin
    bin="$(bash "$WARREN_ROOT/scripts/kubetools.sh" | tail -1)"
    KUBECTL="$bin/kubectl"
    [[ -x "$KUBECTL" ]] || die "kubectl not found in $bin"
}
kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# Fake nodes for kwok: it manages only nodes with the annotation below. Big
# allocatable, no taints, so the real scheduler places pods on them.
fake_nodes_yaml() {
    local i
    for ((i = 0; i < NODES; i++)); do
        cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: kwok-node-$i
    topology.kubernetes.io/zone: zone-$i
spec: {}
status:
  capacity: {cpu: "64", memory: 256Gi, pods: "250", ephemeral-storage: 1Ti}
  allocatable: {cpu: "64", memory: 256Gi, pods: "250", ephemeral-storage: 1Ti}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kubeletVersion: fake
    kubeProxyVersion: fake
EOF
    done
}

# nodes_ready: all fake nodes exist, are Ready and carry no taint (the
# not-ready NoSchedule taint added at registration is removed by the node
# lifecycle controller once kwok reports Ready).
nodes_ready() {
    local out
    out="$(kc get nodes -l type=kwok -o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.spec.taints}{"\n"}{end}' 2>/dev/null)" || return 1
    [[ "$(grep -c ' True $' <<<"$out")" -eq "$NODES" ]] || return 1
    # ... and the running kwok holds their leases (start deletes stale ones,
    # so a Ready status left in etcd by an earlier run does not count).
    local leases
    leases="$(kc -n kube-node-lease get leases -o name 2>/dev/null)" || return 1
    [[ "$(grep -c '^lease.coordination.k8s.io/kwok-node-' <<<"$leases")" -eq "$NODES" ]]
}

api_ready() { https_ok "https://127.0.0.1:$API_PORT/readyz"; }
etcd_ready() { port_open "$ETCD_PORT"; }
kcm_ready() { https_ok "https://127.0.0.1:$KCM_PORT/healthz"; }
sched_ready() { https_ok "https://127.0.0.1:$SCHED_PORT/healthz"; }

all_healthy() {
    local c
    for c in "${COMPONENTS[@]}"; do running "$c" || return 1; done
    api_ready && kcm_ready && sched_ready && nodes_ready
}

print_env() {
    echo "export KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_start() {
    [[ $# -eq 0 ]] || die "start takes no arguments"
    local t0=$SECONDS
    mkdir -p "$STATE"/{run,logs,etcd}
    chmod 700 "$STATE/etcd"
    ensure_kubectl
    if [[ -f "$KUBECONFIG_FILE" ]] && all_healthy; then
        log "already running and healthy (state $STATE)"
        print_env
        return 0
    fi
    gen_pki
    local p="$STATE/pki"
    kubeconfig "$KUBECONFIG_FILE" admin
    kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
    kubeconfig "$STATE/scheduler.kubeconfig" scheduler

    # etcd: single member, plain HTTP on loopback. --unsafe-no-fsync: a
    # throwaway test cluster does not need durable writes, and fsync on a
    # busy CI disk makes the apiserver slow.
    launch etcd \
        --name warren-k8s \
        --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "warren-k8s=http://127.0.0.1:$ETCD_PEER_PORT" \
        --unsafe-no-fsync \
        --log-level warn
    wait_for "etcd on 127.0.0.1:$ETCD_PORT" 30 etcd etcd_ready

    # kube-apiserver. Admission: the default set plus NodeRestriction. All
    # of them work without kubelets (TaintNodesByCondition's not-ready taint
    # is lifted by the node lifecycle controller once kwok marks nodes Ready).
    # --endpoint-reconciler-type=none: the `kubernetes` Service endpoints
    # would be 127.0.0.1, which Endpoints validation rejects (loopback).
    launch kube-apiserver \
        --bind-address 127.0.0.1 \
        --advertise-address 127.0.0.1 \
        --secure-port "$API_PORT" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --tls-cert-file "$p/apiserver.crt" \
        --tls-private-key-file "$p/apiserver.key" \
        --client-ca-file "$p/ca.crt" \
        --requestheader-client-ca-file "$p/front-proxy-ca.crt" \
        --requestheader-allowed-names front-proxy-client \
        --requestheader-username-headers X-Remote-User \
        --requestheader-group-headers X-Remote-Group \
        --requestheader-extra-headers-prefix X-Remote-Extra- \
        --proxy-client-cert-file "$p/front-proxy-client.crt" \
        --proxy-client-key-file "$p/front-proxy-client.key" \
        --authorization-mode Node,RBAC \
        --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,NodeRestriction,Priority,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
        --service-cluster-ip-range 10.96.0.0/16 \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$p/sa.pub" \
        --service-account-signing-key-file "$p/sa.key" \
        --allow-privileged=true \
        --kubelet-client-certificate "$p/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$p/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types InternalIP,Hostname \
        --endpoint-reconciler-type none \
        --profiling=false \
        --v 1
    wait_for "kube-apiserver /readyz on 127.0.0.1:$API_PORT" 120 kube-apiserver api_ready

    # kube-controller-manager: every default controller (garbage collector,
    # statefulset, namespace, serviceaccount-token, node lifecycle, ...),
    # each under its own service account, as in a real cluster.
    launch kube-controller-manager \
        --kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 \
        --secure-port "$KCM_PORT" \
        --controllers '*' \
        --use-service-account-credentials=true \
        --service-account-private-key-file "$p/sa.key" \
        --root-ca-file "$p/ca.crt" \
        --cluster-signing-cert-file "$p/ca.crt" \
        --cluster-signing-key-file "$p/ca.key" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --leader-elect=false \
        --profiling=false \
        --v 1
    # A pod found unschedulable (e.g. its claim not bound yet) waits for an event that may
    # make it schedulable; if that requeue is missed it would wait 5 minutes for the periodic
    # flush. CI once saw a pod with a pre-bound volume stay unscheduled past a 120 s wait and
    # be scheduled at the next PV event: flush after 15 s instead. --v 2 logs why a pod
    # could not be scheduled.
    launch kube-scheduler \
        --kubeconfig "$STATE/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 \
        --secure-port "$SCHED_PORT" \
        --leader-elect=false \
        --profiling=false \
        --pod-max-in-unschedulable-pods-duration 15s \
        --v 2
    wait_for "kube-controller-manager /healthz on 127.0.0.1:$KCM_PORT" 60 kube-controller-manager kcm_ready
    wait_for "kube-scheduler /healthz on 127.0.0.1:$SCHED_PORT" 60 kube-scheduler sched_ready

    # kwok: plays the kubelets of the annotated fake nodes. No --config
    # stages: kwok then uses its built-in node-initialize/heartbeat (with
    # node leases) and pod-ready/complete/delete stages, which take pods bound
    # to its nodes to Running/Ready at once. The (empty) config file keeps a
    # ~/.kwok/kwok.yaml of the user out of it. No kubelet server is exposed
    # (no --server-address/--node-port): logs/exec are not available.
    if ! running kwok; then
        # Node leases of an earlier kwok are held under its random identity
        # until they expire (40 s); the new kwok would not manage those
        # nodes (no pod gets Ready) until then. Nobody else holds them.
        local old
        old="$(kc get nodes -l type=kwok -o jsonpath='{.items[*].metadata.name}')"
        if [[ -n "$old" ]]; then
            # shellcheck disable=SC2086  # node names, split on spaces
            kc -n kube-node-lease delete leases $old --ignore-not-found >&2
        fi
    fi
    cat >"$STATE/kwok.yaml" <<'EOF'
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options: {}
EOF
    launch kwok \
        --config "$STATE/kwok.yaml" \
        --kubeconfig "$KUBECONFIG_FILE" \
        --manage-all-nodes=false \
        --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
        --node-lease-duration-seconds 40
    fake_nodes_yaml | kc apply -f - >&2
    wait_for "$NODES kwok nodes Ready and untainted" 120 kwok nodes_ready
    log "control plane ready in $((SECONDS - t0)) s (state $STATE)"
    print_env
}

# stop_one NAME: TERM, then KILL after 15 s.
stop_one() {
    local name="$1" pf pid
    pf="$(pid_file "$name")"
    if running "$name"; then
        pid="$(cat "$pf")"
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) did not stop on TERM: KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "$name stopped"
    fi
    rm -f "$pf"
}

cmd_stop() {
    local wipe=0
    case "${1:-}" in
    "") ;;
    --wipe) wipe=1 ;;
    *) die "usage: $0 stop [--wipe]" ;;
    esac
    local i
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        stop_one "${COMPONENTS[$i]}"
    done
    if ((wipe)); then
        case "$STATE" in
        "" | / | "$HOME" | "$WARREN_ROOT") die "refusing to wipe state dir '$STATE'" ;;
        esac
        rm -rf "$STATE"
        log "wiped $STATE"
    fi
}

cmd_env() {
    print_env
}

cmd_status() {
    local c rc=0
    for c in "${COMPONENTS[@]}"; do
        if running "$c"; then
            printf '%-24s running (pid %s)\n' "$c" "$(cat "$(pid_file "$c")")"
        else
            printf '%-24s stopped\n' "$c"
            rc=1
        fi
    done
    if api_ready; then
        printf '%-24s ok (https://127.0.0.1:%s)\n' "apiserver /readyz" "$API_PORT"
    else
        printf '%-24s not ready\n' "apiserver /readyz"
        rc=1
    fi
    echo "state dir: $STATE"
    echo "binaries:  $K8S_BIN"
    return "$rc"
}

# ==== main ======================================================================

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
    build) cmd_build "$@" ;;
    start)
        # A no-op when the binaries are cached (builds them otherwise).
        cmd_build
        cmd_start "$@"
        ;;
    stop) cmd_stop "$@" ;;
    env) cmd_env "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 >&2 ;;
    esac
}

main "$@"
