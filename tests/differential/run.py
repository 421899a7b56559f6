#!/usr/bin/env python3
"""Differential suite: the same scenarios against Warren and against RabbitMQ.

    python tests/differential/run.py --warren URL --rabbitmq URL [-k SUBSTR ...]

Each scenario is a function taking a ``Ctx`` -- a connection factory (call it to
get a fresh ``pika.BlockingConnection``) that also hands out unique names and
cleans up after itself -- and returning a JSON-serialisable *observation* of
what the client saw: delivered bodies in order, selected properties,
redelivered flags, header tables (x-death ...), reply codes and texts of
channel/connection closes, basic.return codes, confirm ack/nack sequences,
message counts from declare-ok/purge-ok/delete-ok.

Volatile values are normalised before comparison: the unique names a scenario
asked for become ``<base>``, server-generated queue names ``<amq.gen>``,
timestamps in tables ``<time>``.

Every scenario runs against both brokers (concurrently, each side in its own
thread with its own connections and names); the two observations must be
equal. Differences listed in ``DELIBERATE`` (scenario -> reason, the reason
also written in Warren's README) are reported but do not fail the run.

Exit status: 0 when every scenario passed (or differed deliberately),
1 on any unexpected difference or scenario error, 2 when a broker cannot be
reached at all.
"""

import argparse
import datetime
import decimal
import difflib
import json
import re
import sys
import threading
import time
import traceback
import urllib.parse
import uuid

import pika
from pika import spec
from pika.exceptions import (AMQPConnectionError, ChannelClosedByBroker,
                             ConnectionClosedByBroker, NackError, UnroutableError)

# scenario name -> reason. A difference here is deliberate: reported, not a failure.
# Every entry must also be documented in Warren's README.
DELIBERATE = {}

# Header keys Warren adds on purpose that the reference RabbitMQ (3.10) does not send.
# They are removed from Warren's observations before comparing (and nothing else is),
# so every other difference in the same scenario still fails the run.
DELIBERATE_EXTRA_KEYS = {
    "x-last-death-reason": "RabbitMQ 3.13+ sends x-last-death-*; 3.10 does not. Warren "
                           "follows the newer behaviour (broker-semantics.md asks for it).",
    "x-last-death-queue": "see x-last-death-reason",
    "x-last-death-exchange": "see x-last-death-reason",
}


def strip_deliberate_keys(obs):
    """Remove DELIBERATE_EXTRA_KEYS from dicts anywhere in an observation."""
    if isinstance(obs, dict):
        return {k: strip_deliberate_keys(v) for k, v in obs.items()
                if k not in DELIBERATE_EXTRA_KEYS}
    if isinstance(obs, list):
        return [strip_deliberate_keys(v) for v in obs]
    return obs

SCENARIOS = []
SCENARIO_TIMEOUT = 20.0  # seconds, per scenario and broker (--timeout)


def scenario(fn):
    SCENARIOS.append(fn)
    return fn


# ---------------------------------------------------------------------------
# context: connection factory, unique names, cleanup
# ---------------------------------------------------------------------------


class Ctx:
    def __init__(self, url, scenario_name):
        self.url = url
        self.scenario = scenario_name
        self.suffix = uuid.uuid4().hex[:10]
        self.names = {}  # full name -> placeholder
        self.queues = []
        self.exchanges = []
        self.conns = []

    # the connection factory
    def __call__(self, vhost=None, password=None, **overrides):
        url = self.url
        if vhost is not None or password is not None:
            url = url_with(url, vhost=vhost, password=password)
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.blocked_connection_timeout = 10
        for k, v in overrides.items():
            setattr(params, k, v)
        c = pika.BlockingConnection(params)
        self.conns.append(c)
        return c

    def name(self, base):
        full = f"diff.{self.scenario}.{base}.{self.suffix}"
        self.names[full] = f"<{base}>"
        return full

    def queue(self, ch, base, **kwargs):
        name = self.name(base)
        ok = ch.queue_declare(name, **kwargs)
        self.queues.append(name)
        return name, ok.method

    def q(self, ch, base, **kwargs):
        return self.queue(ch, base, **kwargs)[0]

    def x(self, ch, base, exchange_type="direct", **kwargs):
        name = self.name(base)
        ch.exchange_declare(name, exchange_type=exchange_type, **kwargs)
        self.exchanges.append(name)
        return name

    def cleanup(self):
        try:
            c = pika.BlockingConnection(pika.URLParameters(self.url))
            ch = c.channel()
            for kind, names in (("q", self.queues), ("x", self.exchanges)):
                for n in names:
                    if not ch.is_open:
                        ch = c.channel()
                    try:
                        if kind == "q":
                            ch.queue_delete(n)
                        else:
                            ch.exchange_delete(n)
                    except (ChannelClosedByBroker, pika.exceptions.ChannelWrongStateError):
                        pass
            c.close()
        except Exception:  # noqa: BLE001 - cleanup must never mask the result
            pass
        for c in self.conns:
            try:
                if c.is_open:
                    c.close()
            except Exception:  # noqa: BLE001
                pass


def url_with(url, vhost=None, password=None):
    u = urllib.parse.urlsplit(url)
    netloc, path = u.netloc, u.path
    if password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:{password}@{host}"
    if vhost is not None:
        path = "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit((u.scheme, netloc, path, u.query, u.fragment))


# ---------------------------------------------------------------------------
# observation helpers
# ---------------------------------------------------------------------------

PROPS = ["content_type", "content_encoding", "headers", "delivery_mode", "priority",
         "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type",
         "user_id", "app_id", "cluster_id"]


def props_obs(p):
    return {k: getattr(p, k) for k in PROPS if getattr(p, k) is not None}


def msg(m, p, b, props=True, tag=False):
    """Observation of one delivery (Basic.Deliver or Basic.GetOk)."""
    o = {"body": b, "exchange": m.exchange, "routing_key": m.routing_key,
         "redelivered": m.redelivered}
    if props:
        pr = props_obs(p)
        if pr:
            o["props"] = pr
    if tag:
        o["delivery_tag"] = m.delivery_tag
    if isinstance(m, spec.Basic.GetOk):
        o["remaining"] = m.message_count
    return o


def close_obs(e):
    if isinstance(e, ChannelClosedByBroker):
        return {"close": "channel", "code": e.reply_code, "text": e.reply_text}
    if isinstance(e, ConnectionClosedByBroker):
        return {"close": "connection", "code": e.reply_code, "text": e.reply_text}
    raise e


def attempt(fn, *args, **kwargs):
    """Run fn; return {"ok": result} or the observation of the broker's close."""
    try:
        r = fn(*args, **kwargs)
        if isinstance(r, pika.frame.Method):
            r = method_obs(r.method)
        return {"ok": r}
    except (ChannelClosedByBroker, ConnectionClosedByBroker) as e:
        return close_obs(e)


def method_obs(method):
    d = {k: v for k, v in vars(method).items() if not k.startswith("_")}
    d["method"] = method.NAME
    return d


def sync(ch):
    """A synchronous round trip, revealing an asynchronous channel close."""
    ch.basic_qos(prefetch_count=0)


def after_async(ch, fn, *args, **kwargs):
    """Run an asynchronous method (publish/ack/...), then a round trip."""
    def run():
        fn(*args, **kwargs)
        sync(ch)
        return "no error"
    return attempt(run)


def pub(ch, exchange, key, body, props=None, mandatory=False):
    """Publish on a confirm channel; return the outcome as seen by the client."""
    try:
        ch.basic_publish(exchange, key, body, props, mandatory=mandatory)
        return "ack"
    except UnroutableError as e:
        return ["returned+ack"] + [[r.method.reply_code, r.method.reply_text] for r in e.messages]
    except NackError as e:
        return ["nack"] + [[r.method.reply_code, r.method.reply_text] for r in e.messages]


def drain(ch, q, n=0, timeout=3.0, quiet=0.0, **kw):
    """basic.get (auto-ack) everything in q.

    Messages that arrive asynchronously (dead letters) are waited for first: up to
    ``timeout`` until the queue holds at least ``n`` ready messages, then ``quiet``
    seconds more for stragglers, so that the order and the remaining counts seen
    by basic.get-ok do not depend on timing."""
    deadline = time.monotonic() + timeout
    while n and time.monotonic() < deadline:
        if ch.queue_declare(q, passive=True).method.message_count >= n:
            break
        time.sleep(0.02)
    if quiet:
        time.sleep(quiet)
    out = []
    while True:
        m, p, b = ch.basic_get(q, auto_ack=True)
        if m is None:
            return out
        out.append(msg(m, p, b, **kw))


def bodies(msgs):
    return [m["body"] for m in msgs]


def pump(conn, until=None, timeout=3.0, settle=0.0):
    """Process events until ``until()`` holds (or timeout), then ``settle`` more."""
    deadline = time.monotonic() + timeout
    while until is not None and not until() and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.02)
    end = time.monotonic() + settle
    while time.monotonic() < end:
        conn.process_data_events(time_limit=0.02)


