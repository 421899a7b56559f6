#!/usr/bin/env bash
# Container images of warren-broker and warren-operator, built without a daemon (podman/buildah).
#
#   scripts/image.sh                     # build both images into local container storage
#   scripts/image.sh --test              # build, then run the broker image for real (below)
#   scripts/image.sh --out DIR           # also write DIR/warren-broker-<version>.tar and
#                                        # DIR/warren-operator-<version>.tar (OCI archives; load
#                                        # with `ctr -n k8s.io image import FILE`,
#                                        # `podman load -i FILE` or `skopeo copy oci-archive:FILE ...`)
#   scripts/image.sh --push REGISTRY     # also push REGISTRY/warren-broker:<version> and
#                                        # REGISTRY/warren-operator:<version>, e.g.
#                                        # --push registry.example.com/messaging (log in first:
#                                        # `podman login registry.example.com`)
#   scripts/image.sh --repo PREFIX       # name the images PREFIX/warren-broker:<version> ...
#                                        # [default: ghcr.io/warren-dev, the operator's and
#                                        # the chart's default image names]
#
# The binaries are static (x86_64-unknown-linux-musl, cargo profile `image`: release without
# debug info), built outside the images with the cargo cache in
# ${XDG_CACHE_HOME:-~/.cache}/warren/target-image (WARREN_IMAGE_TARGET_DIR overrides it; a
# cold build took 25 min on 2 busy cores, 4.5 min per changed crate, under a second with no
# change), then copied into
# `FROM scratch` images (broker/Containerfile, operator/Containerfile). The tag is the
# binary's `--version`. The sizes are printed at the end.
#
# --test runs the broker image as the operator's StatefulSet does: UID 999, read-only root
# filesystem, no capabilities, the data volume on /var/lib/warren, a read-only config mount on
# /etc/warren, `--config /etc/warren/warren.toml` and WARREN_CONFIG, on a podman network with
# DNS. It checks that a pika client publishes and gets a message through the published port,
# that `warren-broker check ready` passes inside the container (as the readiness probe runs
# it), that the node reaches itself through a name only the network's DNS server knows (musl's
# resolver, /etc/resolv.conf), that the process runs as UID 999, that the container wrote
# nothing outside its volume and podman's own mounts and that everything on the volume is
# 999's; then it stops the node with SIGTERM and checks that it exits 0. The operator image
# must answer --version and --help (read-only, UID 65532).
#
# --test needs root (rootful podman). Installs what it needs (apt): musl-tools (ring's C
# code), binutils (readelf), podman, buildah, runc; writes
# /etc/containers/containers.conf.d/warren.conf (runc, not crun, which fails on hosts with
# hybrid cgroups; ulimits) if it is missing. The pika venv comes from scripts/deps.sh python.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

TARGET=x86_64-unknown-linux-musl
PROFILE=image
REPO=ghcr.io/warren-dev
OUT=""
PUSH=""
TEST=0
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --push) PUSH="${2:?--push needs a registry, e.g. registry.example.com/messaging}"; shift 2 ;;
    --repo) REPO="${2:?--repo needs a prefix}"; shift 2 ;;
    --test) TEST=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
REPO="${REPO%/}"
PUSH="${PUSH%/}"

