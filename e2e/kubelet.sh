#!/usr/bin/env bash
# A real node for the e2e control plane: containerd + runc + bridge CNI + a kubelet built
# from source, and CoreDNS for the cluster's DNS names.
#
#   e2e/kubelet.sh build         build kubelet and coredns (once per pinned version, cached
#                                outside the checkout) and the pause image
#   e2e/kubelet.sh start         start containerd, coredns and the kubelet against the
#                                control plane of e2e/control-plane.sh (which must run),
#                                import the images, wait for the Node to be Ready
#   e2e/kubelet.sh stop [--wipe] kill every pod container, the kubelet, containerd, coredns;
#                                delete the bridge; --wipe also deletes the state dir
#   e2e/kubelet.sh env           print the environment the real-pod tests read
#   e2e/kubelet.sh status        print which components run
#
# The node is called warren-kubelet (WARREN_KUBELET_NODE), carries the label
# warren.dev/real-node=true and the taint warren.dev/real-node=true:NoSchedule: the kwok
# nodes keep the scale tests, and only pods that tolerate the taint (the real-pod tests')
# land here.
#
# Isolation from the host:
# - containerd runs with its own config, root, state dir and socket under the state dir
#   (no clash with a system containerd or podman), CNI config dir private, CNI binaries from
#   /usr/lib/cni (Debian's containernetworking-plugins), host-local IPAM data in the state dir.
# - containerd, coredns and the kubelet all run in one private mount namespace (held by a
#   `sleep` process): every mount they make (pod volumes, container root filesystems, the
#   network namespaces' bind mounts) lives and dies with it, nothing propagates to the host.
# - protectKernelDefaults: true. The kubelet then refuses to start unless vm.overcommit_memory
#   = 1, kernel.panic = 10 and kernel.panic_on_oops = 1; it would otherwise *set* them, which
#   this script must not do to the VM. In the private mount namespace, three files bound over
#   /proc/sys/{vm/overcommit_memory,kernel/panic,kernel/panic_on_oops} show it the values it
#   wants; the real sysctls are untouched (so the node does not really overcommit memory as
#   the kubelet assumes; irrelevant for tests).
# - The bridge warren0 (10.244.0.1/24 by default, WARREN_KUBELET_POD_CIDR) is created here
#   and deleted by stop. No masquerading, no iptables rules, no port mappings: pods reach
#   each other and the host, the host reaches them through the bridge.
#
# DNS: CoreDNS (github.com/coredns/coredns from the Go module proxy) on the bridge's address,
# port 53, with the kubernetes plugin reading the control plane's Services and
# EndpointSlices, is the pods' nameserver (kubelet clusterDNS, clusterDomain cluster.local).
# So `<pod>.<name>-nodes.<ns>.svc` resolves in a pod exactly as on a real cluster (through the
# search path) for every pod the StatefulSet's headless Service lists, and follows pods as
# they come and go. hostAliases were rejected: a pod's IP is known only after it starts, so
# the operator would have to rewrite every pod to learn its peers. No kube-proxy: Service
# ClusterIPs do not route; tests connect to pod IPs.
#
# Installs what it uses with apt-get when missing: containerd, runc,
# containernetworking-plugins, podman/buildah (the pause image), musl-tools, iproute2.
#
# Environment:
#   WARREN_CACHE            cache root (default ~/.cache/warren); kubelet and coredns go to
#                           $WARREN_CACHE/k8s/node-<versions>/bin
#   WARREN_K8S_DIR          the control plane's state dir (default /tmp/warren-k8s)
#   WARREN_K8S_API_PORT     its API port (16443)
#   WARREN_KUBELET_DIR      this node's state dir (default /tmp/warren-kubelet)
#   WARREN_KUBELET_NODE     node name (warren-kubelet)
#   WARREN_KUBELET_PORT     kubelet API port (10250); healthz on 127.0.0.1:10248
#   WARREN_KUBELET_POD_CIDR pod subnet (10.244.0.0/24; the bridge takes .1)
#   WARREN_KUBELET_IMAGES   images to import from podman's storage into containerd
#                           (default: ghcr.io/warren-dev/warren-broker:<version>, built by
#                           scripts/image.sh)
set -euo pipefail

