#!/usr/bin/env python3
"""Management API compatibility: the same calls against RabbitMQ and Warren.

    python3 tests/management/compat.py --warren http://127.0.0.1:PORT \
        [--rabbitmq http://127.0.0.1:15673] [--user guest --password guest] [--show]

Runs each call against both brokers (standard library only: urllib) and compares
the status code and the set of JSON fields. A field Warren serves that RabbitMQ
does not, or a different status, is a DIFF (exit 1) unless listed in DELIBERATE.
Fields RabbitMQ serves that Warren leaves out (rates, Erlang process statistics)
are listed as "missing" for information only: Warren serves only what it can fill
truthfully. Objects are created under unique names and deleted afterwards.
"""

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

# (call label, field) → why Warren differs on purpose.
_FRESH_QUEUE = "RabbitMQ leaves a new queue's counters out until its first stats emission (5 s)"
_FRESH_NODE = "RabbitMQ leaves message totals out until its first stats emission after start (5 s)"
_STATS = [f"message_stats.{n}{suffix}" for n in ("publish", "deliver_get", "ack", "redeliver")
          for suffix in ("", "_details", "_details.rate")]
_FRESH_FIELDS = ("consumers", "messages", "messages_ready", "messages_unacknowledged",
                 "operator_policy", "policy", "state", "message_stats", *_STATS)
DELIBERATE = {
    ("definitions", "vhosts[].description"): "Warren exports vhost metadata (RabbitMQ 3.11+ does too)",
    ("definitions", "vhosts[].tags"): "Warren exports vhost metadata (RabbitMQ 3.11+ does too)",
    ("nodes", "[].being_drained"): "Warren's drain (maintenance mode) flag; RabbitMQ 3.10 "
                                   "reports maintenance mode only through rabbitmq-diagnostics",
    ("nodes", "[].disk_io_alarm"): "Warren's storage-failure alarm (a write or fsync error), beside "
                                   "RabbitMQ's mem_alarm and disk_free_alarm; RabbitMQ has none",
    **{(label, f"[].{f}"): "Warren's link counters (messages forwarded, pending acknowledgement); "
                           "RabbitMQ 3.10 reports neither"
       for label in ("shovels", "shovels vhost", "federation-links running", "federation-links vhost")
       for f in ("forwarded", "pending")},
    **{("queue", f): _FRESH_QUEUE for f in _FRESH_FIELDS},
    **{("queues", f"[].{f}"): _FRESH_QUEUE for f in _FRESH_FIELDS},
    # The same for the totals of a node started moments ago (CI once compared before
    # RabbitMQ's first emission): RabbitMQ serves these once it has emitted stats.
    **{(label, f"{prefix}{f}"): _FRESH_NODE
       for label, prefix in (("overview", "queue_totals."), ("vhosts", "[]."), ("vhost /", ""))
       for f in ("messages", "messages_ready", "messages_unacknowledged")},
}


class Broker:
    def __init__(self, base, user, password):
        self.base = base.rstrip("/") + "/api"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method, path, body=None, auth=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", auth or self.auth)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")


