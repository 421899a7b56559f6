#!/usr/bin/env bash
# Two "data centres" in network namespaces, the link between them cut and restored.
#
#   tests/links/netns.sh [WARREN_BIN]
#
# Builds this topology (needs root; installs iproute2 and iptables from apt if missing):
#
#   root namespace: bridge wbr<id> 10.231.<n>.254  (the test itself runs here)
#     ├─ veth ─ namespace wdc1-<id>: 10.231.<n>.1  Warren "dc1" (runs the links)
#     └─ veth ─ namespace wdc2-<id>: 10.231.<n>.2  Warren "dc2"
#
# and runs tests/links/test_netns.py, which cuts dc1 off from dc2 with iptables DROP rules
# inside dc1 (a silent black hole, as a failed WAN link is) while the test still reaches both.
# Anything that cannot be set up is an error, never a skip. Everything is removed on exit.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
cd "$WARREN_ROOT"

BIN="${1:-${WARREN_BIN:-$(cargo_target_dir)/debug/warren-broker}}"
[ -x "$BIN" ] || die "warren-broker binary not found at $BIN"
[ "$(id -u)" = 0 ] || die "tests/links/netns.sh needs root (network namespaces, veth, iptables)"
[ -x "$WARREN_VENV/bin/pytest" ] || die "no pytest in $WARREN_VENV (run scripts/deps.sh python)"

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "need ${need[*]} and apt-get is not available"
    echo "[netns] installing ${need[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null ||
        { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; } ||
        die "apt-get install ${need[*]} failed"
fi

ID="$(printf '%04x' $((RANDOM % 65536)))"
NET="10.231.$((RANDOM % 250)).0"
PREFIX="${NET%.0}"
BR="wbr$ID"
NS1="wdc1-$ID"
NS2="wdc2-$ID"

cleanup() {
    local rc=$?
    set +e
    for ns in "$NS1" "$NS2"; do
        # Processes left in the namespace (the test stops its brokers; this is a backstop).
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    ip link del "$BR" 2>/dev/null
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "[netns] bridge $BR $PREFIX.254/24, namespaces $NS1 ($PREFIX.1) and $NS2 ($PREFIX.2)"
ip link add "$BR" type bridge || die "cannot create a bridge (CAP_NET_ADMIN?)"
ip addr add "$PREFIX.254/24" dev "$BR"
ip link set "$BR" up
i=0
for ns in "$NS1" "$NS2"; do
    i=$((i + 1))
    ip netns add "$ns" || die "cannot create network namespace $ns"
    ip link add "w$i$ID-a" type veth peer name "w$i$ID-b" || die "cannot create a veth pair"
    ip link set "w$i$ID-a" netns "$ns"
    ip link set "w$i$ID-b" master "$BR" up
    ip netns exec "$ns" ip addr add "$PREFIX.$i/24" dev "w$i$ID-a"
    ip netns exec "$ns" ip link set "w$i$ID-a" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" iptables -S >/dev/null || die "iptables does not work in namespace $ns"
done

export WARREN_BIN="$BIN" NETNS_DC1="$NS1" NETNS_DC2="$NS2" DC1_IP="$PREFIX.1" DC2_IP="$PREFIX.2"
"$WARREN_VENV/bin/pytest" -q -s "$WARREN_ROOT/tests/links/test_netns.py"