_caller_cache="${WARREN_CACHE:-}"
# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
WARREN_CACHE="${_caller_cache:-$WARREN_CACHE}"

K8S_VERSION="${WARREN_K8S_VERSION:-v1.33.13}"
COREDNS_VERSION="${WARREN_COREDNS_VERSION:-v1.12.1}"
NODE_HOME="$WARREN_CACHE/k8s/node-$K8S_VERSION-coredns-$COREDNS_VERSION"
NODE_BIN="$NODE_HOME/bin"
PAUSE_IMAGE="registry.k8s.io/pause:3.10"

CP_STATE="${WARREN_K8S_DIR:-/tmp/warren-k8s}"
API_PORT="${WARREN_K8S_API_PORT:-16443}"
STATE="${WARREN_KUBELET_DIR:-/tmp/warren-kubelet}"
NODE="${WARREN_KUBELET_NODE:-warren-kubelet}"
KUBELET_PORT="${WARREN_KUBELET_PORT:-10250}"
HEALTHZ_PORT="${WARREN_KUBELET_HEALTHZ_PORT:-10248}"
POD_CIDR="${WARREN_KUBELET_POD_CIDR:-10.244.0.0/24}"
BRIDGE="${WARREN_KUBELET_BRIDGE:-warren0}"
SOCK="$STATE/containerd/containerd.sock"

log() { printf '[kubelet] %s\n' "$*" >&2; }

# gateway address of the pod subnet: 10.244.0.0/24 -> 10.244.0.1
gateway() {
    local net="${POD_CIDR%/*}"
    echo "${net%.*}.$((${net##*.} + 1))"
}