def fields(v, prefix=""):
    """Field paths of a JSON value: keys of objects, `[]` for list elements."""
    out = set()
    if isinstance(v, dict):
        for k, x in v.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            # Free-form maps: their keys are data, not schema.
            if k not in ("arguments", "client_properties", "definition", "value", "properties",
                         "headers", "cluster_state", "metadata", "capabilities"):
                out |= fields(x, p)
    elif isinstance(v, list):
        for x in v:
            out |= fields(x, f"{prefix}[]")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warren", required=True)
    ap.add_argument("--rabbitmq", default="http://127.0.0.1:15673")
    ap.add_argument("--user", default="guest")
    ap.add_argument("--password", default="guest")
    ap.add_argument("--show", action="store_true", help="print both responses")
    args = ap.parse_args()
    brokers = {
        "rabbitmq": Broker(args.rabbitmq, args.user, args.password),
        "warren": Broker(args.warren, args.user, args.password),
    }
    for name, b in brokers.items():
        try:
            b.call("GET", "/overview")
        except OSError as e:
            print(f"{name} not reachable at {b.base}: {e}")
            return 2

    n = f"compat-{os.getpid()}"
    q, x, u, p, up = f"{n}-q", f"{n}-x", f"{n}-u", f"{n}-p", f"{n}-up"
    # A shovel and a federation link on each broker, both within the node ("amqp://").
    sh, fx, fup, fpol = f"{n}-shovel", f"{n}-fx", f"{n}-fup", f"{n}-fpol"
    shovel = {"src-protocol": "amqp091", "src-uri": "amqp://", "src-queue": f"{n}-shq",
              "dest-protocol": "amqp091", "dest-uri": "amqp://", "dest-queue": f"{n}-shq2"}
    bad_auth = "Basic " + base64.b64encode(b"guest:wrong").decode()
    msg = {"properties": {"delivery_mode": 2, "headers": {"h": 1}}, "routing_key": "a.b",
           "payload": "hello", "payload_encoding": "string"}
    # (label, method, path, body, extra) — compared in order; cleanup is part of the script.
    calls = [
        ("overview", "GET", "/overview", None, {}),
        ("overview bad login", "GET", "/overview", None, {"auth": bad_auth}),
        ("whoami", "GET", "/whoami", None, {}),
        ("nodes", "GET", "/nodes", None, {}),
        ("cluster name", "GET", "/cluster-name", None, {}),
        ("vhosts", "GET", "/vhosts", None, {}),
        ("vhost /", "GET", "/vhosts/%2F", None, {}),
        ("vhost missing", "GET", "/vhosts/compat-nope", None, {}),
        ("users", "GET", "/users", None, {}),
        ("permissions", "GET", "/permissions", None, {}),
        ("topic-permissions", "GET", "/topic-permissions", None, {}),
        ("unknown path", "GET", "/compat-nope", None, {}),
        ("declare queue", "PUT", f"/queues/%2F/{q}", {"durable": False}, {}),
        ("redeclare queue", "PUT", f"/queues/%2F/{q}", {"durable": False}, {}),
        ("inequivalent queue", "PUT", f"/queues/%2F/{q}", {"durable": True}, {}),
        ("queue bad json type", "PUT", f"/queues/%2F/{n}-q2", {"durable": "yes"}, {}),
        ("queue", "GET", f"/queues/%2F/{q}", None, {}),
        ("queue missing", "GET", f"/queues/%2F/{n}-nope", None, {}),
        ("declare exchange", "PUT", f"/exchanges/%2F/{x}", {"type": "topic"}, {}),
        ("bad exchange type", "PUT", f"/exchanges/%2F/{n}-x2", {"type": "nosuch"}, {}),
        ("reserved exchange", "PUT", f"/exchanges/%2F/amq.{n}", {"type": "direct"}, {}),
        ("exchange", "GET", f"/exchanges/%2F/{x}", None, {}),
        ("exchanges", "GET", "/exchanges/%2F", None, {}),
        ("bind", "POST", f"/bindings/%2F/e/{x}/q/{q}", {"routing_key": "a.*"}, {}),
        ("bind missing queue", "POST", f"/bindings/%2F/e/{x}/q/{n}-nope", {"routing_key": "a"}, {}),
        ("bindings between", "GET", f"/bindings/%2F/e/{x}/q/{q}", None, {}),
        ("binding by key", "GET", f"/bindings/%2F/e/{x}/q/{q}/a.*", None, {}),
        ("queue bindings", "GET", f"/queues/%2F/{q}/bindings", None, {}),
        ("publish", "POST", f"/exchanges/%2F/{x}/publish", msg, {}),
        ("publish unroutable", "POST", f"/exchanges/%2F/{x}/publish", dict(msg, routing_key="zz"), {}),
        ("publish bad base64", "POST", f"/exchanges/%2F/{x}/publish", dict(msg, payload="%%%", payload_encoding="base64"), {}),
        ("get", "POST", f"/queues/%2F/{q}/get", {"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"}, {}),
        ("get bad encoding", "POST", f"/queues/%2F/{q}/get", {"count": 1, "ackmode": "ack_requeue_true", "encoding": "zzz"}, {}),
        ("queues", "GET", "/queues/%2F", None, {}),
        ("purge", "DELETE", f"/queues/%2F/{q}/contents", None, {}),
        ("connections", "GET", "/connections", None, {}),
        ("channels", "GET", "/channels", None, {}),
        ("consumers", "GET", "/consumers", None, {}),
        ("put policy", "PUT", f"/policies/%2F/{p}", {"pattern": f"^{q}$", "definition": {"max-length": 5}}, {}),
        ("policy", "GET", f"/policies/%2F/{p}", None, {}),
        ("policy missing pattern", "PUT", f"/policies/%2F/{p}-bad", {"definition": {"max-length": 1}}, {}),
        ("policy bad key", "PUT", f"/policies/%2F/{p}-bad", {"pattern": ".", "definition": {"bogus": 1}}, {}),
        ("put upstream", "PUT", f"/parameters/federation-upstream/%2F/{up}", {"value": {"uri": "amqp://remote"}}, {}),
        ("upstream", "GET", f"/parameters/federation-upstream/%2F/{up}", None, {}),
        ("upstream bad key", "PUT", f"/parameters/federation-upstream/%2F/{up}-bad", {"value": {"uri": "amqp://r", "bogus": 1}}, {}),
        ("unknown component", "PUT", f"/parameters/compat-nope/%2F/x", {"value": {}}, {}),
        ("federation-links", "GET", "/federation-links", None, {}),
        ("put shovel", "PUT", f"/parameters/shovel/%2F/{sh}", {"value": shovel}, {}),
        ("shovel bad key", "PUT", f"/parameters/shovel/%2F/{sh}-bad", {"value": dict(shovel, bogus=1)}, {}),
        ("shovels", "GET", "/shovels", None, {"wait": "state"}),
        ("shovels vhost", "GET", "/shovels/%2F", None, {}),
        ("federated exchange", "PUT", f"/exchanges/%2F/{fx}", {"type": "topic"}, {}),
        ("put local upstream", "PUT", f"/parameters/federation-upstream/%2F/{fup}", {"value": {"uri": "amqp://"}}, {}),
        ("federation policy", "PUT", f"/policies/%2F/{fpol}",
         {"pattern": f"^{fx}$", "apply-to": "exchanges", "definition": {"federation-upstream": fup}}, {}),
        ("federation-links running", "GET", "/federation-links", None, {"wait": "status"}),
        ("federation-links vhost", "GET", "/federation-links/%2F", None, {}),
        ("delete federation policy", "DELETE", f"/policies/%2F/{fpol}", None, {}),
        ("delete local upstream", "DELETE", f"/parameters/federation-upstream/%2F/{fup}", None, {}),
        ("delete federated exchange", "DELETE", f"/exchanges/%2F/{fx}", None, {}),
        ("delete shovel", "DELETE", f"/parameters/shovel/%2F/{sh}", None, {}),
        ("delete shovel source", "DELETE", f"/queues/%2F/{n}-shq", None, {}),
        ("delete shovel destination", "DELETE", f"/queues/%2F/{n}-shq2", None, {}),
        ("put user", "PUT", f"/users/{u}", {"password": "pw", "tags": "management"}, {}),
        ("user", "GET", f"/users/{u}", None, {}),
        ("put permission", "PUT", f"/permissions/%2F/{u}", {"configure": ".*", "write": ".*", "read": ".*"}, {}),
        ("permission missing read", "PUT", f"/permissions/%2F/{u}", {"configure": ".*", "write": ".*"}, {}),
        ("permission", "GET", f"/permissions/%2F/{u}", None, {}),
        ("management user reads users", "GET", "/users", None, {"login": (u, "pw")}),
        ("put limited vhost", "PUT", f"/vhosts/{n}-v", {}, {}),
        ("put vhost limit", "PUT", f"/vhost-limits/{n}-v/max-queues", {"value": 5}, {}),
        ("put vhost limit 2", "PUT", f"/vhost-limits/{n}-v/max-connections", {"value": -1}, {}),
        ("vhost limits", "GET", f"/vhost-limits/{n}-v", None, {}),
        ("vhost limit not a number", "PUT", f"/vhost-limits/{n}-v/max-queues", {"value": "5"}, {}),
        ("vhost limit unknown", "PUT", f"/vhost-limits/{n}-v/max-channels", {"value": 5}, {}),
        ("vhost limit no value", "PUT", f"/vhost-limits/{n}-v/max-queues", {}, {}),
        ("vhost limit no vhost", "PUT", f"/vhost-limits/{n}-nope/max-queues", {"value": 5}, {}),
        ("delete vhost limit", "DELETE", f"/vhost-limits/{n}-v/max-queues", None, {}),
        ("put user limit", "PUT", f"/user-limits/{u}/max-channels", {"value": 7}, {}),
        ("user limits", "GET", f"/user-limits/{u}", None, {}),
        ("user with limits", "GET", f"/users/{u}", None, {}),
        ("user limit unknown", "PUT", f"/user-limits/{u}/max-queues", {"value": 1}, {}),
        ("user limits no user", "GET", f"/user-limits/{n}-nope", None, {}),
        ("delete user limit", "DELETE", f"/user-limits/{u}/max-channels", None, {}),
        ("delete limited vhost", "DELETE", f"/vhosts/{n}-v", None, {}),
        ("definitions", "GET", "/definitions", None, {}),
        ("health alarms", "GET", "/health/checks/alarms", None, {}),
        ("health local-alarms", "GET", "/health/checks/local-alarms", None, {}),
        ("health virtual-hosts", "GET", "/health/checks/virtual-hosts", None, {}),
        ("health quorum", "GET", "/health/checks/node-is-quorum-critical", None, {}),
        ("health port 1", "GET", "/health/checks/port-listener/1", None, {}),
        ("health port invalid", "GET", "/health/checks/port-listener/abc", None, {}),
        ("delete user", "DELETE", f"/users/{u}", None, {}),
        ("delete upstream", "DELETE", f"/parameters/federation-upstream/%2F/{up}", None, {}),
        ("delete policy", "DELETE", f"/policies/%2F/{p}", None, {}),
        ("delete binding", "DELETE", f"/bindings/%2F/e/{x}/q/{q}/a.*", None, {}),
        ("delete exchange", "DELETE", f"/exchanges/%2F/{x}", None, {}),
        ("delete queue", "DELETE", f"/queues/%2F/{q}", None, {}),
        ("delete queue again", "DELETE", f"/queues/%2F/{q}", None, {}),
    ]
    diffs = 0
    for label, method, path, body, extra in calls:
        out = {}
        for name, b in brokers.items():
            auth = extra.get("auth")
            if "login" in extra:
                lu, lp = extra["login"]
                auth = "Basic " + base64.b64encode(f"{lu}:{lp}".encode()).decode()
            out[name] = b.call(method, path, body, auth=auth)
            if "wait" in extra:
                # Links start asynchronously: compare them once every one is running.
                key, deadline = extra["wait"], time.time() + 20
                while time.time() < deadline and not (
                        isinstance(out[name][1], list) and out[name][1]
                        and all(e.get(key) == "running" for e in out[name][1])):
                    time.sleep(0.25)
                    out[name] = b.call(method, path, body, auth=auth)
        (rs, rb), (ws, wb) = out["rabbitmq"], out["warren"]
        problems, notes = [], []
        if rs != ws:
            problems.append(f"status rabbitmq {rs} warren {ws}")
        rf, wf = fields(rb), fields(wb)
        if isinstance(rb, list) and isinstance(wb, list) and (not rb or not wb):
            rf = wf = set()  # one side empty (e.g. other clients' connections): no schema to compare
        extra_fields = sorted(f for f in wf - rf if (label, f) not in DELIBERATE)
        if extra_fields and rs == ws:
            problems.append("fields only Warren serves: " + ", ".join(extra_fields))
        missing = sorted(rf - wf)
        if missing:
            notes.append("not served by Warren: " + ", ".join(missing[:12]) + (" …" if len(missing) > 12 else ""))
        print(f"{'DIFF' if problems else 'PASS'} {label}: {method} {path} [{rs}/{ws}]")
        for line in problems:
            print(f"     {line}")
        for line in notes:
            print(f"     ({line})")
        if args.show:
            print(f"     rabbitmq: {json.dumps(rb)[:400]}\n     warren:   {json.dumps(wb)[:400]}")
        diffs += bool(problems)
    print(f"management compat: {len(calls) - diffs} passed, {diffs} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