START=$SECONDS
say() { printf '[image] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# ------------------------------------------------------------------ tools
need_packages() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd="${pair%%:*}"
        pkg="${pair#*:}"
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (apt)"
    as_root apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

CONTAINERS_CONF=/etc/containers/containers.conf.d/warren.conf
setup_podman() {
    need_packages podman:podman buildah:buildah runc:runc
    if [ ! -f "$CONTAINERS_CONF" ]; then
        say "writing $CONTAINERS_CONF (runtime runc, ulimits)"
        as_root mkdir -p "$(dirname "$CONTAINERS_CONF")"
        printf '%s\n' '[containers]' \
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' \
            '[engine]' \
            'runtime = "runc"' | as_root tee "$CONTAINERS_CONF" >/dev/null
    fi
}

# ------------------------------------------------------------------ binaries
build_binaries() {
    need_packages musl-gcc:musl-tools readelf:binutils
    if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$TARGET"; then
        say "rustup target add $TARGET"
        rustup target add "$TARGET"
    fi
    # Its own target dir: a musl release build shares nothing with the debug builds of the
    # tests, and CI keeps it between runs.
    export CARGO_TARGET_DIR="${WARREN_IMAGE_TARGET_DIR:-$WARREN_CACHE/target-image}"
    mkdir -p "$CARGO_TARGET_DIR"
    local t=$SECONDS
    header "cargo build --profile $PROFILE --target $TARGET (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    CC_x86_64_unknown_linux_musl=musl-gcc \
        cargo build --locked --profile "$PROFILE" --target "$TARGET" \
        -p warren-broker -p warren-operator --bin warren-broker --bin warren-operator
    BIN_DIR="$(cargo_target_dir)/$TARGET/$PROFILE"
    say "binaries built in $((SECONDS - t)) s"
    local b
    for b in warren-broker warren-operator; do
        [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing after the build"
        # A static executable has no program interpreter (PT_INTERP) and no shared libraries.
        if LC_ALL=C readelf -lW "$BIN_DIR/$b" | grep -q 'Requesting program interpreter' ||
            LC_ALL=C readelf -dW "$BIN_DIR/$b" | grep -q '(NEEDED)'; then
            die "$BIN_DIR/$b is not statically linked"
        fi
    done
}

# ------------------------------------------------------------------ images
# version_of BINARY: the version `BINARY --version` prints ("warren-broker 0.1.0" -> 0.1.0).
version_of() {
    local v
    v="$("$1" --version)" || die "$1 --version failed"
    v="${v##* }"
    [[ "$v" =~ ^[0-9A-Za-z][0-9A-Za-z._+-]*$ ]] || die "$1 --version printed no usable tag: $v"
    echo "${v//+/_}"
}

# stage_context DIR UID NAME BINARY: the build context the Containerfiles expect.
stage_context() {
    local dir="$1" uid="$2" user="$3" bin="$4"
    mkdir -p "$dir/rootfs/etc/ssl/certs" "$dir/rootfs/tmp" "$dir/rootfs/var/lib" "$dir/empty"
    chmod 1777 "$dir/rootfs/tmp"
    printf 'root:x:0:0:root:/:/sbin/nologin\n%s:x:%s:%s:%s:/nonexistent:/sbin/nologin\n' \
        "$user" "$uid" "$uid" "$user" >"$dir/rootfs/etc/passwd"
    printf 'root:x:0:\n%s:x:%s:\n' "$user" "$uid" >"$dir/rootfs/etc/group"
    [ -s /etc/ssl/certs/ca-certificates.crt ] || need_packages update-ca-certificates:ca-certificates
    cp /etc/ssl/certs/ca-certificates.crt "$dir/rootfs/etc/ssl/certs/ca-certificates.crt"
    chmod 0644 "$dir/rootfs/etc/passwd" "$dir/rootfs/etc/group" "$dir/rootfs/etc/ssl/certs/ca-certificates.crt"
    install -m 0755 "$bin" "$dir/$(basename "$bin")"
}

image_size() { podman image inspect --format '{{.Size}}' "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }

build_images() {
    VERSION="$(version_of "$BIN_DIR/warren-broker")"
    local op_version
    op_version="$(version_of "$BIN_DIR/warren-operator")"
    [ "$op_version" = "$VERSION" ] || die "warren-broker is $VERSION but warren-operator is $op_version"
    local revision
    revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        revision="$revision-dirty"
    fi
    BROKER_IMAGE="$REPO/warren-broker:$VERSION"
    OPERATOR_IMAGE="$REPO/warren-operator:$VERSION"
    CTX="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: CTX is fixed
    trap "rm -rf '$CTX'" EXIT
    stage_context "$CTX/broker" 999 warren "$BIN_DIR/warren-broker"
    mkdir -p "$CTX/broker/rootfs/etc/warren"
    stage_context "$CTX/operator" 65532 nonroot "$BIN_DIR/warren-operator"
    local t=$SECONDS name image old_id
    for name in broker operator; do
        image="$BROKER_IMAGE"
        [ "$name" = operator ] && image="$OPERATOR_IMAGE"
        header "podman build $image"
        old_id="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
        podman build --quiet --pull=never --file "$name/Containerfile" \
            --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" \
            --tag "$image" "$CTX/$name" >/dev/null
        # The previous build of this tag, now untagged (rmi refuses if it is still tagged).
        if [ -n "$old_id" ] && [ "$old_id" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
            podman rmi "$old_id" >/dev/null 2>&1 || true
        fi
    done
    say "images built in $((SECONDS - t)) s (revision $revision)"
}

save_images() {
    mkdir -p "$OUT"
    local image file
    for image in "$BROKER_IMAGE" "$OPERATOR_IMAGE"; do
        file="$OUT/$(basename "${image%:*}")-$VERSION.tar"
        rm -f "$file"
        podman save --quiet --format oci-archive --output "$file" "$image"
        say "wrote $file ($(mb "$(stat -c %s "$file")"))"
    done
}

push_images() {
    local image target
    for image in "$BROKER_IMAGE" "$OPERATOR_IMAGE"; do
        target="$PUSH/$(basename "$image")"
        header "podman push $target"
        podman tag "$image" "$target"
        podman push "$target"
    done
}

# ------------------------------------------------------------------ test
TEST_CTR=""
TEST_NET=""
TEST_DIR=""
cleanup_test() {
    if [ -n "$TEST_CTR" ]; then podman rm -f -t 0 "$TEST_CTR" >/dev/null 2>&1 || true; fi
    if [ -n "$TEST_NET" ]; then podman network rm -f "$TEST_NET" >/dev/null 2>&1 || true; fi
    if [ -n "$TEST_DIR" ]; then rm -rf "$TEST_DIR"; fi
    if [ -n "${CTX:-}" ]; then rm -rf "$CTX"; fi
}

PASSED=0
ok() {
    PASSED=$((PASSED + 1))
    printf '  ok  %s\n' "$*"
}
fail() {
    if [ -n "$TEST_CTR" ]; then
        echo "---- podman logs $TEST_CTR (last 40 lines)" >&2
        podman logs --tail 40 "$TEST_CTR" >&2 || true
    fi
    die "image test failed: $*"
}

test_images() {
    header "test: $BROKER_IMAGE and $OPERATOR_IMAGE"
    # Rootful podman: the test gives the volume to UID 999 and reads the container's
    # process in /proc, as a kubelet's view of the pod.
    [ "$(id -u)" = 0 ] || die "--test needs root (rootful podman, chown of the volume to 999)"
    bash scripts/deps.sh python >/dev/null
    trap cleanup_test EXIT
    local t=$SECONDS out

    # The operator image: runs (as the chart runs it) and answers --version and --help.
    out="$(podman run --rm --read-only --user 65532:65532 --cap-drop ALL "$OPERATOR_IMAGE" --version)" ||
        fail "warren-operator --version in the image"
    [ "$out" = "warren-operator $VERSION" ] || fail "warren-operator --version printed '$out'"
    ok "operator image: --version prints '$out'"
    out="$(podman run --rm --read-only --user 65532:65532 --cap-drop ALL "$OPERATOR_IMAGE" --help)" ||
        fail "warren-operator --help in the image"
    [[ "$out" == *--leader-elect* ]] || fail "warren-operator --help printed no --leader-elect"
    ok "operator image: --help"

    # The broker image as the StatefulSet runs it.
    TEST_DIR="$(mktemp -d)"
    mkdir -p "$TEST_DIR/data" "$TEST_DIR/config"
    # The volume belongs to the broker's group, as fsGroup makes it on Kubernetes.
    chown 999:999 "$TEST_DIR/data"
    chmod 0770 "$TEST_DIR/data"
    cat >"$TEST_DIR/config/warren.toml" <<'EOF'
data-dir = "/var/lib/warren"
amqp-listen = "0.0.0.0:5672"
management-listen = "0.0.0.0:15672"
prometheus-listen = "0.0.0.0:15692"
EOF
    chmod 0644 "$TEST_DIR/config/warren.toml"
    local user=warren pass amqp_port mgmt_port alias
    pass="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
    amqp_port="$(free_port)"
    mgmt_port="$(free_port)"
    TEST_NET="warren-image-test-$$"
    alias="warren-0.warren-nodes.image-test.svc"
    podman network create "$TEST_NET" >/dev/null || fail "podman network create $TEST_NET"
    TEST_CTR="warren-image-test-$$"
    podman run --detach --name "$TEST_CTR" \
        --user 999:999 --read-only --cap-drop ALL --security-opt no-new-privileges \
        --network "$TEST_NET" --network-alias "$alias" \
        --volume "$TEST_DIR/data:/var/lib/warren" \
        --volume "$TEST_DIR/config:/etc/warren:ro" \
        --env WARREN_CONFIG=/etc/warren/warren.toml \
        --env WARREN_NODE_NAME="warren@$alias" \
        --env WARREN_DEFAULT_USER="$user" --env WARREN_DEFAULT_PASS="$pass" \
        --publish "127.0.0.1:$amqp_port:5672" --publish "127.0.0.1:$mgmt_port:15672" \
        "$BROKER_IMAGE" --config /etc/warren/warren.toml >/dev/null 2>"$TEST_DIR/run.err" ||
        fail "podman run $BROKER_IMAGE: $(cat "$TEST_DIR/run.err")"
    local i
    for i in $(seq 1 150); do
        port_open "$amqp_port" && podman exec "$TEST_CTR" warren-broker check ready >/dev/null 2>&1 && break
        [ "$(podman inspect --format '{{.State.Running}}' "$TEST_CTR")" = true ] || fail "the broker container exited"
        [ "$i" = 150 ] && fail "the broker was not ready within 30 s"
        sleep 0.2
    done
    ok "broker image: started read-only as 999, ready after $((SECONDS - t)) s"

    out="$(podman exec "$TEST_CTR" warren-broker check ready)" || fail "warren-broker check ready: $out"
    ok "warren-broker check ready (podman exec, as the readiness probe): $out"

    # The name is the network's DNS server's (aardvark-dns, first in the container's
    # /etc/resolv.conf), not in /etc/hosts: the lookup goes through musl's DNS resolver, as
    # `<pod>.<name>-nodes.<ns>.svc` does on Kubernetes.
    local resolv hosts
    resolv="$(podman inspect --format '{{.ResolvConfPath}}' "$TEST_CTR")"
    hosts="$(podman inspect --format '{{.HostsPath}}' "$TEST_CTR")"
    if grep -qF "$alias" "$hosts"; then fail "$alias is in the container's /etc/hosts"; fi
    say "the container's /etc/resolv.conf: $(grep -E '^(nameserver|search)' "$resolv" | paste -sd ' ' -)"
    # aardvark-dns learns the name when the container starts, a moment after it runs (as a
    # pod's DNS record follows its start on Kubernetes): a few tries, each one a real lookup.
    local tries=0
    until out="$(podman exec "$TEST_CTR" warren-broker check ready --management-url "http://$alias:15672" 2>&1)"; do
        tries=$((tries + 1))
        [ "$tries" -lt 25 ] || fail "check ready through the DNS name $alias (25 tries in 5 s): $out"
        sleep 0.2
    done
    ok "DNS: the node reaches http://$alias:15672 by name (musl resolver, /etc/resolv.conf; $((tries + 1)) lookups): $out"

    "$WARREN_VENV/bin/python" - "$amqp_port" "$user" "$pass" <<'EOF' || fail "pika publish/get through the published port"
import sys, pika
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
params = pika.ConnectionParameters("127.0.0.1", port, "/", pika.PlainCredentials(user, password))
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.confirm_delivery()
ch.queue_declare("image-test", durable=True)
ch.basic_publish("", "image-test", b"hello from the image",
                 pika.BasicProperties(delivery_mode=2), mandatory=True)
method, _props, body = ch.basic_get("image-test", auto_ack=True)
assert method is not None, "basic.get found no message"
assert body == b"hello from the image", body
conn.close()
EOF
    ok "pika: declared a durable queue, published (confirmed) and got the message back"

    local pid uid
    pid="$(podman inspect --format '{{.State.Pid}}' "$TEST_CTR")"
    uid="$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")"
    [ "$uid" = "999 999 999 999" ] || fail "the broker runs with uids '$uid', expected 999"
    ok "the broker process runs as UID 999 (real, effective, saved, fs)"

    # Writes: podman diff lists what changed in the container's root filesystem. The volume
    # and the config mount are not part of it; the mount points podman itself makes (/etc for
    # hosts, hostname and resolv.conf, the tmpfs /tmp, /var/tmp and /run of --read-only) are,
    # and are the only changes allowed.
    out="$(podman diff "$TEST_CTR" | grep -vxE '[AC] (/etc|/etc/hosts|/etc/hostname|/etc/resolv.conf|/var|/var/tmp|/tmp|/run|/run/.containerenv)' || true)"
    [ -z "$out" ] || fail "the container changed its root filesystem: $out"
    ok "nothing written outside the volume (podman diff: only podman's own mount points)"
    [ -n "$(find "$TEST_DIR/data" -mindepth 1 -print -quit)" ] || fail "nothing written to the volume"
    out="$(find "$TEST_DIR/data" -mindepth 1 \( ! -uid 999 -o ! -gid 999 \) -print)"
    [ -z "$out" ] || fail "files on the volume not owned by 999:999: $out"
    ok "the volume holds $(find "$TEST_DIR/data" -mindepth 1 | wc -l) entries, all owned by 999:999"

    podman stop --time 30 "$TEST_CTR" >/dev/null || fail "podman stop"
    out="$(podman inspect --format '{{.State.ExitCode}}' "$TEST_CTR")"
    [ "$out" = 0 ] || fail "the broker exited with $out on SIGTERM"
    ok "SIGTERM: the broker stopped cleanly (exit 0)"
    say "image test: $PASSED passed, 0 failed ($((SECONDS - t)) s)"
}

# ------------------------------------------------------------------ main
setup_podman
build_binaries
build_images
[ -n "$OUT" ] && save_images
[ -n "$PUSH" ] && push_images
[ "$TEST" = 1 ] && test_images

header "images"
broker_size="$(image_size "$BROKER_IMAGE")"
printf '  %-50s %s\n' "$BROKER_IMAGE" "$(mb "$broker_size")" \
    "$OPERATOR_IMAGE" "$(mb "$(image_size "$OPERATOR_IMAGE")")"
[ "$broker_size" -lt 30000000 ] || say "WARNING: the broker image is over the 30 MB target"
say "done in $((SECONDS - START)) s"
