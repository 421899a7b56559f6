"""Helpers for the pika client suite (imported by conftest.py and the tests)."""

import os
import time

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def amqp_url():
    return os.environ.get("AMQP_URL", DEFAULT_URL)


def connect(url=None, **overrides):
    params = pika.URLParameters(url or amqp_url())
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    for k, v in overrides.items():
        setattr(params, k, v)
    return pika.BlockingConnection(params)


def get_all(ch, queue, expect=None, timeout=3.0, auto_ack=True):
    """basic.get until the queue is empty.

    If ``expect`` is given, keep polling (up to ``timeout``) until at least that
    many messages were fetched, then make sure nothing more is there.
    Returns a list of (method, properties, body).
    """
    out = []
    deadline = time.monotonic() + timeout
    while True:
        m, p, b = ch.basic_get(queue, auto_ack=auto_ack)
        if m is not None:
            out.append((m, p, b))
            continue
        if expect is None or len(out) >= expect or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


def bodies(msgs):
    return [b.decode() for (_m, _p, b) in msgs]


def consume(conn, ch, queue, n, timeout=3.0, auto_ack=False, settle=0.0, **kw):
    """Start a consumer and collect deliveries until ``n`` arrived (or timeout).

    After ``n`` arrived, keep listening ``settle`` more seconds to catch extras.
    Returns (consumer_tag, list of (method, properties, body)).
    """
    got = []

    def on_msg(_ch, m, p, b):
        got.append((m, p, b))

    tag = ch.basic_consume(queue, on_msg, auto_ack=auto_ack, **kw)
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    if settle:
        end = time.monotonic() + settle
        while time.monotonic() < end:
            conn.process_data_events(time_limit=0.05)
    return tag, got


def record_methods(conn):
    """Record the names of method frames received on ``conn`` (in order)."""
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
