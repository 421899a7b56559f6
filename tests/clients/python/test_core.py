"""Core AMQP 0-9-1 behaviour as seen by pika (BlockingConnection).

Every test here passes against RabbitMQ 3.10; Warren must behave the same.
"""

import time
import urllib.parse

import pika
import pytest
from pika.exceptions import (AMQPConnectionError, ChannelClosedByBroker, NackError,
                             UnroutableError)

from pika_helpers import bodies, connect, consume, get_all, record_methods

# ---------------------------------------------------------------------------
# publish / consume / get
# ---------------------------------------------------------------------------


def test_publish_consume_ack(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("pca", ch)
    for i in range(5):
        ch.basic_publish("", q, f"m{i}".encode(),
                         pika.BasicProperties(content_type="text/plain", delivery_mode=2,
                                              headers={"k": i}))
    _tag, got = consume(broker.conn, ch, q, 5)
    assert bodies(got) == [f"m{i}" for i in range(5)]
    assert [m.delivery_tag for (m, _p, _b) in got] == [1, 2, 3, 4, 5]
    assert all(not m.redelivered for (m, _p, _b) in got)
    assert all(m.routing_key == q and m.exchange == "" for (m, _p, _b) in got)
    assert [p.headers["k"] for (_m, p, _b) in got] == list(range(5))
    assert got[0][1].content_type == "text/plain"
    assert got[0][1].delivery_mode == 2
    ch.basic_ack(got[-1][0].delivery_tag, multiple=True)
    # everything acked: a passive declare reports an empty queue with one consumer
    ok = ch.queue_declare(q, passive=True)
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 1


def test_unacked_messages_requeued_when_channel_closes(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("requeue-close", ch)
    ch.basic_publish("", q, b"x")
    ch2 = broker.channel()
    _tag, got = consume(broker.conn, ch2, q, 1)
    assert bodies(got) == ["x"]
    ch2.close()
    again = get_all(ch, q, expect=1)
    assert bodies(again) == ["x"]
    assert again[0][0].redelivered is True


def test_basic_get_and_get_empty(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("get", ch)
    m, p, b = ch.basic_get(q)
    assert (m, p, b) == (None, None, None)
    ch.basic_publish("", q, b"one")
    ch.basic_publish("", q, b"two")
    m, _p, b = ch.basic_get(q, auto_ack=False)
    assert b == b"one"
    assert m.message_count == 1  # messages remaining after this one
    assert m.redelivered is False
    ch.basic_ack(m.delivery_tag)
    m, _p, b = ch.basic_get(q, auto_ack=True)
    assert b == b"two" and m.message_count == 0
    assert ch.basic_get(q) == (None, None, None)


# ---------------------------------------------------------------------------
# nack / reject
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_requeue_sets_redelivered_and_keeps_order(broker, how):
    ch = broker.channel(confirm=True)
    q = broker.queue(f"requeue-{how}", ch)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    msgs = [ch.basic_get(q, auto_ack=False) for _ in range(3)]
    assert bodies(msgs) == ["m0", "m1", "m2"]
    # settle them in reverse order: they must still come back in publish order
    for m, _p, _b in reversed(msgs):
        if how == "reject":
            ch.basic_reject(m.delivery_tag, requeue=True)
        else:
            ch.basic_nack(m.delivery_tag, multiple=False, requeue=True)
    again = get_all(ch, q, expect=3)
    assert bodies(again) == ["m0", "m1", "m2"]
    assert all(m.redelivered for (m, _p, _b) in again)


def test_nack_multiple_requeue(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("nack-multi", ch)
    for i in range(4):
        ch.basic_publish("", q, f"m{i}".encode())
    _tag, got = consume(broker.conn, ch, q, 4)
    assert bodies(got) == ["m0", "m1", "m2", "m3"]
    ch.basic_cancel(_tag)
    ch.basic_nack(got[2][0].delivery_tag, multiple=True, requeue=True)  # m0..m2
    ch.basic_ack(got[3][0].delivery_tag)
    again = get_all(ch, q, expect=3)
    assert bodies(again) == ["m0", "m1", "m2"]
    assert all(m.redelivered for (m, _p, _b) in again)


@pytest.mark.parametrize("how", ["reject", "nack"])
def test_reject_without_requeue_discards(broker, how):
    ch = broker.channel(confirm=True)
    q = broker.queue(f"discard-{how}", ch)
    ch.basic_publish("", q, b"a")
    ch.basic_publish("", q, b"b")
    m, _p, b = ch.basic_get(q, auto_ack=False)
    assert b == b"a"
    if how == "reject":
        ch.basic_reject(m.delivery_tag, requeue=False)
    else:
        ch.basic_nack(m.delivery_tag, requeue=False)
    rest = get_all(ch, q, expect=1)
    assert bodies(rest) == ["b"]
    assert rest[0][0].redelivered is False
    assert ch.queue_declare(q, passive=True).method.message_count == 0


# ---------------------------------------------------------------------------
# publisher confirms and returns
# ---------------------------------------------------------------------------


def test_publisher_confirms_ack(broker):
    log = record_methods(broker.conn)
    ch = broker.channel(confirm=True)
    q = broker.queue("confirm", ch)
    for i in range(3):
        ch.basic_publish("", q, f"c{i}".encode())  # raises unless acked
    acks = [m for (num, name, m) in log if num == ch.channel_number and name == "Basic.Ack"]
    # delivery tags count from 1 per channel; "multiple" may fold several
    assert acks and acks[-1].delivery_tag == 3
    assert ch.queue_declare(q, passive=True).method.message_count == 3


def test_publisher_confirm_nack_on_reject_publish_overflow(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("overflow", ch,
                     arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.basic_publish("", q, b"first")
    with pytest.raises(NackError):
        ch.basic_publish("", q, b"second")
    # the channel stays usable, the queue still holds only the first message
    assert bodies(get_all(ch, q)) == ["first"]
    ch.basic_publish("", q, b"third")
    assert bodies(get_all(ch, q, expect=1)) == ["third"]


def test_mandatory_unroutable_returned_before_confirm(broker):
    log = record_methods(broker.conn)
    ch = broker.channel(confirm=True)
    x = broker.exchange("noroute", "direct", ch)
    with pytest.raises(UnroutableError) as ei:
        ch.basic_publish(x, "nowhere", b"lost", mandatory=True)
    ret = ei.value.messages[0]
    assert ret.method.reply_code == 312
    assert ret.method.reply_text == "NO_ROUTE"
    assert ret.method.exchange == x
    assert ret.method.routing_key == "nowhere"
    assert ret.body == b"lost"
    names = [name for (num, name, _m) in log if num == ch.channel_number]
    assert "Basic.Return" in names and "Basic.Ack" in names
    assert names.index("Basic.Return") < names.index("Basic.Ack")


def test_mandatory_unroutable_without_confirms(broker):
    ch = broker.channel()
    returned = []
    ch.add_on_return_callback(lambda _c, m, p, b: returned.append((m, b)))
    ch.basic_publish("", broker.name("no-such-queue"), b"r", mandatory=True)
    deadline = time.monotonic() + 3
    while not returned and time.monotonic() < deadline:
        broker.conn.process_data_events(time_limit=0.05)
    assert [(m.reply_code, m.reply_text, b) for (m, b) in returned] == [(312, "NO_ROUTE", b"r")]


def test_non_mandatory_unroutable_is_dropped_and_acked(broker):
    ch = broker.channel(confirm=True)
    x = broker.exchange("drop", "fanout", ch)
    ch.basic_publish(x, "", b"dropped")  # acked, no exception


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------

TOPIC_KEYS = ["", "a", "b", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "x.a.b", "a..b", "ab"]
TOPIC_EXPECT = {
    "#": TOPIC_KEYS,
    "*": ["a", "b", "ab"],  # the empty key has zero words
    "a.*": ["a.b"],
    "a.#": ["a", "a.b", "a.x.b", "a.x.y.b", "a.b.c", "a..b"],
    "#.b": ["b", "a.b", "a.x.b", "a.x.y.b", "x.a.b", "a..b"],
    "a.#.b": ["a.b", "a.x.b", "a.x.y.b", "a..b"],
    "a.*.b": ["a.x.b", "a..b"],
    "*.*": ["a.b"],
    "#.#": TOPIC_KEYS,
    "a.b": ["a.b"],
    "*.b.#": ["a.b", "a.b.c"],
}


def test_topic_routing(broker):
    ch = broker.channel(confirm=True)
    x = broker.exchange("topic", "topic", ch)
    queues = {}
    for i, pattern in enumerate(TOPIC_EXPECT):
        q = broker.queue(f"topic{i}", ch)
        ch.queue_bind(q, x, routing_key=pattern)
        queues[pattern] = q
    for key in TOPIC_KEYS:
        ch.basic_publish(x, key, key.encode() or b"<empty>")
    for pattern, expected in TOPIC_EXPECT.items():
        got = bodies(get_all(ch, queues[pattern]))
        want = [k or "<empty>" for k in expected]
        assert got == want, f"pattern {pattern!r}"


def test_topic_unbind(broker):
    ch = broker.channel(confirm=True)
    x = broker.exchange("topic-unbind", "topic", ch)
    q = broker.queue("topic-unbind", ch)
    ch.queue_bind(q, x, routing_key="a.*")
    ch.queue_bind(q, x, routing_key="#.z")
    ch.basic_publish(x, "a.z", b"1")  # matches both bindings: delivered once
    ch.queue_unbind(q, x, routing_key="a.*")
    ch.basic_publish(x, "a.b", b"2")  # no longer matches
    ch.basic_publish(x, "b.z", b"3")
    assert bodies(get_all(ch, q, expect=2)) == ["1", "3"]


def test_direct_and_default_exchange(broker):
    ch = broker.channel(confirm=True)
    x = broker.exchange("direct", "direct", ch)
    q1 = broker.queue("d1", ch)
    q2 = broker.queue("d2", ch)
    ch.queue_bind(q1, x, routing_key="k1")
    ch.queue_bind(q2, x, routing_key="k1")
    ch.queue_bind(q2, x, routing_key="k2")
    ch.basic_publish(x, "k1", b"both")
    ch.basic_publish(x, "k2", b"only2")
    ch.basic_publish(x, "k3", b"none")
    ch.basic_publish("", q1, b"default")
    assert bodies(get_all(ch, q1, expect=2)) == ["both", "default"]
    assert bodies(get_all(ch, q2, expect=2)) == ["both", "only2"]


def test_fanout(broker):
    ch = broker.channel(confirm=True)
    x = broker.exchange("fanout", "fanout", ch)
    qs = [broker.queue(f"f{i}", ch) for i in range(3)]
    for q in qs:
        ch.queue_bind(q, x, routing_key="ignored-" + q)
    ch.basic_publish(x, "whatever", b"hello")
    for q in qs:
        got = get_all(ch, q, expect=1)
        assert bodies(got) == ["hello"]
        assert got[0][0].routing_key == "whatever"


def test_headers_exchange(broker):
    ch = broker.channel(confirm=True)
    x = broker.exchange("headers", "headers", ch)
    q_all = broker.queue("h-all", ch)
    q_any = broker.queue("h-any", ch)
    q_default = broker.queue("h-default", ch)
    ch.queue_bind(q_all, x, arguments={"x-match": "all", "a": 1, "b": "two"})
    ch.queue_bind(q_any, x, arguments={"x-match": "any", "a": 1, "b": "two"})
    ch.queue_bind(q_default, x, arguments={"a": 1, "b": "two"})  # default is all
    cases = [
        ("both", {"a": 1, "b": "two"}),
        ("both+extra", {"a": 1, "b": "two", "c": 3}),
        ("only-a", {"a": 1}),
        ("only-b", {"b": "two"}),
        ("wrong-a", {"a": 2, "b": "two"}),
        ("none", {"c": 1}),
        ("no-headers", None),
    ]
    for body, headers in cases:
        ch.basic_publish(x, "", body.encode(), pika.BasicProperties(headers=headers))
    assert bodies(get_all(ch, q_all)) == ["both", "both+extra"]
    assert bodies(get_all(ch, q_default)) == ["both", "both+extra"]
    assert bodies(get_all(ch, q_any)) == ["both", "both+extra", "only-a", "only-b", "wrong-a"]


def test_exchange_to_exchange_binding(broker):
    ch = broker.channel(confirm=True)
    src = broker.exchange("e2e-src", "topic", ch)
    dst = broker.exchange("e2e-dst", "fanout", ch)
    q = broker.queue("e2e", ch)
    ch.exchange_bind(destination=dst, source=src, routing_key="a.#")
    ch.queue_bind(q, dst)
    ch.basic_publish(src, "a.b", b"yes")
    ch.basic_publish(src, "b.a", b"no")
    assert bodies(get_all(ch, q, expect=1)) == ["yes"]


# ---------------------------------------------------------------------------
# dead lettering, x-death, TTL
# ---------------------------------------------------------------------------


def _dlx_setup(broker, ch, base, queue_args):
    dlx = broker.exchange(f"{base}-dlx", "fanout", ch)
    dlq = broker.queue(f"{base}-dlq", ch)
    ch.queue_bind(dlq, dlx)
    args = {"x-dead-letter-exchange": dlx}
    args.update(queue_args)
    q = broker.queue(base, ch, arguments=args)
    return dlx, dlq, q


def test_dlx_reject_x_death(broker):
    ch = broker.channel(confirm=True)
    _dlx, dlq, q = _dlx_setup(broker, ch, "dlx-rej", {})
    ch.basic_publish("", q, b"bad", pika.BasicProperties(headers={"mine": "kept"}))
    m, _p, _b = ch.basic_get(q, auto_ack=False)
    ch.basic_reject(m.delivery_tag, requeue=False)
    got = get_all(ch, dlq, expect=1)
    assert bodies(got) == ["bad"]
    m, p, _b = got[0]
    assert m.routing_key == q  # dead-lettered with its original routing key
    h = p.headers
    assert h["mine"] == "kept"
    deaths = h["x-death"]
    assert len(deaths) == 1
    d = deaths[0]
    assert d["count"] == 1
    assert d["reason"] == "rejected"
    assert d["queue"] == q
    assert d["exchange"] == ""
    assert d["routing-keys"] == [q]
    assert "time" in d
    assert "original-expiration" not in d
    assert h["x-first-death-queue"] == q
    assert h["x-first-death-reason"] == "rejected"
    assert h["x-first-death-exchange"] == ""
    # x-last-death-* appeared in RabbitMQ 3.13; 3.10 (the reference here) does not
    # send them. When present they must describe the latest death.
    if "x-last-death-queue" in h:
        assert h["x-last-death-queue"] == q
        assert h["x-last-death-reason"] == "rejected"
        assert h["x-last-death-exchange"] == ""


def test_dlx_nack_with_dead_letter_routing_key(broker):
    ch = broker.channel(confirm=True)
    dlx = broker.exchange("dlrk-dlx", "direct", ch)
    dlq = broker.queue("dlrk-dlq", ch)
    ch.queue_bind(dlq, dlx, routing_key="dead")
    src = broker.exchange("dlrk-src", "direct", ch)
    q = broker.queue("dlrk", ch, arguments={"x-dead-letter-exchange": dlx,
                                            "x-dead-letter-routing-key": "dead"})
    ch.queue_bind(q, src, routing_key="orig")
    ch.basic_publish(src, "orig", b"n")
    m, _p, _b = ch.basic_get(q, auto_ack=False)
    ch.basic_nack(m.delivery_tag, requeue=False)
    got = get_all(ch, dlq, expect=1)
    m, p, _b = got[0]
    assert m.routing_key == "dead"
    d = p.headers["x-death"][0]
    assert (d["reason"], d["queue"], d["exchange"], d["routing-keys"]) == \
        ("rejected", q, src, ["orig"])


def test_queue_ttl_dead_letters_expired(broker):
    ch = broker.channel(confirm=True)
    _dlx, dlq, q = _dlx_setup(broker, ch, "qttl", {"x-message-ttl": 100})
    ch.basic_publish("", q, b"old")
    got = get_all(ch, dlq, expect=1, timeout=3)
    assert bodies(got) == ["old"]
    h = got[0][1].headers
    d = h["x-death"][0]
    assert (d["reason"], d["queue"], d["count"], d["exchange"], d["routing-keys"]) == \
        ("expired", q, 1, "", [q])
    assert "original-expiration" not in d
    assert h["x-first-death-reason"] == "expired"
    assert ch.basic_get(q) == (None, None, None)


def test_per_message_ttl_dead_letters_with_original_expiration(broker):
    ch = broker.channel(confirm=True)
    _dlx, dlq, q = _dlx_setup(broker, ch, "mttl", {})
    ch.basic_publish("", q, b"short", pika.BasicProperties(expiration="100"))
    ch.basic_publish("", q, b"long", pika.BasicProperties(expiration="60000"))
    # the expired message sits behind nothing: it is dead-lettered on its own
    got = get_all(ch, dlq, expect=1, timeout=3)
    assert bodies(got) == ["short"]
    _m, p, _b = got[0]
    assert p.expiration is None  # expiration is removed when dead-lettering
    d = p.headers["x-death"][0]
    assert d["reason"] == "expired"
    assert d["original-expiration"] == "100"
    assert d["queue"] == q
    m, p, b = ch.basic_get(q, auto_ack=True)
    assert b == b"long" and p.expiration == "60000"


def test_expired_messages_never_delivered(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("ttl-nodeliver", ch, arguments={"x-message-ttl": 150})
    q2 = broker.queue("ttl-nodeliver2", ch)
    ch.basic_publish("", q, b"q-ttl")
    ch.basic_publish("", q2, b"msg-ttl", pika.BasicProperties(expiration="150"))
    ch.basic_publish("", q2, b"fresh")
    time.sleep(0.4)
    assert ch.basic_get(q) == (None, None, None)
    _tag, got = consume(broker.conn, ch, q, 1, timeout=0.5, auto_ack=True)
    assert got == []
    assert bodies(get_all(ch, q2)) == ["fresh"]


def test_lower_of_queue_and_message_ttl_wins(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("ttl-min", ch, arguments={"x-message-ttl": 150})
    ch.basic_publish("", q, b"msg-ttl-longer", pika.BasicProperties(expiration="60000"))
    ch.basic_publish("", q, b"msg-ttl-zero", pika.BasicProperties(expiration="0"))
    time.sleep(0.4)
    assert ch.basic_get(q) == (None, None, None)


def test_maxlen_drop_head_dead_letters(broker):
    ch = broker.channel(confirm=True)
    _dlx, dlq, q = _dlx_setup(broker, ch, "maxlen", {"x-max-length": 2})
    for i in range(4):
        ch.basic_publish("", q, f"m{i}".encode())
    assert bodies(get_all(ch, q, expect=2)) == ["m2", "m3"]
    dead = get_all(ch, dlq, expect=2)
    assert bodies(dead) == ["m0", "m1"]
    assert all(p.headers["x-death"][0]["reason"] == "maxlen" for (_m, p, _b) in dead)


# ---------------------------------------------------------------------------
# QoS
# ---------------------------------------------------------------------------


def test_qos_prefetch_limits_unacked(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("qos", ch)
    for i in range(5):
        ch.basic_publish("", q, f"m{i}".encode())
    ch.basic_qos(prefetch_count=2)
    _tag, got = consume(broker.conn, ch, q, 2, settle=0.3)
    assert bodies(got) == ["m0", "m1"]
    ch.basic_ack(got[0][0].delivery_tag)
    deadline = time.monotonic() + 3
    while len(got) < 3 and time.monotonic() < deadline:
        broker.conn.process_data_events(time_limit=0.05)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        broker.conn.process_data_events(time_limit=0.05)
    assert bodies(got) == ["m0", "m1", "m2"]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_passive_declare_missing_queue_404(broker):
    ch = broker.channel()
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.queue_declare(broker.name("missing"), passive=True)
    assert ei.value.reply_code == 404
    assert ei.value.reply_text.startswith("NOT_FOUND")
    assert not ch.is_open
    assert broker.conn.is_open  # only the channel is closed
    broker.channel().queue_declare(broker.queue("after-404"), passive=True)


def test_passive_declare_missing_exchange_404(broker):
    ch = broker.channel()
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.exchange_declare(broker.name("missing-x"), passive=True)
    assert ei.value.reply_code == 404


def test_redeclare_with_different_durable_406(broker):
    ch = broker.channel()
    q = broker.queue("redeclare", ch, durable=False)
    ch.queue_declare(q, durable=False)  # identical redeclare is fine
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.queue_declare(q, durable=True)
    assert ei.value.reply_code == 406
    assert ei.value.reply_text.startswith("PRECONDITION_FAILED")


def test_redeclare_exchange_with_different_type_406(broker):
    ch = broker.channel()
    x = broker.exchange("redeclare-x", "direct", ch)
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.exchange_declare(x, exchange_type="fanout")
    assert ei.value.reply_code == 406


def test_declare_reserved_amq_exchange_403(broker):
    ch = broker.channel()
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.exchange_declare("amq.foo-" + broker.suffix, exchange_type="direct")
    assert ei.value.reply_code == 403
    assert ei.value.reply_text.startswith("ACCESS_REFUSED")


def test_publish_to_missing_exchange_404(broker):
    ch = broker.channel()
    ch.basic_publish(broker.name("no-such-exchange"), "k", b"x")
    with pytest.raises(ChannelClosedByBroker) as ei:
        # any synchronous method reveals the asynchronous channel close
        ch.queue_declare(broker.name("unused"), passive=True)
    assert ei.value.reply_code == 404
    assert "no-such-exchange" in ei.value.reply_text


def test_publish_to_missing_exchange_404_in_confirm_mode(broker):
    ch = broker.channel(confirm=True)
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.basic_publish(broker.name("no-such-exchange"), "k", b"x")
    assert ei.value.reply_code == 404


def test_ack_unknown_delivery_tag_406(broker):
    ch = broker.channel()
    ch.basic_ack(12345)
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.queue_declare(broker.name("unused"), passive=True)
    assert ei.value.reply_code == 406
    assert "unknown delivery tag 12345" in ei.value.reply_text


def test_double_ack_406(broker):
    ch = broker.channel(confirm=True)
    q = broker.queue("double-ack", ch)
    ch.basic_publish("", q, b"x")
    m, _p, _b = ch.basic_get(q, auto_ack=False)
    ch.basic_ack(m.delivery_tag)
    ch.basic_ack(m.delivery_tag)
    with pytest.raises(ChannelClosedByBroker) as ei:
        ch.queue_declare(q, passive=True)
    assert ei.value.reply_code == 406


def _url_with(url, vhost=None, password=None):
    u = urllib.parse.urlsplit(url)
    netloc = u.netloc
    path = u.path
    if password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{password}@{host}"
    if vhost is not None:
        path = "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit((u.scheme, netloc, path, u.query, u.fragment))


def test_missing_vhost_530(broker):
    url = _url_with(broker.url, vhost="no-such-vhost-" + broker.suffix)
    with pytest.raises(AMQPConnectionError) as ei:
        connect(url)
    text = repr(ei.value)
    assert "530" in text, text
    assert "NOT_ALLOWED" in text, text


def test_wrong_password_403(broker):
    url = _url_with(broker.url, password="definitely-wrong-" + broker.suffix)
    with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                        pika.exceptions.AuthenticationError)) as ei:
        connect(url)
    text = repr(ei.value)
    assert "403" in text, text
    assert "ACCESS_REFUSED" in text, text
