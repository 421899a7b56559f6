#!/usr/bin/env bash
# Install every test dependency, idempotently (a second run takes ~1 s).
#
#   scripts/deps.sh                  # everything
#   scripts/deps.sh rabbitmq python  # only some: rabbitmq | python | node | perftest
#
#   rabbitmq  Debian rabbitmq-server (reference broker; scripts/rabbitmq-ref.sh
#             runs a private instance). A system RabbitMQ started by the package
#             on 5672 is stopped: Warren owns 5672 in tests.
#   python    venv at .deps/venv with pika and pytest (+ any requirements.txt
#             under tests/clients/python, tests/differential, tests/)
#   node      npm ci / npm install in every tests/**/package.json
#             (tests/clients/node with amqplib)
#   netns     iproute2 and iptables (the cluster tests' hosts in network
#             namespaces, partitions; tests/links/netns.sh)
#   perftest  RabbitMQ PerfTest (com.rabbitmq:perf-test $PERFTEST_VERSION) from
#             Maven Central into ${XDG_CACHE_HOME:-~/.cache}/warren/
#
# Needs: apt (Debian), python3, npm, java + mvn. Root or sudo for apt.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

say() { printf '[deps] %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

sha() { sha256sum | cut -c1-64; }

# ---------------------------------------------------------------- rabbitmq
# Stop the system RabbitMQ (the Debian package's node: HOME /var/lib/rabbitmq,
# started by the postinst or by init) if it listens on 5672: Warren owns 5672
# in tests. Every other beam.smp is left alone, including private instances
# on other ports (scripts/rabbitmq-ref.sh uses 5673).
pids_on_5672() {
    ss -ltnpH 'sport = :5672' 2>/dev/null | grep -o 'beam.smp",pid=[0-9]*' | grep -o '[0-9]*$' | sort -u || true
}
stop_system_rabbitmq() {
    command -v ss >/dev/null 2>&1 || { say "ss not found; cannot check port 5672"; return 0; }
    local pids pid sys_pids=""
    pids="$(pids_on_5672)"
    [ -n "$pids" ] || return 0
    for pid in $pids; do
        if tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null | grep -q -- '-home /var/lib/rabbitmq '; then
            sys_pids="$sys_pids $pid"
        else
            say "WARNING: a RabbitMQ that is not the system service (beam.smp pid $pid) listens on 5672; leaving it alone, but Warren tests expect 5672 free"
        fi
    done
    [ -n "$sys_pids" ] || return 0
    say "the system rabbitmq-server (beam.smp pid$sys_pids) listens on 5672; stopping it (Warren owns 5672 in tests)"
    # Only through the service manager when it actually runs the node: the
    # init script's `rabbitmqctl stop PIDFILE` waits forever for a pid file
    # that a node started any other way never writes.
    if [ -d /run/systemd/system ] && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        as_root timeout 90 systemctl stop rabbitmq-server >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/rabbitmq-server ] && [ -s /var/run/rabbitmq/pid ]; then
        as_root timeout 90 /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
    fi
    # Not under service control (or the service stop failed): SIGTERM makes
    # the Erlang VM shut down cleanly; SIGKILL after 20 s.
    local _
    for pid in $sys_pids; do as_root kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 40); do
        [ -n "$(pids_on_5672)" ] || break
        sleep 0.5
    done
    for pid in $sys_pids; do as_root kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.5
    [ -z "$(pids_on_5672)" ] || die "could not free port 5672 from the system rabbitmq-server"
    say "system rabbitmq-server stopped; 5672 is free"
}