class Collector:
    """Collects deliveries of one or more consumers, in arrival order."""

    def __init__(self):
        self.got = []  # (label, method, props, body)

    def cb(self, label):
        def on_msg(_ch, m, p, b):
            self.got.append((label, m, p, b))
        return on_msg

    def __len__(self):
        return len(self.got)

    def obs(self, **kw):
        return [dict(consumer=label, **msg(m, p, b, **kw)) for (label, m, p, b) in self.got]


def record_methods(conn):
    """Log (channel, method name, method) of frames received on conn."""
    log = []
    impl = conn._impl  # pylint: disable=protected-access
    orig = impl._process_frame  # pylint: disable=protected-access

    def wrapped(frame_value):
        method = getattr(frame_value, "method", None)
        if method is not None:
            log.append((frame_value.channel_number, method.NAME, method))
        return orig(frame_value)

    impl._process_frame = wrapped  # pylint: disable=protected-access
    return log


def confirm_events(log, channel_number):
    """Method frames a publisher sees, with multiple acks expanded per tag."""
    out = []
    last = 0
    for num, name, m in log:
        if num != channel_number:
            continue
        if name in ("Basic.Ack", "Basic.Nack"):
            kind = "ack" if name == "Basic.Ack" else "nack"
            tags = range(last + 1, m.delivery_tag + 1) if m.multiple else [m.delivery_tag]
            for t in tags:
                out.append([kind, t])
            last = max(last, m.delivery_tag)
        elif name == "Basic.Return":
            out.append(["return", m.reply_code, m.reply_text, m.exchange, m.routing_key])
    return out


def _table_types(buf, off, end):
    """Parse an AMQP field table at buf[off:end] into {key: type tag (nested)}."""
    out = {}
    while off < end:
        klen = buf[off]
        key = buf[off + 1:off + 1 + klen].decode("utf-8", "replace")
        off += 1 + klen
        out[key], off = _value_type(buf, off)
    return out


def _value_type(buf, off):
    tag = chr(buf[off])
    off += 1
    fixed = {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "l": 8, "L": 8,
             "f": 4, "d": 8, "D": 5, "T": 8, "V": 0}
    if tag in fixed:
        return tag, off + fixed[tag]
    if tag in ("S", "x"):
        n = int.from_bytes(buf[off:off + 4], "big")
        return tag, off + 4 + n
    if tag == "F":
        n = int.from_bytes(buf[off:off + 4], "big")
        return {"F": _table_types(buf, off + 4, off + 4 + n)}, off + 4 + n
    if tag == "A":
        n = int.from_bytes(buf[off:off + 4], "big")
        items, p, stop = [], off + 4, off + 4 + n
        while p < stop:
            t, p = _value_type(buf, p)
            items.append(t)
        return {"A": items}, stop
    raise ValueError(f"unknown field type {tag!r}")


def record_header_types(conn):
    """Wire types of the ``headers`` table of every content header received on conn
    (a list, in arrival order; None when the message had no headers)."""
    out = []
    impl = conn._impl  # pylint: disable=protected-access
    orig = impl._read_frame  # pylint: disable=protected-access

    def wrapped():
        consumed, f = orig()
        if isinstance(f, pika.frame.Header):
            raw = bytes(impl._frame_buffer[7:consumed - 1])  # pylint: disable=W0212
            flags = int.from_bytes(raw[12:14], "big")
            off = 14
            for bit in (15, 14):  # content-type, content-encoding (shortstr)
                if flags & (1 << bit):
                    off += 1 + raw[off]
            if flags & (1 << 13):
                n = int.from_bytes(raw[off:off + 4], "big")
                out.append(_table_types(raw, off + 4, off + 4 + n))
            else:
                out.append(None)
        return consumed, f

    impl._read_frame = wrapped  # pylint: disable=protected-access
    return out


def confirm_channel(conn):
    ch = conn.channel()
    ch.confirm_delivery()
    return ch


def declare_counts(ch, q):
    r = attempt(ch.queue_declare, q, passive=True)
    if "ok" in r:
        return [r["ok"]["message_count"], r["ok"]["consumer_count"]]
    return r


def counts_once_gone(conn, q, timeout=3.0):
    """declare_counts of a queue that is expected to disappear asynchronously
    (exclusive owner gone, auto-delete, x-expires): poll until the broker says 404
    or the deadline passes, then report what it says."""
    deadline = time.monotonic() + timeout
    while True:
        r = declare_counts(conn.channel(), q)
        if isinstance(r, dict) or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# normalisation and comparison
# ---------------------------------------------------------------------------

GEN_RE = re.compile(r"amq\.gen-[A-Za-z0-9_\-]+")
CTAG_RE = re.compile(r"amq\.ctag-[A-Za-z0-9_\-]+")
REPLY_TO_RE = re.compile(r"amq\.rabbitmq\.reply-to\.[A-Za-z0-9+/=._\-]+")