need_packages() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd="${pair%%:*}"
        pkg="${pair#*:}"
        if [[ "$cmd" == /* ]]; then
            [[ -e "$cmd" ]] || missing+=("$pkg")
        else
            command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("$pkg")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 ||
        die "could not install ${missing[*]}"
}

# ==== build =====================================================================

go_build_env() {
    env GOWORK=off GO111MODULE=on CGO_ENABLED=0 GOFLAGS=-p=1 nice -n 10 go "$@"
}

build_kubelet() {
    [[ -x "$NODE_BIN/kubelet" ]] && return 0
    header "building kubelet $K8S_VERSION" >&2
    local t0=$SECONDS src
    src="$(GOWORK=off GO111MODULE=on go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -f "$src/go.mod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
    # As e2e/control-plane.sh: a throwaway module requiring k8s.io/kubernetes, every staging
    # module replaced by its published v0.X.Y tag.
    local staging_ver="v0.${K8S_VERSION#v1.}" staging m d="$NODE_HOME/src/kubelet"
    staging="$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$src/go.mod")"
    [[ -n "$staging" ]] || die "no staging replace directives in $src/go.mod"
    rm -rf "$d"
    mkdir -p "$d"
    {
        printf 'module warren.local/kubelet\n\ngo 1.24.0\n\n'
        grep '^godebug ' "$src/go.mod" || true
        printf '\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
        for m in $staging; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_ver"; done
        printf ')\n'
    } >"$d/go.mod"
    local minor="${K8S_VERSION#v1.}" ld="-s -w" pkg
    minor="${minor%%.*}"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    (cd "$d" && go_build_env build -mod=mod -trimpath -ldflags "$ld" -o "$d/kubelet.out" k8s.io/kubernetes/cmd/kubelet)
    mv "$d/kubelet.out" "$NODE_BIN/kubelet"
    log "kubelet built in $((SECONDS - t0)) s"
}

build_coredns() {
    [[ -x "$NODE_BIN/coredns" ]] && return 0
    header "building coredns $COREDNS_VERSION" >&2
    local t0=$SECONDS d="$NODE_HOME/src/coredns"
    rm -rf "$d"
    mkdir -p "$d"
    # The root package of github.com/coredns/coredns is its main; the default plugin set
    # (core/plugin/zplugin.go, committed upstream) includes kubernetes and hosts.
    printf 'module warren.local/coredns\n\ngo 1.24.0\n\nrequire github.com/coredns/coredns %s\n' \
        "$COREDNS_VERSION" >"$d/go.mod"
    (cd "$d" && go_build_env build -mod=mod -trimpath -ldflags "-s -w" -o "$d/coredns.out" github.com/coredns/coredns)
    mv "$d/coredns.out" "$NODE_BIN/coredns"
    log "coredns built in $((SECONDS - t0)) s"
}

# The pause image: a static C program that sleeps until SIGTERM/SIGINT and reaps children,
# FROM scratch, as registry.k8s.io/pause does, built with podman (no registry).
build_pause() {
    if podman image exists "$PAUSE_IMAGE" 2>/dev/null; then return 0; fi
    header "building $PAUSE_IMAGE" >&2
    need_packages musl-gcc:musl-tools
    local ctx
    ctx="$(mktemp -d)"
    cat >"$ctx/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    struct sigaction q = {.sa_handler = quit}, r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    sigaction(SIGINT, &q, NULL);
    sigaction(SIGTERM, &q, NULL);
    sigaction(SIGCHLD, &r, NULL);
    for (;;) pause();
}
EOF
    musl-gcc -static -Os -s -o "$ctx/pause" "$ctx/pause.c"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Containerfile"
    podman build --quiet --pull=never --file "$ctx/Containerfile" --tag "$PAUSE_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
}

setup_podman() {
    need_packages podman:podman buildah:buildah runc:runc
    local conf=/etc/containers/containers.conf.d/warren.conf
    if [[ ! -f "$conf" ]]; then
        log "writing $conf (runtime runc, ulimits)"
        mkdir -p "$(dirname "$conf")"
        printf '%s\n' '[containers]' \
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' \
            '[engine]' 'runtime = "runc"' >"$conf"
    fi
}

cmd_build() {
    local t0=$SECONDS
    need_packages containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
        ip:iproute2 nsenter:util-linux
    setup_podman
    mkdir -p "$NODE_BIN"
    if [[ ! -x "$NODE_BIN/kubelet" || ! -x "$NODE_BIN/coredns" ]]; then
        command -v go >/dev/null || die "go not found: Go >= 1.24 builds kubelet and coredns"
    fi
    build_kubelet
    build_coredns
    build_pause
    log "build: $((SECONDS - t0)) s ($NODE_BIN)"
}

# ==== start / stop ==============================================================

pid_file() { echo "$STATE/run/$1.pid"; }
log_file() { echo "$STATE/logs/$1.log"; }

running() {
    local pf pid
    pf="$(pid_file "$1")"
    [[ -f "$pf" ]] || return 1
    pid="$(cat "$pf" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" == "$2" ]]
}

# launch NAME EXE ARGS...: start EXE inside the node's mount namespace, in its own session,
# logging to logs/NAME.log, its pid in run/NAME.pid.
launch() {
    local name="$1"
    shift
    local holder pf lf
    holder="$(cat "$(pid_file holder)")"
    pf="$(pid_file "$name")"
    lf="$(log_file "$name")"
    printf '\n==== %s starting %s ====\n' "$(date -u +%FT%TZ)" "$name" >>"$lf"
    # shellcheck disable=SC2016
    setsid nsenter --mount="/proc/$holder/ns/mnt" -- bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pf" "$@" \
        </dev/null >>"$lf" 2>&1 &
    for _ in $(seq 1 50); do
        [[ -s "$pf" ]] && break
        sleep 0.1
    done
    log "$name started (pid $(cat "$pf" 2>/dev/null || echo '?'), log $lf)"
}

# The private mount namespace, held by a sleep: /proc made private in it, the three
# sysctl files the kubelet checks shown with the values it wants (see the header).
start_holder() {
    running holder sleep && return 0
    local f="$STATE/sysctl"
    mkdir -p "$f"
    echo 1 >"$f/overcommit_memory"
    echo 10 >"$f/panic"
    echo 1 >"$f/panic_on_oops"
    local pf
    pf="$(pid_file holder)"
    rm -f "$pf"
    # shellcheck disable=SC2016
    setsid unshare --mount --propagation private -- bash -c '
        set -e
        mount --make-rprivate /proc
        mount --bind "$1/overcommit_memory" /proc/sys/vm/overcommit_memory
        mount --bind "$1/panic" /proc/sys/kernel/panic
        mount --bind "$1/panic_on_oops" /proc/sys/kernel/panic_on_oops
        # /run/netns: where containerd binds pod network namespaces; private here.
        mkdir -p /run/netns
        mount -t tmpfs -o mode=0755 tmpfs /run/netns
        echo $$ >"$2"
        exec sleep infinity' _ "$f" "$pf" </dev/null >>"$(log_file holder)" 2>&1 &
    for _ in $(seq 1 50); do
        [[ -s "$pf" ]] && break
        sleep 0.1
    done
    running holder sleep || die "could not create the node's mount namespace (log $(log_file holder))"
}

write_containerd_config() {
    local c="$STATE/containerd"
    mkdir -p "$c/root" "$c/state" "$STATE/cni/net.d" "$STATE/cni/ipam"
    containerd config default >"$c/config.default.toml"
    # From the defaults: own root/state/socket; CRI: pause image, runc with cgroupfs,
    # restrict_oom_score_adj (the kubelet runs with oomScoreAdj 0, so containerd must not
    # try to set scores below its own), CNI bin /usr/lib/cni and a private conf dir.
    python3 - "$c/config.default.toml" "$c/config.toml" "$c" "$SOCK" "$STATE/cni" "$PAUSE_IMAGE" <<'EOF'
import re, sys
src, dst, c, sock, cni, pause = sys.argv[1:]
t = open(src).read()
def sub(pat, rep, count=1):
    global t
    t, n = re.subn(pat, rep, t, count=count, flags=re.M)
    if n == 0:
        sys.exit(f"containerd config default: no match for {pat!r}")
sub(r'^root = .*$', f'root = "{c}/root"')
sub(r'^state = .*$', f'state = "{c}/state"')
sub(r'^(\[grpc\]\n(?:.*\n)*?\s*)address = .*$', rf'\g<1>address = "{sock}"')
sub(r'^(\s*)sandbox_image = .*$', rf'\g<1>sandbox_image = "{pause}"')
sub(r'^(\s*)restrict_oom_score_adj = .*$', r'\g<1>restrict_oom_score_adj = true')
sub(r'^(\s*)SystemdCgroup = .*$', r'\g<1>SystemdCgroup = false')
sub(r'^(\s*)bin_dir = .*$', r'\g<1>bin_dir = "/usr/lib/cni"')
sub(r'^(\s*)conf_dir = .*$', rf'\g<1>conf_dir = "{cni}/net.d"')
# ttrpc and debug sockets next to the grpc one; no metrics listener.
sub(r'^(\[ttrpc\]\n(?:.*\n)*?\s*)address = .*$', rf'\g<1>address = "{sock}.ttrpc"')
sub(r'^(\[debug\]\n(?:.*\n)*?\s*)address = .*$', rf'\g<1>address = "{sock}.debug"')
open(dst, "w").write(t)
EOF
    local gw
    gw="$(gateway)"
    cat >"$STATE/cni/net.d/10-warren.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "warren",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$gw"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
}

# The bridge, before the first pod, so coredns can listen on its address.
ensure_bridge() {
    local gw
    gw="$(gateway)"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip addr show dev "$BRIDGE" | grep -q "inet $gw/" || ip addr add "$gw/${POD_CIDR#*/}" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

ctr_() { ctr --address "$SOCK" "$@"; }
quiet() { "$@" >/dev/null 2>&1; }

# The chains a kubelet with makeIPTablesUtilChains (the default) adds to the host's
# iptables; ours runs without, this removes those an earlier run may have left.
remove_kubelet_chains() {
    local ipt t
    for ipt in iptables ip6tables; do
        command -v "$ipt" >/dev/null 2>&1 || continue
        while "$ipt" -t filter -D INPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
        while "$ipt" -t filter -D OUTPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
        "$ipt" -t filter -F KUBE-FIREWALL 2>/dev/null && "$ipt" -t filter -X KUBE-FIREWALL 2>/dev/null
        for t in mangle nat filter; do
            "$ipt" -t "$t" -X KUBE-KUBELET-CANARY 2>/dev/null || true
        done
        "$ipt" -t mangle -X KUBE-IPTABLES-HINT 2>/dev/null || true
    done
    return 0
}

# import_image NAME: podman storage -> containerd's k8s.io namespace.
import_image() {
    local image="$1" tar
    tar="$STATE/images/$(echo "$image" | tr '/:' '__').tar"
    mkdir -p "$STATE/images"
    podman image exists "$image" || die "image $image is not in podman's storage (build it: bash scripts/image.sh)"
    local id have
    id="$(podman image inspect --format '{{.Id}}' "$image")"
    have="$(ctr_ -n k8s.io images ls -q "name==$image" 2>/dev/null || true)"
    if [[ -n "$have" && -f "$tar.id" && "$(cat "$tar.id")" == "$id" ]]; then
        return 0
    fi
    rm -f "$tar"
    podman save --quiet --format docker-archive --output "$tar" "$image"
    ctr_ -n k8s.io images import "$tar" >/dev/null
    echo "$id" >"$tar.id"
    rm -f "$tar"
    log "imported $image"
}

default_images() {
    if [[ -n "${WARREN_KUBELET_IMAGES:-}" ]]; then
        echo "$WARREN_KUBELET_IMAGES"
        return
    fi
    podman images --format '{{.Repository}}:{{.Tag}}' --filter reference='ghcr.io/warren-dev/warren-broker' | head -1
}

write_kubelet_config() {
    local k="$STATE/kubelet" p="$CP_STATE/pki" node_ip="$1"
    mkdir -p "$k/root" "$k/pki" "$STATE/pod-logs"
    # Client certificate system:node:<node> in system:nodes, from the control plane's CA: the
    # Node authorizer and NodeRestriction treat it as that node's kubelet.
    if [[ ! -f "$k/pki/kubelet.crt" ]] || ! openssl verify -CAfile "$p/ca.crt" "$k/pki/kubelet.crt" >/dev/null 2>&1; then
        openssl genrsa -out "$k/pki/kubelet.key" 2048 2>/dev/null
        openssl req -new -key "$k/pki/kubelet.key" -subj "/O=system:nodes/CN=system:node:$NODE" \
            -out "$k/pki/kubelet.csr" -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n')
        openssl x509 -req -in "$k/pki/kubelet.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" \
            -CAserial "$k/pki/ca.srl" -CAcreateserial -days 3650 -sha256 \
            -extfile <(printf '[v3]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n') \
            -extensions v3 -out "$k/pki/kubelet.crt" 2>/dev/null
        rm -f "$k/pki/kubelet.csr"
        chmod 600 "$k/pki/kubelet.key"
    fi
    cat >"$k/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: warren-k8s
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $p/ca.crt
users:
- name: kubelet
  user:
    client-certificate: $k/pki/kubelet.crt
    client-key: $k/pki/kubelet.key
contexts:
- name: warren-k8s
  context: {cluster: warren-k8s, user: kubelet}
current-context: warren-k8s
EOF
    # Authentication of callers of the kubelet API: client certificates of the cluster CA or
    # tokens (webhook), authorization by SubjectAccessReview; never anonymous.
    cat >"$k/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $p/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
protectKernelDefaults: true
# No KUBE-FIREWALL / KUBE-KUBELET-CANARY / KUBE-IPTABLES-HINT chains in the host's iptables.
makeIPTablesUtilChains: false
clusterDNS: [$(gateway)]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
podLogsDir: $STATE/pod-logs
podCIDR: $POD_CIDR
maxPods: 50
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
registerWithTaints:
- {key: warren.dev/real-node, value: "true", effect: NoSchedule}
EOF
}

write_coredns_config() {
    cat >"$STATE/Corefile" <<EOF
.:53 {
    bind $(gateway)
    errors
    kubernetes cluster.local {
        kubeconfig $CP_STATE/kubeconfig warren-k8s
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
}

kc() { "$KUBECTL" --kubeconfig "$CP_STATE/kubeconfig" "$@"; }
# node_ready: the kubelet's healthz answers and the Node's Ready condition is True with a
# heartbeat from this kubelet (not a status left in etcd by an earlier run).
KUBELET_STARTED=""
node_ready() {
    python3 - "http://127.0.0.1:$HEALTHZ_PORT/healthz" <<'EOF' 2>/dev/null || return 1
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=3).read().strip() == b"ok" else 1)
EOF
    local out
    out="$(kc get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' 2>/dev/null)" || return 1
    [[ "${out%% *}" == True && ! "${out#* }" < "$KUBELET_STARTED" ]]
}

wait_until() {
    local what="$1" timeout="$2" comp="$3" exe="$4"
    shift 4
    local t0=$SECONDS
    until "$@"; do
        if ! running "$comp" "$exe"; then
            tail -n 40 "$(log_file "$comp")" >&2 || true
            die "$comp exited while waiting for $what (log $(log_file "$comp"))"
        fi
        if ((SECONDS - t0 >= timeout)); then
            tail -n 40 "$(log_file "$comp")" >&2 || true
            die "timed out after ${timeout}s waiting for $what (log $(log_file "$comp"))"
        fi
        sleep 0.5
    done
    log "$what: ok after $((SECONDS - t0)) s"
}

print_env() {
    echo "export KUBECONFIG=$CP_STATE/kubeconfig"
    echo "export WARREN_REAL_NODE=$NODE"
    echo "export WARREN_REAL_NODE_CONTAINERD=$SOCK"
    local img
    img="$(cat "$STATE/broker-image" 2>/dev/null || true)"
    [[ -n "$img" ]] && echo "export WARREN_REAL_NODE_BROKER_IMAGE=$img"
    return 0
}

cmd_start() {
    local t0=$SECONDS t
    [[ -f "$CP_STATE/kubeconfig" && -f "$CP_STATE/pki/ca.key" ]] ||
        die "no control plane in $CP_STATE: start it first (bash e2e/control-plane.sh start)"
    KUBECTL="$(bash "$WARREN_ROOT/scripts/kubetools.sh" | tail -1)/kubectl"
    kc get --raw /readyz >/dev/null || die "the control plane in $CP_STATE does not answer"
    mkdir -p "$STATE"/{run,logs}
    local node_ip
    node_ip="$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')"
    [[ -n "$node_ip" ]] || node_ip="$(hostname -I | awk '{print $1}')"
    [[ -n "$node_ip" ]] || die "cannot find this host's IP address for the Node"

    t=$SECONDS
    write_containerd_config
    write_kubelet_config "$node_ip"
    write_coredns_config
    ensure_bridge
    start_holder
    running containerd containerd || launch containerd containerd --config "$STATE/containerd/config.toml"
    wait_until "containerd on $SOCK" 30 containerd containerd quiet ctr_ version
    log "containerd: $((SECONDS - t)) s"

    t=$SECONDS
    import_image "$PAUSE_IMAGE"
    local img images
    images="$(default_images)"
    for img in $images; do import_image "$img"; done
    echo "${images%% *}" >"$STATE/broker-image"
    log "images: $((SECONDS - t)) s"

    t=$SECONDS
    KUBELET_STARTED="$(date -u +%FT%TZ)"
    running coredns coredns || launch coredns "$NODE_BIN/coredns" -conf "$STATE/Corefile"
    running kubelet kubelet || launch kubelet "$NODE_BIN/kubelet" \
        --config "$STATE/kubelet/config.yaml" \
        --kubeconfig "$STATE/kubelet/kubeconfig" \
        --root-dir "$STATE/kubelet/root" \
        --cert-dir "$STATE/kubelet/pki" \
        --hostname-override "$NODE" \
        --node-ip "$node_ip" \
        --node-labels "warren.dev/real-node=true,type=kubelet" \
        --v 1
    wait_until "node $NODE Ready" 120 kubelet kubelet node_ready
    log "kubelet: $((SECONDS - t)) s"
    log "node ready in $((SECONDS - t0)) s (state $STATE)"
    print_env
}

# stop_pid NAME EXE: TERM, KILL after 15 s.
stop_pid() {
    local name="$1" exe="$2" pid
    running "$name" "$exe" || { rm -f "$(pid_file "$name")"; return 0; }
    pid="$(cat "$(pid_file "$name")")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$(pid_file "$name")"
    log "$name stopped"
}

# pids of the containerd shims of this node (their command line names our socket).
our_shims() {
    local p
    for p in /proc/[0-9]*; do
        tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $SOCK " && echo "${p#/proc/}"
    done
    return 0
}

cmd_stop() {
    local wipe=0
    case "${1:-}" in
    "") ;;
    --wipe) wipe=1 ;;
    *) die "usage: $0 stop [--wipe]" ;;
    esac
    stop_pid kubelet kubelet
    # Every container of every pod: killed, deleted.
    if running containerd containerd; then
        local c
        for c in $(ctr_ -n k8s.io tasks ls -q 2>/dev/null); do
            ctr_ -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
        done
        sleep 1
        for c in $(ctr_ -n k8s.io tasks ls -q 2>/dev/null); do
            ctr_ -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
        done
        for c in $(ctr_ -n k8s.io containers ls -q 2>/dev/null); do
            ctr_ -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
        done
    fi
    stop_pid containerd containerd
    local s
    for s in $(our_shims); do kill -KILL "$s" 2>/dev/null || true; done
    stop_pid coredns coredns
    # The mount namespace goes with its last process: pod volumes, root filesystems and
    # network namespaces' bind mounts with it.
    stop_pid holder sleep
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link delete "$BRIDGE"
        log "bridge $BRIDGE deleted"
    fi
    rm -rf "$STATE/cni/ipam"
    remove_kubelet_chains
    # The kubelet's QoS cgroups (empty once the pods are gone).
    local d
    for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
        [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    if ((wipe)); then
        case "$STATE" in "" | / | "$HOME" | "$WARREN_ROOT") die "refusing to wipe '$STATE'" ;; esac
        rm -rf "$STATE"
        log "wiped $STATE"
    fi
    return 0
}

cmd_status() {
    local c rc=0
    for c in holder:sleep containerd:containerd coredns:coredns kubelet:kubelet; do
        if running "${c%%:*}" "${c#*:}"; then
            printf '%-12s running (pid %s)\n' "${c%%:*}" "$(cat "$(pid_file "${c%%:*}")")"
        else
            printf '%-12s stopped\n' "${c%%:*}"
            rc=1
        fi
    done
    echo "state dir: $STATE"
    return "$rc"
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

[[ "$(id -u)" == 0 ]] || die "e2e/kubelet.sh needs root (containerd, mounts, the bridge)"
case "${1:-}" in
build) cmd_build ;;
start)
    cmd_build
    cmd_start
    ;;
stop)
    shift
    cmd_stop "$@"
    ;;
env) print_env ;;
status) cmd_status ;;
-h | --help | help) usage 0 ;;
*) usage 2 >&2 ;;
esac