dep_rabbitmq() {
    if dpkg-query -W -f='${Status}' rabbitmq-server 2>/dev/null | grep -q 'install ok installed'; then
        say "rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server) already installed"
    else
        command -v apt-get >/dev/null 2>&1 || die "apt-get not found: rabbitmq-server must come from Debian"
        say "installing Debian rabbitmq-server (apt-get update + install)"
        # Keep the postinst from starting the system service: a policy-rc.d
        # that denies every start, only if the machine has none already.
        local own_policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            as_root sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
            own_policy=1
        fi
        local rc=0
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
        if [ "$rc" = 0 ]; then
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                rabbitmq-server || rc=$?
        fi
        [ -n "$own_policy" ] && as_root rm -f /usr/sbin/policy-rc.d
        [ "$rc" = 0 ] || die "apt-get install rabbitmq-server failed (rc $rc)"
        # Do not come back on reboot either.
        if [ -d /run/systemd/system ]; then
            as_root systemctl disable rabbitmq-server >/dev/null 2>&1 || true
        fi
        say "installed rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server)"
    fi
    stop_system_rabbitmq
}

# ---------------------------------------------------------------- python
dep_python() {
    # The pika suite's TLS tests use a PKI made with the openssl CLI (scripts/test-pki.sh).
    if ! command -v openssl >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || die "openssl not found (needed by scripts/test-pki.sh)"
        say "installing openssl (apt)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl
    fi
    local reqs=() f
    for f in tests/requirements.txt tests/clients/python/requirements.txt tests/differential/requirements.txt tests/bench/requirements.txt; do
        [ -f "$f" ] && reqs+=("$f")
    done
    local base="pika pytest"
    local stamp
    stamp="$( { echo "$base"; python3 --version 2>&1; for f in "${reqs[@]}"; do echo "$f"; cat "$f"; done; } | sha)"
    if [ -x "$WARREN_VENV/bin/python" ] &&
        [ "$(cat "$WARREN_VENV/.warren-stamp" 2>/dev/null || true)" = "$stamp" ] &&
        "$WARREN_VENV/bin/python" -c 'import pika, pytest' 2>/dev/null; then
        say "python venv .deps/venv up to date ($("$WARREN_VENV/bin/python" -c 'import pika, pytest; print("pika", pika.__version__, "pytest", pytest.__version__)'))"
        return 0
    fi
    if [ ! -x "$WARREN_VENV/bin/python" ]; then
        say "creating python venv at .deps/venv"
        mkdir -p "$(dirname "$WARREN_VENV")"
        if ! python3 -m venv "$WARREN_VENV" 2>/dev/null; then
            rm -rf "$WARREN_VENV"
            # Debian's system python needs python3-venv for ensurepip.
            if [ "$(command -v python3)" = /usr/bin/python3 ] && command -v apt-get >/dev/null 2>&1; then
                say "installing python3-venv (apt)"
                as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
                python3 -m venv "$WARREN_VENV"
            else
                die "python3 -m venv failed"
            fi
        fi
    fi
    local args=()
    for f in "${reqs[@]}"; do args+=(-r "$f"); done
    say "pip install $base ${args[*]:-}"
    # shellcheck disable=SC2086
    "$WARREN_VENV/bin/python" -m pip install -q --disable-pip-version-check $base "${args[@]}"
    echo "$stamp" >"$WARREN_VENV/.warren-stamp"
    say "python venv ready ($("$WARREN_VENV/bin/python" -c 'import pika, pytest; print("pika", pika.__version__, "pytest", pytest.__version__)'))"
}

