#!/usr/bin/env bash
# RabbitMQ's own CLI, rabbitmqadmin, against Warren's management API.
#
#   tests/management/rabbitmqadmin_test.sh            # builds and starts a Warren
#   WARREN_MGMT_PORT=15672 tests/management/rabbitmqadmin_test.sh --no-start
#                                                      # against a running broker
#
# Starts the debug broker binary (honours CARGO_TARGET_DIR) on free loopback
# ports, then lists, declares, publishes, gets, binds, exports and imports
# through rabbitmqadmin and checks its output. rabbitmqadmin comes with
# Debian's rabbitmq-server package (scripts/deps.sh rabbitmq installs it), or
# set RABBITMQADMIN to another copy. Exit 0 on success.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"
cd "$WARREN_ROOT"

ADMIN="${RABBITMQADMIN:-$(command -v rabbitmqadmin || true)}"
[ -n "$ADMIN" ] && [ -e "$ADMIN" ] || die "rabbitmqadmin not found (scripts/deps.sh rabbitmq installs Debian's rabbitmq-server, which ships it)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/warren-rabbitmqadmin.XXXXXX")"
WARREN_PID=""
cleanup() {
    local rc=$?
    set +e
    [ -n "$WARREN_PID" ] && stop_warren "$WARREN_PID"
    if [ "$rc" != 0 ] && [ -f "$WORK/warren.log" ]; then
        echo "---- warren log ----"
        tail -n 40 "$WORK/warren.log"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

if [ "${1:-}" != "--no-start" ]; then
    cargo build -q -p warren-broker
    start_warren "$(cargo_target_dir)/debug/warren-broker" "$(free_port)" "$WORK/data" "$WORK/warren.log"
    [ -n "$WARREN_MGMT_PORT" ] || die "this warren-broker has no --management-listen flag"
    for _ in $(seq 1 100); do port_open "$WARREN_MGMT_PORT" && break; sleep 0.1; done
fi
: "${WARREN_MGMT_PORT:?set WARREN_MGMT_PORT with --no-start}"

admin() { python3 "$ADMIN" -H 127.0.0.1 -P "$WARREN_MGMT_PORT" -u guest -p guest "$@"; }
PASSED=0
check() { # check NAME EXPECTED-SUBSTRING COMMAND...
    local name="$1" want="$2" out
    shift 2
    if ! out="$("$@" 2>&1)"; then
        printf 'FAIL %s: command failed\n%s\n' "$name" "$out"
        exit 1
    fi
    if [[ "$out" != *"$want"* ]]; then
        printf 'FAIL %s: expected %q in\n%s\n' "$name" "$want" "$out"
        exit 1
    fi
    PASSED=$((PASSED + 1))
    echo "ok   $name"
}
fails() { # fails NAME EXPECTED-SUBSTRING COMMAND... (the command must fail)
    local name="$1" want="$2" out
    shift 2
    if out="$("$@" 2>&1)"; then
        printf 'FAIL %s: command succeeded\n%s\n' "$name" "$out"
        exit 1
    fi
    if [[ "$out" != *"$want"* ]]; then
        printf 'FAIL %s: expected %q in\n%s\n' "$name" "$want" "$out"
        exit 1
    fi
    PASSED=$((PASSED + 1))
    echo "ok   $name"
}

Q="radm-q-$$"
X="radm-x-$$"
check "show overview" "Warren" admin -f raw_json show overview
check "list exchanges" "amq.topic" admin list exchanges
check "declare queue" "queue declared" admin declare queue name="$Q" durable=true
check "list queues" "$Q" admin list queues name messages
check "declare exchange" "exchange declared" admin declare exchange name="$X" type=topic
check "declare binding" "binding declared" admin declare binding source="$X" destination="$Q" routing_key="order.*"
check "list bindings" "order.*" admin list bindings source destination routing_key
check "publish routed" "Message published" admin publish exchange="$X" routing_key=order.new payload=hello
check "publish unroutable" "NOT routed" admin publish exchange="$X" routing_key=nothing payload=x
check "queue has one message" '"messages":1' admin -f raw_json list queues name messages
check "get (requeue)" "hello" admin get queue="$Q" ackmode=ack_requeue_true
check "get (ack)" "hello" admin get queue="$Q" ackmode=ack_requeue_false
check "queue is empty" '"messages":0' admin -f raw_json list queues name messages
check "declare policy" "policy declared" admin declare policy name="radm-p-$$" pattern="^$Q\$" definition='{"max-length": 10}' apply-to=queues
check "list policies" "radm-p-$$" admin list policies
fails "invalid policy" "bogus" admin declare policy name=bad pattern=. definition='{"bogus": 1}'
check "declare user" "user declared" admin declare user name="radm-u-$$" password=pw tags=management
check "declare permission" "permission declared" admin declare permission vhost=/ user="radm-u-$$" configure=".*" write=".*" read=".*"
check "list users" "radm-u-$$" admin list users
check "declare parameter" "parameter declared" admin declare parameter component=federation-upstream name="radm-up-$$" value='{"uri": "amqp://remote"}'
fails "invalid parameter" "prefetch-count" admin declare parameter component=federation-upstream name=bad value='{"uri": "amqp://r", "prefetch-count": "x"}'
check "list nodes" "warren@" admin list nodes
check "export" "Exported definitions" admin export "$WORK/defs.json"
check "import" "Uploaded definitions" admin import "$WORK/defs.json"
check "purge queue" "queue purged" admin purge queue name="$Q"
check "delete binding" "binding deleted" admin delete binding source="$X" destination_type=queue destination="$Q" properties_key="order.*"
check "delete exchange" "exchange deleted" admin delete exchange name="$X"
check "delete queue" "queue deleted" admin delete queue name="$Q"
check "delete policy" "policy deleted" admin delete policy name="radm-p-$$"
check "delete parameter" "parameter deleted" admin delete parameter component=federation-upstream name="radm-up-$$"
check "delete user" "user deleted" admin delete user name="radm-u-$$"
fails "bad credentials" "Access refused" python3 "$ADMIN" -H 127.0.0.1 -P "$WARREN_MGMT_PORT" -u guest -p wrong list queues
echo "rabbitmqadmin: $PASSED checks passed"