def normalise(obj, names):
    ordered = sorted(names.items(), key=lambda kv: -len(kv[0]))

    def s(x):
        for full, ph in ordered:
            x = x.replace(full, ph)
        x = GEN_RE.sub("<amq.gen>", x)
        x = CTAG_RE.sub("<amq.ctag>", x)
        x = REPLY_TO_RE.sub("amq.rabbitmq.reply-to.<token>", x)
        return x

    def walk(o):
        if isinstance(o, bytes):
            try:
                return s(o.decode("utf-8"))
            except UnicodeDecodeError:
                return "bytes:" + o.hex()
        if isinstance(o, str):
            return s(o)
        if isinstance(o, datetime.datetime):
            return "<time>"
        if isinstance(o, decimal.Decimal):
            return f"decimal:{o}"
        if isinstance(o, dict):
            return {s(str(k)): walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        if isinstance(o, (bool, int, float)) or o is None:
            return o
        return f"<{type(o).__name__}:{o!r}>"

    return walk(obj)


def strip_reply_texts(obs):
    """--reply-text=prefix: keep only the symbolic part of close texts."""
    if isinstance(obs, dict):
        out = {k: strip_reply_texts(v) for k, v in obs.items()}
        if "close" in out and isinstance(out.get("text"), str):
            out["text"] = out["text"].split(" - ", 1)[0]
        return out
    if isinstance(obs, list):
        return [strip_reply_texts(v) for v in obs]
    return obs


def pretty(obs):
    return json.dumps(obs, indent=2, sort_keys=True, ensure_ascii=False)


def compare(a, b, label_a="rabbitmq", label_b="warren"):
    """Return None when equal, else a unified diff (label_a -> label_b)."""
    pa, pb = pretty(a), pretty(b)
    if pa == pb:
        return None
    return "\n".join(difflib.unified_diff(pa.splitlines(), pb.splitlines(),
                                          fromfile=label_a, tofile=label_b, lineterm="", n=3))


# ---------------------------------------------------------------------------
# scenarios: routing
# ---------------------------------------------------------------------------


@scenario
def routing_direct(ctx):
    c = ctx()
    ch = confirm_channel(c)
    x = ctx.x(ch, "x", "direct")
    q1, q2 = ctx.q(ch, "q1"), ctx.q(ch, "q2")
    ch.queue_bind(q1, x, "k1")
    ch.queue_bind(q2, x, "k1")
    ch.queue_bind(q2, x, "k2")
    ch.queue_bind(q2, x, "k2")  # duplicate binding is idempotent
    outcomes = [pub(ch, x, k, k.encode()) for k in ["k1", "k2", "k3", ""]]
    outcomes.append(pub(ch, "", q1, b"via-default"))
    outcomes.append(pub(ch, "amq.direct", q1, b"amq.direct-unbound"))
    return {"outcomes": outcomes, "q1": drain(ch, q1), "q2": drain(ch, q2)}


@scenario
def routing_fanout(ctx):
    c = ctx()
    ch = confirm_channel(c)
    x = ctx.x(ch, "x", "fanout")
    qs = [ctx.q(ch, f"q{i}") for i in range(3)]
    for i, q in enumerate(qs):
        ch.queue_bind(q, x, f"ignored{i}")
    pub(ch, x, "any.key", b"one")
    ch.queue_unbind(qs[2], x, "ignored2")
    pub(ch, x, "", b"two")
    return {q.split(".")[-2]: drain(ch, q) for q in qs}


TOPIC_PATTERNS = ["#", "*", "a.*", "a.#", "#.b", "a.#.b", "a.*.b", "*.*", "#.#", "a.b",
                  "*.b.#", "#.a.#", "a.*.#", "", "a..b", "*.#.*"]
TOPIC_KEYS = ["", "a", "b", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "x.a.b", "a..b", "ab",
              ".", "a.", ".b", "A.B", "a.b.b"]


@scenario
def routing_topic(ctx):
    c = ctx()
    ch = confirm_channel(c)
    x = ctx.x(ch, "x", "topic")
    queues = {}
    for i, pattern in enumerate(TOPIC_PATTERNS):
        queues[pattern] = ctx.q(ch, f"q{i}")
        ch.queue_bind(queues[pattern], x, pattern)
    for key in TOPIC_KEYS:
        pub(ch, x, key, (key or "<empty>").encode())
    return {f"pattern {p!r}": bodies(drain(ch, q, props=False)) for p, q in queues.items()}


@scenario
def routing_headers(ctx):
    c = ctx()
    ch = confirm_channel(c)
    x = ctx.x(ch, "x", "headers")
    bindings = {
        "all": {"x-match": "all", "a": 1, "b": "two"},
        "any": {"x-match": "any", "a": 1, "b": "two"},
        "default": {"a": 1, "b": "two"},
        "all-with-x": {"x-match": "all-with-x", "a": 1, "x-b": "xb"},
        "any-with-x": {"x-match": "any-with-x", "x-b": "xb"},
        "all-x-ignored": {"x-match": "all", "a": 1, "x-b": "xb"},
        "any-x-ignored": {"x-match": "any", "x-b": "xb"},
        "empty-all": {"x-match": "all"},
        "empty-any": {"x-match": "any"},
    }
    queues = {}
    for label, args in bindings.items():
        queues[label] = ctx.q(ch, label)
        ch.queue_bind(queues[label], x, "", arguments=args)
    cases = [
        ("both", {"a": 1, "b": "two"}),
        ("both+extra", {"a": 1, "b": "two", "c": 3}),
        ("only-a", {"a": 1}),
        ("only-b", {"b": "two"}),
        ("a-as-string", {"a": "1", "b": "two"}),
        ("wrong-a", {"a": 2, "b": "two"}),
        ("a+xb", {"a": 1, "x-b": "xb"}),
        ("xb", {"x-b": "xb"}),
        ("none", {"c": 1}),
        ("no-headers", None),
    ]
    for body, headers in cases:
        pub(ch, x, "", body.encode(), pika.BasicProperties(headers=headers))
    bad = ch.connection.channel()
    invalid = attempt(bad.queue_bind, queues["all"], x, "", arguments={"x-match": "bogus"})
    return {"queues": {label: bodies(drain(ch, q, props=False)) for label, q in queues.items()},
            "invalid-x-match": invalid}


@scenario
def routing_exchange_to_exchange(ctx):
    c = ctx()
    ch = confirm_channel(c)
    top = ctx.x(ch, "top", "topic")
    mid = ctx.x(ch, "mid", "direct")
    fan = ctx.x(ch, "fan", "fanout")
    q1, q2 = ctx.q(ch, "q1"), ctx.q(ch, "q2")
    ch.exchange_bind(destination=mid, source=top, routing_key="a.*")
    ch.exchange_bind(destination=fan, source=top, routing_key="#.z")
    ch.exchange_bind(destination=fan, source=mid, routing_key="a.z")
    ch.queue_bind(q1, mid, "a.b")
    ch.queue_bind(q1, mid, "a.z")
    ch.queue_bind(q2, fan)
    outcomes = [pub(ch, top, k, k.encode(), mandatory=True)
                for k in ["a.b", "a.z", "b.z", "a.c", "c"]]
    first = {"q1": drain(ch, q1, props=False), "q2": drain(ch, q2, props=False)}
    ch.exchange_unbind(destination=fan, source=top, routing_key="#.z")
    outcomes2 = [pub(ch, top, k, k.encode(), mandatory=True) for k in ["a.z", "b.z"]]
    second = {"q1": drain(ch, q1, props=False), "q2": drain(ch, q2, props=False)}
    # a cycle of exchange bindings does not loop forever, nor duplicate
    ch.exchange_bind(destination=top, source=fan, routing_key="")
    outcomes3 = [pub(ch, top, "a.z", b"cycle", mandatory=True)]
    third = {"q1": drain(ch, q1, props=False), "q2": drain(ch, q2, props=False)}
    return {"outcomes": [outcomes, outcomes2, outcomes3], "first": first, "second": second,
            "cycle": third}


@scenario
def routing_alternate_exchange(ctx):
    c = ctx()
    ch = confirm_channel(c)
    ae = ctx.x(ch, "ae", "fanout")
    aeq = ctx.q(ch, "aeq")
    ch.queue_bind(aeq, ae)
    x = ctx.x(ch, "x", "direct", arguments={"alternate-exchange": ae})
    q = ctx.q(ch, "q")
    ch.queue_bind(q, x, "routed")
    x_missing_ae = ctx.x(ch, "x-missing-ae", "direct",
                         arguments={"alternate-exchange": ctx.name("no-such-ae")})
    outcomes = {
        "routed": pub(ch, x, "routed", b"routed", mandatory=True),
        "unrouted-mandatory": pub(ch, x, "nope", b"to-ae", mandatory=True),
        "unrouted": pub(ch, x, "nope2", b"to-ae-2"),
        "missing-ae-mandatory": pub(ch, x_missing_ae, "k", b"lost", mandatory=True),
    }
    return {"outcomes": outcomes, "q": drain(ch, q), "aeq": drain(ch, aeq)}


@scenario
def internal_exchange_publish(ctx):
    c = ctx()
    ch = confirm_channel(c)
    internal = ctx.x(ch, "internal", "fanout", internal=True)
    front = ctx.x(ch, "front", "fanout")
    q = ctx.q(ch, "q")
    ch.queue_bind(q, internal)
    ch.exchange_bind(destination=internal, source=front)
    via_binding = pub(ch, front, "", b"via-binding")
    got = drain(ch, q)
    direct = attempt(pub, ch, internal, "", b"direct")
    return {"via_binding": via_binding, "q": got, "direct_publish": direct}


@scenario
def cc_bcc_sender_selected(ctx):
    c = ctx()
    ch = confirm_channel(c)
    x = ctx.x(ch, "x", "direct")
    qs = {k: ctx.q(ch, k) for k in ["main", "cc1", "cc2", "bcc"]}
    for k, q in qs.items():
        ch.queue_bind(q, x, k)
    pub(ch, x, "main", b"m1",
        pika.BasicProperties(headers={"CC": ["cc1", "cc2"], "BCC": ["bcc"], "other": "kept"}))
    pub(ch, x, "nowhere", b"m2", pika.BasicProperties(headers={"BCC": ["bcc"]}))
    mandatory_cc = pub(ch, x, "nowhere", b"m3", pika.BasicProperties(headers={"CC": ["cc1"]}),
                       mandatory=True)
    return {"mandatory_cc_only_route": mandatory_cc,
            **{k: drain(ch, q) for k, q in qs.items()}}


# ---------------------------------------------------------------------------
# queue arguments
# ---------------------------------------------------------------------------


@scenario
def maxlen_drop_head(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q, ok = ctx.queue(ch, "q", arguments={"x-max-length": 2})
    outcomes = [pub(ch, "", q, f"m{i}".encode()) for i in range(5)]
    counts = declare_counts(ch, q)
    qb = ctx.q(ch, "bytes", arguments={"x-max-length-bytes": 10})
    outcomes_b = [pub(ch, "", qb, b) for b in [b"aaaa", b"bbbb", b"cccc", b"dd"]]
    bytes_q = bodies(drain(ch, qb))
    for b in [b"eeee", b"ffff", b"oversized-message"]:  # larger than the limit on its own
        outcomes_b.append(pub(ch, "", qb, b))
    return {"declare_ok": [ok.message_count, ok.consumer_count], "outcomes": outcomes,
            "counts": counts, "q": drain(ch, q), "bytes_outcomes": outcomes_b,
            "bytes": bytes_q, "bytes_after_oversized": bodies(drain(ch, qb))}


@scenario
def maxlen_reject_publish(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q", arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    outcomes = [pub(ch, "", q, f"m{i}".encode()) for i in range(4)]
    m, _p, _b = ch.basic_get(q, auto_ack=True)
    outcomes.append(pub(ch, "", q, b"after-get"))
    outcomes.append(pub(ch, "", q, b"full-again"))
    # fanout to a full and a non-full queue: routed to one queue => still nacked
    x = ctx.x(ch, "x", "fanout")
    q2 = ctx.q(ch, "q2")
    ch.queue_bind(q, x)
    ch.queue_bind(q2, x)
    outcomes.append(pub(ch, x, "", b"fanout"))
    return {"outcomes": outcomes, "first_get": m.message_count,
            "q": drain(ch, q), "q2": drain(ch, q2)}


@scenario
def maxlen_reject_publish_dlx(ctx):
    c = ctx()
    ch = confirm_channel(c)
    dlx = ctx.x(ch, "dlx", "fanout")
    dlq = ctx.q(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    q = ctx.q(ch, "q", arguments={"x-max-length": 1, "x-overflow": "reject-publish-dlx",
                                  "x-dead-letter-exchange": dlx})
    outcomes = [pub(ch, "", q, f"m{i}".encode()) for i in range(3)]
    return {"outcomes": outcomes, "q": drain(ch, q), "dlq": drain(ch, dlq, n=2)}


@scenario
def priority_queue(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q", arguments={"x-max-priority": 5})
    plan = [("p0-a", 0), ("none-a", None), ("p3-a", 3), ("p9", 9), ("p5", 5), ("p3-b", 3),
            ("p1", 1), ("none-b", None), ("p0-b", 0), ("p255", 255)]
    for body, prio in plan:
        pub(ch, "", q, body.encode(), pika.BasicProperties(priority=prio))
    order = [(m["body"], m["props"].get("priority") if "props" in m else None)
             for m in drain(ch, q)]
    # requeued messages go back into their priority band
    for body, prio in [("r1", 1), ("r4", 4)]:
        pub(ch, "", q, body.encode(), pika.BasicProperties(priority=prio))
    m1 = ch.basic_get(q, auto_ack=False)[0]
    ch.basic_nack(m1.delivery_tag, requeue=True)
    pub(ch, "", q, b"r2", pika.BasicProperties(priority=2))
    after = [(m["body"], m["redelivered"]) for m in drain(ch, q)]
    bad = {}
    for label, value in [("zero", 0), ("256", 256), ("string", "x")]:
        bch = c.channel()
        bad[label] = attempt(bch.queue_declare, ctx.name(f"bad-{label}"),
                             arguments={"x-max-priority": value})
        if "ok" in bad[label]:
            ctx.queues.append(ctx.name(f"bad-{label}"))
    return {"order": order, "after_requeue": after, "bad_max_priority": bad}


@scenario
def single_active_consumer(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q", arguments={"x-single-active-consumer": True})
    col = Collector()
    ch.basic_qos(prefetch_count=10)
    t1 = ch.basic_consume(q, col.cb("c1"), auto_ack=False, consumer_tag="c1")
    t2 = ch.basic_consume(q, col.cb("c2"), auto_ack=False, consumer_tag="c2")
    for i in range(3):
        pub(ch, "", q, f"m{i}".encode())
    pump(c, lambda: len(col) >= 3, settle=0.2)
    phase1 = col.obs(props=False)
    # c1 goes away with m0..m2 unacked: they are requeued and go to c2
    ch.basic_cancel(t1)
    for (_l, m, _p, _b) in col.got:
        ch.basic_nack(m.delivery_tag, requeue=True)
    col.got.clear()
    pub(ch, "", q, b"m3")
    pump(c, lambda: len(col) >= 4, settle=0.2)
    phase2 = col.obs(props=False)
    ch.basic_cancel(t2)
    ch2 = c.channel()
    other = attempt(ch2.queue_declare, q, arguments={})
    return {"phase1": phase1, "phase2": phase2, "declare_without_sac": other}


@scenario
def queue_expires_and_auto_delete(ctx):
    c = ctx()
    ch = c.channel()
    qe = ctx.q(ch, "expires", arguments={"x-expires": 200})
    qa = ctx.q(ch, "autodel", auto_delete=True)
    qa_never = ctx.q(ch, "autodel-never-consumed", auto_delete=True)
    tag = ch.basic_consume(qa, lambda *a: None, auto_ack=True)
    before = {"expires": declare_counts(ch, qe), "autodel": declare_counts(ch, qa)}
    ch.basic_cancel(tag)
    time.sleep(0.3)
    after = {"expires": counts_once_gone(c, qe), "autodel": counts_once_gone(c, qa),
             "autodel-never-consumed": declare_counts(c.channel(), qa_never)}
    return {"before": before, "after": after}


@scenario
def server_named_and_exclusive_queue(ctx):
    a = ctx()
    b = ctx()
    cha = a.channel()
    ok = cha.queue_declare("", exclusive=True)
    gen = ok.method.queue
    named = ctx.q(cha, "excl", exclusive=True)
    chb = confirm_channel(b)
    obs = {"server_name": gen, "declare_ok": [ok.method.message_count, ok.method.consumer_count]}
    ops = {
        "declare": lambda ch: ch.queue_declare(named, exclusive=True),
        "passive": lambda ch: ch.queue_declare(named, passive=True),
        "consume": lambda ch: ch.basic_consume(named, lambda *x: None),
        "get": lambda ch: ch.basic_get(named) and None,
        "purge": lambda ch: ch.queue_purge(named),
        "delete": lambda ch: ch.queue_delete(named),
        "bind": lambda ch: ch.queue_bind(named, "amq.fanout"),
    }
    for label, op in ops.items():
        obs[label] = attempt(op, b.channel())
    obs["publish_from_other"] = pub(chb, "", named, b"allowed")
    obs["owner_get"] = drain(cha, named)
    a.close()
    obs["after_owner_closed"] = {"named": counts_once_gone(b, named),
                                 "generated": counts_once_gone(b, gen)}
    return obs


# ---------------------------------------------------------------------------
# dead lettering
# ---------------------------------------------------------------------------


def dlx_pair(ctx, ch, **qargs):
    dlx = ctx.x(ch, "dlx", "fanout")
    dlq = ctx.q(ch, "dlq")
    ch.queue_bind(dlq, dlx)
    args = {"x-dead-letter-exchange": dlx}
    args.update(qargs)
    q = ctx.q(ch, "q", arguments=args)
    return dlx, dlq, q


@scenario
def dlx_rejected(ctx):
    c = ctx()
    ch = confirm_channel(c)
    _dlx, dlq, q = dlx_pair(ctx, ch)
    src = ctx.x(ch, "src", "topic")
    ch.queue_bind(q, src, "a.*")
    props = pika.BasicProperties(headers={"mine": "kept", "CC": ["a.cc"]}, priority=3,
                                 correlation_id="corr", message_id="mid", content_type="t/p",
                                 delivery_mode=2, app_id="app", type="typ")
    pub(ch, src, "a.b", b"rej", props)
    pub(ch, "", q, b"nack")
    pub(ch, "", q, b"nack-multi")
    m1 = ch.basic_get(q, auto_ack=False)[0]
    m2 = ch.basic_get(q, auto_ack=False)[0]
    m3 = ch.basic_get(q, auto_ack=False)[0]
    ch.basic_reject(m1.delivery_tag, requeue=False)
    ch.basic_nack(m2.delivery_tag, requeue=False)
    ch.basic_nack(m3.delivery_tag, multiple=True, requeue=False)
    return {"dlq": drain(ch, dlq, n=3), "q": drain(ch, q)}


@scenario
def dlx_expired_queue_ttl(ctx):
    c = ctx()
    ch = confirm_channel(c)
    _dlx, dlq, q = dlx_pair(ctx, ch, **{"x-message-ttl": 100})
    pub(ch, "", q, b"e1", pika.BasicProperties(headers={"h": 1}))
    pub(ch, "", q, b"e2", pika.BasicProperties(expiration="5000"))  # queue TTL is lower
    return {"dlq": drain(ch, dlq, n=2), "q": drain(ch, q)}


@scenario
def dlx_expired_message_ttl(ctx):
    c = ctx()
    ch = confirm_channel(c)
    _dlx, dlq, q = dlx_pair(ctx, ch)
    pub(ch, "", q, b"short", pika.BasicProperties(expiration="100"))
    pub(ch, "", q, b"long", pika.BasicProperties(expiration="60000"))
    dead = drain(ch, dlq, n=1, quiet=0.2)
    return {"dlq": dead, "q": drain(ch, q)}


@scenario
def dlx_maxlen(ctx):
    c = ctx()
    ch = confirm_channel(c)
    _dlx, dlq, q = dlx_pair(ctx, ch, **{"x-max-length": 1})
    for i in range(3):
        pub(ch, "", q, f"m{i}".encode())
    return {"dlq": drain(ch, dlq, n=2), "q": drain(ch, q)}


@scenario
def dlx_routing_key(ctx):
    c = ctx()
    ch = confirm_channel(c)
    dlx = ctx.x(ch, "dlx", "direct")
    dead = ctx.q(ch, "dead")
    orig = ctx.q(ch, "orig")
    ch.queue_bind(dead, dlx, "dead-key")
    ch.queue_bind(orig, dlx, "orig-key")
    src = ctx.x(ch, "src", "direct")
    q_rk = ctx.q(ch, "with-rk", arguments={"x-dead-letter-exchange": dlx,
                                            "x-dead-letter-routing-key": "dead-key"})
    q_own = ctx.q(ch, "own-keys", arguments={"x-dead-letter-exchange": dlx})
    ch.queue_bind(q_rk, src, "orig-key")
    ch.queue_bind(q_own, src, "orig-key")
    pub(ch, src, "orig-key", b"m")
    for q in (q_rk, q_own):
        m = ch.basic_get(q, auto_ack=False)[0]
        ch.basic_reject(m.delivery_tag, requeue=False)
    # dead-lettered to a missing exchange: silently dropped
    q_missing = ctx.q(ch, "missing-dlx", arguments={"x-dead-letter-exchange": ctx.name("nox")})
    pub(ch, "", q_missing, b"dropped")
    m = ch.basic_get(q_missing, auto_ack=False)[0]
    ch.basic_reject(m.delivery_tag, requeue=False)
    return {"dead": drain(ch, dead, n=1, quiet=0.2), "orig": drain(ch, orig, n=1, quiet=0.2),
            "missing": declare_counts(ch, q_missing)}


@scenario
def dlx_two_hops(ctx):
    c = ctx()
    ch = confirm_channel(c)
    x2 = ctx.x(ch, "x2", "fanout")
    x3 = ctx.x(ch, "x3", "fanout")
    q3 = ctx.q(ch, "q3")
    ch.queue_bind(q3, x3)
    q2 = ctx.q(ch, "q2", arguments={"x-dead-letter-exchange": x3})
    ch.queue_bind(q2, x2)
    q1 = ctx.q(ch, "q1", arguments={"x-dead-letter-exchange": x2, "x-message-ttl": 100})
    pub(ch, "", q1, b"hop", pika.BasicProperties(headers={"h": "v"}))
    got = []
    deadline = time.monotonic() + 3
    while not got and time.monotonic() < deadline:
        m, p, b = ch.basic_get(q2, auto_ack=False)
        if m is None:
            time.sleep(0.02)
            continue
        got.append(msg(m, p, b))
        ch.basic_reject(m.delivery_tag, requeue=False)
    return {"at_q2": got, "q3": drain(ch, q3, n=1)}


@scenario
def dlx_cycle_with_rejection_counts(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.name("q")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": "",
                                   "x-dead-letter-routing-key": q})
    ctx.queues.append(q)
    pub(ch, "", q, b"loop")
    seen = []
    for _ in range(4):
        deadline = time.monotonic() + 3
        while True:
            m, p, b = ch.basic_get(q, auto_ack=False)
            if m is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if m is None:
            seen.append("nothing")
            break
        seen.append(msg(m, p, b))
        ch.basic_reject(m.delivery_tag, requeue=False)
    drain(ch, q, n=1)
    return {"seen": seen}


@scenario
def dlx_cycle_without_rejection_dropped(ctx):
    c = ctx()
    ch = confirm_channel(c)
    xa = ctx.x(ch, "xa", "fanout")
    xb = ctx.x(ch, "xb", "fanout")
    tap = ctx.q(ch, "tap")
    qa = ctx.q(ch, "qa", arguments={"x-dead-letter-exchange": xa, "x-message-ttl": 50})
    qb = ctx.q(ch, "qb", arguments={"x-dead-letter-exchange": xb, "x-message-ttl": 50})
    ch.queue_bind(qb, xa)
    ch.queue_bind(tap, xa)
    ch.queue_bind(qa, xb)
    ch.queue_bind(tap, xb)
    pub(ch, "", qa, b"cyc")
    time.sleep(0.8)
    return {"tap": drain(ch, tap, n=2, quiet=0.3), "qa": declare_counts(ch, qa),
            "qb": declare_counts(ch, qb)}


@scenario
def header_types_roundtrip(ctx):
    c = ctx()
    wire = record_header_types(c)
    ch = confirm_channel(c)
    _dlx, dlq, q = dlx_pair(ctx, ch)
    headers = {
        "str": "s", "int": 7, "neg": -3, "big": 2 ** 40, "true": True,
        "false": False, "none": None, "list": [1, "two", [3], {"k": "v"}],
        "table": {"a": 1, "b": {"c": "d"}}, "bytes": b"\x00\xffraw",
        "time": datetime.datetime(2020, 1, 2, 3, 4, 5),
        "decimal": decimal.Decimal("3.14"), "empty-list": [], "empty-table": {},
        "unicode": "h\u00e9llo \u2603",
    }
    props = pika.BasicProperties(headers=headers, timestamp=1700000000, priority=1,
                                 reply_to="rt", expiration="60000", user_id="guest",
                                 cluster_id="cid", content_encoding="gzip")
    pub(ch, "", q, b"types", props)
    m, p, b = ch.basic_get(q, auto_ack=False)
    direct = msg(m, p, b)
    direct["props"]["headers"]["time"] = repr(p.headers.get("time"))
    ch.basic_reject(m.delivery_tag, requeue=False)
    # dead-lettering makes the broker re-encode the header table
    dl = drain(ch, dlq, n=1)
    for d in dl:
        d["props"]["headers"].pop("x-death", None)
        d["props"]["headers"]["time"] = repr(d["props"]["headers"].get("time"))
    # the field types on the wire, as the broker sent them (x-death's shape is
    # compared, its key order is not)
    return {"direct": direct, "dead_lettered": dl, "wire_types": wire}


# ---------------------------------------------------------------------------
# TTL
# ---------------------------------------------------------------------------


@scenario
def ttl_never_delivered(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q", arguments={"x-message-ttl": 100})
    q2 = ctx.q(ch, "q2")
    pub(ch, "", q, b"queue-ttl")
    pub(ch, "", q2, b"msg-ttl", pika.BasicProperties(expiration="100"))
    pub(ch, "", q2, b"zero", pika.BasicProperties(expiration="0"))
    pub(ch, "", q2, b"fresh")
    time.sleep(0.4)
    col = Collector()
    ch.basic_consume(q, col.cb("q"), auto_ack=True)
    ch.basic_consume(q2, col.cb("q2"), auto_ack=True)
    pump(c, timeout=0, settle=0.3)
    return {"delivered": col.obs(), "counts": [declare_counts(ch, q), declare_counts(ch, q2)]}


@scenario
def ttl_zero_with_waiting_consumer(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q", arguments={"x-message-ttl": 0})
    col = Collector()
    ch.basic_consume(q, col.cb("c"), auto_ack=True)
    pub(ch, "", q, b"immediate")
    pump(c, lambda: len(col) >= 1, timeout=1, settle=0.2)
    return {"delivered": bodies(col.obs())}


@scenario
def ttl_invalid_expiration(ctx):
    c = ctx()
    out = {}
    for label, exp in [("negative", "-1"), ("not-a-number", "soon"), ("empty", "")]:
        ch = c.channel()
        ch.confirm_delivery()
        out[label] = attempt(pub, ch, "", ctx.name("nowhere"), b"x",
                             pika.BasicProperties(expiration=exp))
    ch = c.channel()
    out["negative-queue-ttl"] = attempt(ch.queue_declare, ctx.name("bad-ttl"),
                                        arguments={"x-message-ttl": -5})
    return out


# ---------------------------------------------------------------------------
# confirms and returns
# ---------------------------------------------------------------------------


@scenario
def confirms_and_returns_sequence(ctx):
    c = ctx()
    log = record_methods(c)
    ch = confirm_channel(c)
    x = ctx.x(ch, "x", "direct")
    q = ctx.q(ch, "q")
    ch.queue_bind(q, x, "routed")
    full = ctx.q(ch, "full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    outcomes = [
        pub(ch, x, "routed", b"1"),
        pub(ch, x, "unrouted", b"2"),
        pub(ch, x, "unrouted", b"3", mandatory=True),
        pub(ch, x, "routed", b"4", mandatory=True),
        pub(ch, "", full, b"5"),
        pub(ch, "", full, b"6", mandatory=True),
        pub(ch, "", ctx.name("nowhere"), b"7", mandatory=True),
    ]
    events = confirm_events(log, ch.channel_number)
    # confirms and transactions are exclusive
    ch2 = c.channel()
    ch2.confirm_delivery()
    tx_on_confirm = attempt(ch2.tx_select)
    return {"outcomes": outcomes, "events": events, "q": bodies(drain(ch, q)),
            "tx_on_confirm_channel": tx_on_confirm}


@scenario
def confirms_pipelined(ctx):
    """Many publishes in flight at once: every tag confirmed exactly once, in order."""
    c = ctx()
    log = record_methods(c)
    ch = c.channel()
    q = ctx.q(ch, "q", arguments={"x-max-length": 5, "x-overflow": "reject-publish"})
    # confirm mode on the underlying asynchronous channel, so that publishes are
    # not serialised by BlockingChannel's wait-for-each-confirm
    impl = ch._impl  # pylint: disable=protected-access
    select_ok = []
    impl.confirm_delivery(ack_nack_callback=lambda _frame: None,
                          callback=lambda frame: select_ok.append(frame))
    pump(c, lambda: bool(select_ok))
    for i in range(10):
        impl.basic_publish("", q, f"m{i}".encode())
    pump(c, lambda: sum(1 for e in confirm_events(log, ch.channel_number)) >= 10)
    events = confirm_events(log, ch.channel_number)
    return {"events": sorted(events, key=lambda e: e[1]),
            "tags_monotonic": [e[1] for e in events] == sorted(e[1] for e in events),
            "q": bodies(drain(ch, q))}


@scenario
def mandatory_returns(ctx):
    c = ctx()
    ch = c.channel()
    returned = []
    ch.add_on_return_callback(lambda _c, m, p, b: returned.append(
        {"code": m.reply_code, "text": m.reply_text, "exchange": m.exchange,
         "routing_key": m.routing_key, "body": b, "props": props_obs(p)}))
    fan = ctx.x(ch, "fan", "fanout")
    props = pika.BasicProperties(headers={"h": 1}, correlation_id="c1")
    ch.basic_publish("", ctx.name("missing"), b"default-missing", props, mandatory=True)
    ch.basic_publish(fan, "k", b"empty-fanout", props, mandatory=True)
    ch.basic_publish(fan, "k", b"not-mandatory", props)
    ch.basic_publish("amq.topic", ctx.name("no-binding"), b"amq.topic", mandatory=True)
    pump(c, lambda: len(returned) >= 3, settle=0.2)
    # immediate is not implemented by RabbitMQ: connection error 540
    ch2 = c.channel()
    ch2._impl._send_method(  # pylint: disable=protected-access
        spec.Basic.Publish(exchange="", routing_key="x", mandatory=False, immediate=True),
        (pika.BasicProperties(), b"imm"))
    immediate = attempt(sync, ch2)
    return {"returned": returned, "immediate": immediate}


# ---------------------------------------------------------------------------
# transactions
# ---------------------------------------------------------------------------


@scenario
def tx_publish_commit_rollback(ctx):
    c = ctx()
    ch = c.channel()
    q = ctx.q(ch, "q")
    ch.tx_select()
    ch.basic_publish("", q, b"rolled-back")
    obs = {"before_rollback": declare_counts(c.channel(), q)}
    ch.tx_rollback()
    ch.basic_publish("", q, b"c1")
    ch.basic_publish("", q, b"c2")
    obs["before_commit"] = declare_counts(c.channel(), q)
    ch.tx_commit()
    obs["after_commit"] = declare_counts(c.channel(), q)
    ch.tx_commit()  # empty commit is fine
    obs["q"] = bodies(drain(c.channel(), q))
    ch3 = c.channel()
    obs["commit_without_select"] = attempt(ch3.tx_commit)
    ch4 = c.channel()
    obs["rollback_without_select"] = attempt(ch4.tx_rollback)
    ch5 = c.channel()
    ch5.tx_select()
    obs["confirm_on_tx_channel"] = attempt(ch5.confirm_delivery)
    return obs


@scenario
def tx_acks_commit_rollback(ctx):
    c = ctx()
    pch = confirm_channel(c)
    q = ctx.q(pch, "q")
    for i in range(3):
        pub(pch, "", q, f"m{i}".encode())
    ch = c.channel()
    ch.tx_select()
    got = [ch.basic_get(q, auto_ack=False) for _ in range(3)]
    obs = {"got": [msg(*g, props=False, tag=True) for g in got]}
    ch.basic_ack(got[0][0].delivery_tag)
    ch.basic_reject(got[1][0].delivery_tag, requeue=True)
    ch.tx_rollback()  # the ack and reject are forgotten; messages stay unacked
    obs["after_rollback"] = declare_counts(pch, q)
    ch.basic_ack(got[0][0].delivery_tag)
    ch.basic_reject(got[1][0].delivery_tag, requeue=True)
    obs["before_commit"] = declare_counts(pch, q)
    ch.tx_commit()
    obs["after_commit"] = declare_counts(pch, q)
    ch.close()  # m2 was never settled: requeued
    obs["q"] = drain(pch, q, props=False)
    return obs


# ---------------------------------------------------------------------------
# consuming
# ---------------------------------------------------------------------------


@scenario
def qos_prefetch(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    for i in range(6):
        pub(ch, "", q, f"m{i}".encode())
    ch.basic_qos(prefetch_count=2)
    col = Collector()
    ch.basic_consume(q, col.cb("c"), auto_ack=False, consumer_tag="c")
    pump(c, lambda: len(col) >= 2, settle=0.3)
    phase1 = bodies(col.obs())
    ch.basic_ack(col.got[1][1].delivery_tag, multiple=True)
    pump(c, lambda: len(col) >= 4, settle=0.3)
    phase2 = bodies(col.obs())
    # basic.qos (global=false) applies to consumers started after it, not to "c"
    ch.basic_qos(prefetch_count=3)
    pump(c, timeout=0, settle=0.3)
    phase3 = bodies(col.obs())
    ch.basic_consume(q, col.cb("c2"), auto_ack=False, consumer_tag="c2")
    pump(c, lambda: len(col) >= 6, settle=0.3)
    phase4 = [(o["consumer"], o["body"]) for o in col.obs()]
    return {"phase1": phase1, "phase2": phase2, "phase3": phase3, "phase4": phase4,
            "counts": declare_counts(ch, q)}


@scenario
def consumer_round_robin_and_priorities(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "rr")
    col = Collector()
    ch.basic_consume(q, col.cb("a"), auto_ack=True, consumer_tag="a")
    ch.basic_consume(q, col.cb("b"), auto_ack=True, consumer_tag="b")
    for i in range(4):
        pub(ch, "", q, f"rr{i}".encode())
    pump(c, lambda: len(col) >= 4, settle=0.2)
    rr = sorted([(o["consumer"], o["body"]) for o in col.obs()])

    ch2 = confirm_channel(c)
    qp = ctx.q(ch2, "prio")
    ch2.basic_qos(prefetch_count=1)
    colp = Collector()
    ch2.basic_consume(qp, colp.cb("low"), auto_ack=False, consumer_tag="low",
                      arguments={"x-priority": 1})
    ch2.basic_consume(qp, colp.cb("high"), auto_ack=False, consumer_tag="high",
                      arguments={"x-priority": 10})
    ch2.basic_consume(qp, colp.cb("default"), auto_ack=False, consumer_tag="default")
    for i in range(5):
        pub(ch2, "", qp, f"p{i}".encode())
    pump(c, lambda: len(colp) >= 3, settle=0.3)
    phase1 = [(o["consumer"], o["body"]) for o in colp.obs()]
    high = [m for (label, m, _p, _b) in colp.got if label == "high"][0]
    ch2.basic_ack(high.delivery_tag)
    pump(c, lambda: len(colp) >= 4, settle=0.3)
    phase2 = [(o["consumer"], o["body"]) for o in colp.obs()][len(phase1):]
    return {"round_robin": rr, "priority_phase1": phase1, "priority_phase2": phase2}


@scenario
def exclusive_consumer(ctx):
    c = ctx()
    ch = c.channel()
    q = ctx.q(ch, "q")
    ch.basic_consume(q, lambda *a: None, consumer_tag="first")
    ch2 = c.channel()
    excl_when_busy = attempt(ch2.basic_consume, q, lambda *a: None, exclusive=True)
    q2 = ctx.q(ch, "q2")
    ch3 = c.channel()
    ch3.basic_consume(q2, lambda *a: None, exclusive=True, consumer_tag="excl")
    ch4 = c.channel()
    second_after_excl = attempt(ch4.basic_consume, q2, lambda *a: None)
    return {"exclusive_when_busy": excl_when_busy, "consume_after_exclusive": second_after_excl}


@scenario
def basic_recover(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    for i in range(3):
        pub(ch, "", q, f"m{i}".encode())
    col = Collector()
    ch.basic_consume(q, col.cb("c"), auto_ack=False, consumer_tag="c")
    pump(c, lambda: len(col) >= 3, settle=0.1)
    ch.basic_ack(col.got[0][1].delivery_tag)
    ch.basic_recover(requeue=True)
    pump(c, lambda: len(col) >= 5, settle=0.3)
    obs = col.obs(props=False, tag=True)
    for o in obs[5:]:
        ch.basic_ack(o["delivery_tag"])
    return {"deliveries": obs}


@scenario
def unacked_requeued_on_channel_close(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    for i in range(4):
        pub(ch, "", q, f"m{i}".encode())
    ch2 = c.channel()
    got = [ch2.basic_get(q, auto_ack=False) for _ in range(3)]
    ch2.basic_ack(got[1][0].delivery_tag)
    ch2.close()
    return {"q": drain(ch, q, n=3, props=False)}


@scenario
def consumer_cancel_on_queue_delete(ctx):
    c = ctx()
    ch = c.channel()
    q = ctx.q(ch, "q")
    cancelled = []
    ch.basic_consume(q, lambda *a: None, consumer_tag="doomed")
    ch._impl.add_on_cancel_callback(  # pylint: disable=protected-access
        lambda frame: cancelled.append(frame.method.consumer_tag))
    other = c.channel()
    ok = other.queue_delete(q)
    pump(c, lambda: bool(cancelled), timeout=2, settle=0.1)
    return {"delete_ok": ok.method.message_count, "server_cancel": cancelled,
            "channel_open": ch.is_open}


# ---------------------------------------------------------------------------
# queue operations
# ---------------------------------------------------------------------------


@scenario
def purge_and_declare_counts(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q, ok = ctx.queue(ch, "q")
    obs = {"declare_ok_new": [ok.message_count, ok.consumer_count]}
    for i in range(5):
        pub(ch, "", q, f"m{i}".encode())
    ok2 = ch.queue_declare(q)
    obs["declare_ok_existing"] = [ok2.method.message_count, ok2.method.consumer_count]
    ch2 = c.channel()
    unacked = [ch2.basic_get(q, auto_ack=False) for _ in range(2)]
    ch.basic_consume(q, lambda *a: None, consumer_tag="idle", auto_ack=False)
    obs["counts_with_unacked"] = declare_counts(ch, q)
    ch.basic_cancel("idle")
    obs["purge"] = ch.queue_purge(q).method.message_count
    obs["purge_again"] = ch.queue_purge(q).method.message_count
    ch2.basic_nack(unacked[-1][0].delivery_tag, multiple=True, requeue=True)
    sync(ch2)
    obs["after_requeue"] = declare_counts(ch, q)
    obs["q"] = drain(ch, q, props=False)
    return obs


@scenario
def queue_delete_if_empty_if_unused(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    pub(ch, "", q, b"x")
    obs = {"if_empty_nonempty": attempt(c.channel().queue_delete, q, if_empty=True)}
    cch = c.channel()
    cch.basic_consume(q, lambda *a: None, consumer_tag="user")
    obs["if_unused_with_consumer"] = attempt(c.channel().queue_delete, q, if_unused=True)
    cch.basic_cancel("user")
    pump(c, settle=0.1)
    obs["counts"] = declare_counts(c.channel(), q)
    obs["delete"] = attempt(c.channel().queue_delete, q, if_unused=True)
    obs["delete_missing"] = attempt(c.channel().queue_delete, q)
    x = ctx.x(ch, "x", "fanout")
    q2 = ctx.q(ch, "q2")
    ch.queue_bind(q2, x)
    obs["exchange_delete_if_unused_bound"] = attempt(c.channel().exchange_delete, x,
                                                     if_unused=True)
    obs["exchange_delete_missing"] = attempt(c.channel().exchange_delete, ctx.name("nox"))
    return obs


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@scenario
def user_id_validation(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    obs = {"matching": pub(ch, "", q, b"ok", pika.BasicProperties(user_id="guest")),
           "q": drain(ch, q)}
    ch2 = confirm_channel(c)
    obs["other_user"] = attempt(pub, ch2, "", q, b"spoof", pika.BasicProperties(user_id="bob"))
    obs["after"] = declare_counts(c.channel(), q)
    return obs


@scenario
def channel_errors(ctx):
    c = ctx()
    ch = c.channel()
    q = ctx.q(ch, "q", durable=False, arguments={"x-max-length": 10})
    x = ctx.x(ch, "x", "direct")
    missing_q, missing_x = ctx.name("missing-q"), ctx.name("missing-x")
    ctx.names["amq.foo." + ctx.suffix] = "<amq.foo>"
    cases = {
        "passive_missing_queue": lambda ch: ch.queue_declare(missing_q, passive=True),
        "passive_missing_exchange": lambda ch: ch.exchange_declare(missing_x, passive=True),
        "redeclare_queue_durable": lambda ch: ch.queue_declare(q, durable=True),
        "redeclare_queue_args": lambda ch: ch.queue_declare(q, arguments={"x-max-length": 11}),
        "redeclare_queue_exclusive": lambda ch: ch.queue_declare(q, exclusive=True),
        "redeclare_queue_auto_delete": lambda ch: ch.queue_declare(q, auto_delete=True),
        "redeclare_exchange_type": lambda ch: ch.exchange_declare(x, exchange_type="fanout"),
        "redeclare_exchange_durable": lambda ch: ch.exchange_declare(x, durable=True),
        "declare_amq_exchange": lambda ch: ch.exchange_declare("amq.foo." + ctx.suffix),
        "declare_amq_exchange_passive": lambda ch: ch.exchange_declare(
            "amq.foo." + ctx.suffix, passive=True),
        "redeclare_amq_direct_same": lambda ch: ch.exchange_declare("amq.direct",
                                                                    durable=True),
        "delete_amq_direct": lambda ch: ch.exchange_delete("amq.direct"),
        "declare_amq_queue": lambda ch: ch.queue_declare("amq.foo." + ctx.suffix),
        "unknown_exchange_type": lambda ch: ch.exchange_declare(ctx.name("weird"),
                                                                exchange_type="x-weird"),
        "bind_missing_exchange": lambda ch: ch.queue_bind(q, missing_x, "k"),
        "bind_missing_queue": lambda ch: ch.queue_bind(missing_q, x, "k"),
        "bind_default_exchange": lambda ch: ch.queue_bind(q, "", "k"),
        "unbind_missing_binding": lambda ch: ch.queue_unbind(q, x, "never-bound"),
        "consume_missing_queue": lambda ch: ch.basic_consume(missing_q, lambda *a: None),
        "get_missing_queue": lambda ch: ch.basic_get(missing_q),
        "purge_missing_queue": lambda ch: ch.queue_purge(missing_q),
        "invalid_overflow": lambda ch: ch.queue_declare(ctx.name("bad-ovf"),
                                                        arguments={"x-overflow": "nope"}),
        "invalid_max_length_type": lambda ch: ch.queue_declare(
            ctx.name("bad-ml"), arguments={"x-max-length": "ten"}),
        "invalid_queue_type": lambda ch: ch.queue_declare(
            ctx.name("bad-qt"), arguments={"x-queue-type": "bogus"}),
        "publish_missing_exchange": lambda ch: (ch.basic_publish(missing_x, "k", b"x"),
                                                sync(ch)),
        "ack_unknown_tag": lambda ch: (ch.basic_ack(12345), sync(ch)),
        "reject_unknown_tag": lambda ch: (ch.basic_reject(7, requeue=False), sync(ch)),
        "ack_multiple_nothing_outstanding": lambda ch: (ch.basic_ack(0, multiple=True),
                                                        sync(ch)),
        "cancel_unknown_consumer": lambda ch: ch.basic_cancel("never-existed"),
        "qos_prefetch_size": lambda ch: ch.basic_qos(prefetch_size=1000),
    }
    obs = {}
    for label, op in cases.items():
        r = attempt(op, c.channel())
        if "ok" in r:
            r = {"ok": True}
        obs[label] = r
        if not c.is_open:
            obs[label]["connection_closed"] = True
            c = ctx()
    for n in ("bad-ovf", "bad-ml", "bad-qt", "weird"):
        ctx.queues.append(ctx.name(n))
        ctx.exchanges.append(ctx.name(n))
    return obs


@scenario
def connection_errors(ctx):
    obs = {}
    for label, kwargs in [("missing_vhost", {"vhost": "no-such-vhost-" + ctx.suffix}),
                          ("wrong_password", {"password": "wrong-" + ctx.suffix})]:
        try:
            ctx(**kwargs)
            obs[label] = "connected"
        except AMQPConnectionError as e:
            text = repr(e)
            obs[label] = {"exception": type(e).__name__,
                          "code": next((int(m) for m in re.findall(r"\b(\d{3})\b", text)), None),
                          "symbol": next(iter(re.findall(r"[A-Z]{3,}(?:_[A-Z]+)+|[A-Z]{6,}",
                                                         text)), None)}
    c = ctx()
    ch = c.channel()
    q = ctx.q(ch, "q")
    ch.basic_consume(q, lambda *a: None, consumer_tag="dup")
    # pika refuses a duplicate tag itself: send the raw method
    ch._impl._send_method(spec.Basic.Consume(queue=q, consumer_tag="dup"))  # pylint: disable=W0212
    obs["duplicate_consumer_tag"] = attempt(sync, ch)
    obs["connection_open_after"] = c.is_open
    return obs


# ---------------------------------------------------------------------------
# more consuming / publishing behaviour
# ---------------------------------------------------------------------------


@scenario
def requeue_order_and_redelivered(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    for i in range(6):
        pub(ch, "", q, f"m{i}".encode())
    got = [ch.basic_get(q, auto_ack=False)[0] for _ in range(6)]
    ch.basic_reject(got[4].delivery_tag, requeue=True)
    ch.basic_reject(got[1].delivery_tag, requeue=True)
    ch.basic_nack(got[3].delivery_tag, multiple=True, requeue=True)  # m0, m2, m3
    ch.basic_ack(got[5].delivery_tag)
    first = drain(ch, q, n=5, props=False)
    # a requeued message that is requeued again stays redelivered, keeps its place
    pub(ch, "", q, b"late")
    m = ch.basic_get(q, auto_ack=False)[0]
    ch.basic_nack(m.delivery_tag, requeue=True)
    second = drain(ch, q, n=1, props=False)
    return {"after_requeue": first, "second": second}


@scenario
def qos_global_and_per_consumer(ctx):
    c = ctx()
    ch = confirm_channel(c)
    q1, q2 = ctx.q(ch, "q1"), ctx.q(ch, "q2")
    for i in range(5):
        pub(ch, "", q1, f"a{i}".encode())
        pub(ch, "", q2, f"b{i}".encode())
    # the order of RabbitMQ's documentation: per-consumer limit, then channel limit
    ch.basic_qos(prefetch_count=2, global_qos=False)
    ch.basic_qos(prefetch_count=3, global_qos=True)
    col = Collector()
    ch.basic_consume(q1, col.cb("c1"), auto_ack=False, consumer_tag="c1")
    pump(c, lambda: len(col) >= 2, settle=0.2)
    ch.basic_consume(q2, col.cb("c2"), auto_ack=False, consumer_tag="c2")
    pump(c, lambda: len(col) >= 3, settle=0.3)
    phase1 = [(o["consumer"], o["body"]) for o in col.obs()]
    # ack c2's message: one channel-wide slot is free, and only c2 may use it (c1 is
    # at its per-consumer limit)
    ch.basic_ack([m for (label, m, _p, _b) in col.got if label == "c2"][0].delivery_tag)
    pump(c, lambda: len(col) >= 4, settle=0.3)
    phase2 = [(o["consumer"], o["body"]) for o in col.obs()][len(phase1):]
    return {"phase1": phase1, "phase2": phase2}


@scenario
def direct_reply_to(ctx):
    c = ctx()
    ch = c.channel()
    replies = Collector()
    ch.basic_consume("amq.rabbitmq.reply-to", replies.cb("client"), auto_ack=True)
    q = ctx.q(ch, "server")
    ch.basic_publish("", q, b"request", pika.BasicProperties(
        reply_to="amq.rabbitmq.reply-to", correlation_id="42"))
    m, p, b = None, None, None
    deadline = time.monotonic() + 3
    while m is None and time.monotonic() < deadline:
        m, p, b = ch.basic_get(q, auto_ack=True)
    request = msg(m, p, b) if m else None
    server = c.channel()
    if m is not None:
        server.basic_publish("", p.reply_to, b"response",
                             pika.BasicProperties(correlation_id="42"))
    pump(c, lambda: len(replies) >= 1, settle=0.1)
    obs = {"request": request, "replies": replies.obs(),
           "reply_to_is_token": bool(p and p.reply_to and
                                     p.reply_to.startswith("amq.rabbitmq.reply-to."))}
    ch2 = c.channel()
    obs["publish_without_reply_consumer"] = after_async(
        ch2, ch2.basic_publish, "", q, b"x",
        pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    ch3 = c.channel()
    obs["consume_with_acks"] = attempt(ch3.basic_consume, "amq.rabbitmq.reply-to",
                                       lambda *a: None, auto_ack=False)
    obs["leftover_requests"] = declare_counts(c.channel(), q)
    return obs


@scenario
def ttl_per_message_behind_unexpired_head(ctx):
    """Per-message TTL: RabbitMQ only expires (and dead-letters) messages when they
    reach the head of the queue; an expired message behind a live one waits, but
    is never delivered."""
    c = ctx()
    ch = confirm_channel(c)
    _dlx, dlq, q = dlx_pair(ctx, ch)
    pub(ch, "", q, b"head-live", pika.BasicProperties(expiration="60000"))
    pub(ch, "", q, b"behind-expired", pika.BasicProperties(expiration="50"))
    time.sleep(0.4)
    obs = {"dlq_while_head_live": bodies(drain(ch, dlq)), "counts": declare_counts(ch, q)}
    obs["get"] = drain(ch, q, props=False)
    obs["dlq_after"] = bodies(drain(ch, dlq, n=1, quiet=0.2))
    return obs


@scenario
def large_and_empty_bodies(ctx):
    c = ctx(frame_max=4096)
    ch = confirm_channel(c)
    q = ctx.q(ch, "q")
    big = bytes((i * 7 + 3) % 256 for i in range(200_000))
    outcomes = [pub(ch, "", q, big, pika.BasicProperties(headers={"pad": "p" * 3000})),
                pub(ch, "", q, b""), pub(ch, "", q, b"x" * 4088)]
    got = []
    for _ in range(3):
        m, p, b = ch.basic_get(q, auto_ack=True)
        got.append(None if m is None else {"len": len(b), "same": b == big if len(b) > 5000
                                           else b == (b"" if not b else b"x" * 4088),
                                           "pad": len(p.headers["pad"]) if p.headers else 0})
    return {"outcomes": outcomes, "got": got}


@scenario
def exchange_auto_delete(ctx):
    c = ctx()
    ch = c.channel()
    x = ctx.x(ch, "x", "direct", auto_delete=True)
    unused = ctx.x(ch, "unused", "direct", auto_delete=True)
    q = ctx.q(ch, "q")
    ch.queue_bind(q, x, "a")
    ch.queue_bind(q, x, "b")
    ch.queue_unbind(q, x, "a")
    still = attempt(c.channel().exchange_declare, x, passive=True)
    ch.queue_unbind(q, x, "b")
    gone = attempt(c.channel().exchange_declare, x, passive=True)
    never_bound = attempt(c.channel().exchange_declare, unused, passive=True)
    return {"after_first_unbind": still, "after_last_unbind": gone,
            "never_bound": never_bound}


# ---------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------


def run_one(fn, url):
    ctx = Ctx(url, fn.__name__)
    result = {}

    def target():
        try:
            result["obs"] = fn(ctx)
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(SCENARIO_TIMEOUT)
    if t.is_alive():
        return None, f"timed out after {SCENARIO_TIMEOUT}s", ctx
    return result.get("obs"), result.get("error"), ctx


def run_pair(fn, urls):
    out = {}
    threads = []
    for side, url in urls.items():
        def go(side=side, url=url):
            obs, err, ctx = run_one(fn, url)
            if obs is not None:
                obs = normalise(obs, ctx.names)
            if err is not None:
                err = normalise(err, ctx.names)
            ctx.cleanup()
            out[side] = (obs, err)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(SCENARIO_TIMEOUT + 15)
    return out


def check_reachable(label, url):
    try:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        pika.BlockingConnection(params).close()
    except Exception as e:  # noqa: BLE001
        print(f"FATAL: cannot connect to {label} at {url}: {e!r}", file=sys.stderr)
        sys.exit(2)


def inject_selftest_scenarios():
    """Scenarios whose observations differ by construction (to prove DIFF works)."""

    def selftest_unexpected_diff(ctx):
        return {"bodies": ["a", "b"] if ctx.side == "rabbitmq" else ["b", "a"]}

    def selftest_deliberate_diff(ctx):
        return {"side": ctx.side}

    SCENARIOS.append(selftest_unexpected_diff)
    SCENARIOS.append(selftest_deliberate_diff)
    DELIBERATE["selftest_deliberate_diff"] = "self-test: documented difference, must not fail"


def main(argv=None):
    global SCENARIO_TIMEOUT  # pylint: disable=global-statement
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warren", required=True, help="AMQP URL of Warren")
    ap.add_argument("--rabbitmq", required=True, help="AMQP URL of the reference RabbitMQ")
    ap.add_argument("-k", action="append", default=[],
                    help="only scenarios whose name contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="list scenarios and exit")
    ap.add_argument("--show", action="store_true", help="print every observation")
    ap.add_argument("--reply-text", choices=["full", "prefix"], default="full",
                    help="compare close reply texts in full (default) or only their "
                         "symbolic prefix such as NOT_FOUND")
    ap.add_argument("--json", metavar="FILE", help="write all observations to FILE")
    ap.add_argument("--timeout", type=float, default=SCENARIO_TIMEOUT,
                    help="seconds one scenario may take on one broker (default %(default)s)")
    ap.add_argument("--inject-diff", action="store_true",
                    help="add two self-test scenarios that differ by construction "
                         "(one deliberate): proves the comparison reports DIFF and fails")
    args = ap.parse_args(argv)

    SCENARIO_TIMEOUT = args.timeout
    if args.inject_diff:
        inject_selftest_scenarios()
    selected = [fn for fn in SCENARIOS if not args.k or any(k in fn.__name__ for k in args.k)]
    if args.list:
        for fn in selected:
            print(fn.__name__)
        return 0
    if not selected:
        print("no scenario selected", file=sys.stderr)
        return 1

    check_reachable("rabbitmq", args.rabbitmq)
    check_reachable("warren", args.warren)
    urls = {"rabbitmq": args.rabbitmq, "warren": args.warren}
    print(f"differential: {len(selected)} scenarios, rabbitmq={args.rabbitmq} "
          f"warren={args.warren}", flush=True)

    passed = failed = deliberate = 0
    failures = []
    dump = {}
    t0 = time.monotonic()
    for fn in selected:
        name = fn.__name__
        start = time.monotonic()
        if name.startswith("selftest_"):
            res = {side: (normalise(fn(_SideCtx(url, side)), {}), None)
                   for side, url in urls.items()}
        else:
            res = run_pair(fn, urls)
        took = time.monotonic() - start
        (obs_r, err_r) = res.get("rabbitmq", (None, "no result"))
        (obs_w, err_w) = res.get("warren", (None, "no result"))
        if args.reply_text == "prefix":
            obs_r, obs_w = strip_reply_texts(obs_r), strip_reply_texts(obs_w)
        dump[name] = {"rabbitmq": obs_r, "warren": obs_w, "rabbitmq_error": err_r,
                      "warren_error": err_w}
        if err_r or err_w:
            failed += 1
            failures.append(name)
            print(f"ERROR {name} ({took:.1f}s)")
            for side, err in (("rabbitmq", err_r), ("warren", err_w)):
                if err:
                    print(f"  [{side}] " + err.rstrip().replace("\n", "\n  "))
            continue
        diff = compare(obs_r, strip_deliberate_keys(obs_w))
        if diff is None:
            passed += 1
            print(f"PASS  {name} ({took:.1f}s)")
            if args.show:
                print("  " + pretty(obs_r).replace("\n", "\n  "))
        elif name in DELIBERATE:
            deliberate += 1
            print(f"DIFF  {name} (deliberate: {DELIBERATE[name]})")
            print("  " + diff.replace("\n", "\n  "))
        else:
            failed += 1
            failures.append(name)
            print(f"DIFF  {name} ({took:.1f}s)")
            print("  " + diff.replace("\n", "\n  "))
        sys.stdout.flush()

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dump, f, indent=2, sort_keys=True, ensure_ascii=False)
    print()
    print("deliberately extra header keys (ignored on Warren's side): "
          + ", ".join(sorted(DELIBERATE_EXTRA_KEYS)))
    if deliberate:
        print(f"{deliberate} deliberate difference(s), documented in DELIBERATE")
    if failures:
        print("failed scenarios: " + " ".join(failures))
    print(f"took {time.monotonic() - t0:.1f}s")
    print(f"differential: {passed + deliberate} passed, {failed} failed")
    return 1 if failed else 0


class _SideCtx:
    def __init__(self, url, side):
        self.url = url
        self.side = side


if __name__ == "__main__":
    sys.exit(main())