# ---------------------------------------------------------------- node
dep_node() {
    local found=0 pj dir stamp
    while IFS= read -r pj; do
        found=1
        dir="$(dirname "$pj")"
        stamp="$(cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha)"
        if [ -d "$dir/node_modules" ] &&
            [ "$(cat "$dir/node_modules/.warren-stamp" 2>/dev/null || true)" = "$stamp" ]; then
            say "npm packages in $dir up to date"
            continue
        fi
        command -v npm >/dev/null 2>&1 || die "npm not found (needed for $dir)"
        if [ -f "$dir/package-lock.json" ]; then
            say "npm ci in $dir"
            (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
        else
            say "npm install in $dir (no package-lock.json yet)"
            (cd "$dir" && npm install --no-audit --no-fund --loglevel=error)
        fi
        # Recompute: npm install may have just written package-lock.json.
        cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha >"$dir/node_modules/.warren-stamp"
        say "npm packages in $dir installed"
    done < <(find tests -name package.json -not -path '*/node_modules/*' 2>/dev/null | sort)
    if [ "$found" = 0 ]; then
        say "no tests/**/package.json yet; nothing to install for node"
    fi
}

# ---------------------------------------------------------------- perftest
dep_perftest() {
    if [ -f "$PERFTEST_JAR" ] && [ -d "$PERFTEST_DIR/lib" ]; then
        say "PerfTest $PERFTEST_VERSION already at $PERFTEST_JAR"
        return 0
    fi
    command -v java >/dev/null 2>&1 || die "java not found (needed for PerfTest)"
    command -v mvn >/dev/null 2>&1 || die "mvn not found (needed to fetch PerfTest from Maven Central)"
    say "fetching com.rabbitmq:perf-test:$PERFTEST_VERSION and its runtime dependencies from Maven Central"
    mkdir -p "$WARREN_CACHE"
    local tmp
    tmp="$(mktemp -d "$WARREN_CACHE/.perf-test-XXXXXX")"
    cat >"$tmp/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.warren</groupId>
  <artifactId>perf-test-fetch</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>com.rabbitmq</groupId>
      <artifactId>perf-test</artifactId>
      <version>${PERFTEST_VERSION}</version>
    </dependency>
  </dependencies>
</project>
EOF
    # (sed: mvn -q still emits bare colour-reset escapes)
    if ! (cd "$tmp" && mvn -B -q -Dstyle.color=never -f pom.xml dependency:copy-dependencies \
        -DoutputDirectory="$tmp/lib" -DincludeScope=runtime 2>&1 | sed 's/\x1b\[[0-9;]*m//g'); then
        rm -rf "$tmp"
        die "mvn could not fetch com.rabbitmq:perf-test:$PERFTEST_VERSION"
    fi
    rm -f "$tmp/pom.xml"
    # Launcher jar: Main-Class + Class-Path (lib/*.jar), so `java -jar` works.
    python3 - "$tmp" "$(basename "$PERFTEST_JAR")" <<'EOF'
import os, sys, zipfile
d, name = sys.argv[1], sys.argv[2]
jars = sorted(f for f in os.listdir(os.path.join(d, "lib")) if f.endswith(".jar"))
def header(key, value):
    # Manifest lines are at most 72 bytes; continuation lines start with a space.
    raw = f"{key}: {value}".encode()
    out = [raw[:72]]
    raw = raw[72:]
    while raw:
        out.append(b" " + raw[:71])
        raw = raw[71:]
    return b"\r\n".join(out) + b"\r\n"
mf = (header("Manifest-Version", "1.0")
      + header("Main-Class", "com.rabbitmq.perf.PerfTest")
      + header("Class-Path", " ".join("lib/" + j for j in jars))
      + b"\r\n")
with zipfile.ZipFile(os.path.join(d, name), "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("META-INF/MANIFEST.MF", mf)
EOF
    java -jar "$tmp/$(basename "$PERFTEST_JAR")" --version >/dev/null 2>&1 ||
        { rm -rf "$tmp"; die "the assembled PerfTest does not run (java -jar ... --version)"; }
    rm -rf "$PERFTEST_DIR"
    mv "$tmp" "$PERFTEST_DIR"
    say "PerfTest $PERFTEST_VERSION installed: java -jar $PERFTEST_JAR"
}

# ---------------------------------------------------------------- netns
dep_netns() {
    local need=()
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v iptables >/dev/null 2>&1 || need+=(iptables)
    if [ ${#need[@]} = 0 ]; then
        say "ip and iptables present"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "need ${need[*]} and apt-get is not available"
    say "installing ${need[*]} (apt)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null ||
        { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; } ||
        die "apt-get install ${need[*]} failed"
}

# ---------------------------------------------------------------- main
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(rabbitmq netns python node perftest)
for t in "${targets[@]}"; do
    case "$t" in
    rabbitmq) dep_rabbitmq ;;
    python) dep_python ;;
    node) dep_node ;;
    netns) dep_netns ;;
    perftest) dep_perftest ;;
    *) die "unknown dependency '$t' (rabbitmq|netns|python|node|perftest)" ;;
    esac
done
say "all requested dependencies present"
