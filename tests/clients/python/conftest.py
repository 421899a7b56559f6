"""Shared fixtures for the pika client suite.

The broker under test is taken from the environment variable ``AMQP_URL``
(default ``amqp://guest:guest@127.0.0.1:5672/%2f``).  If the broker cannot be
reached every test errors out with a clear message: this suite never skips.
"""

import os
import time
import uuid

import pika
import pytest

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


@pytest.fixture(scope="session")
def broker_url():
    """Check once that the broker is reachable; fail (never skip) otherwise."""
    url = amqp_url()
    try:
        c = connect(url)
    except Exception as e:  # noqa: BLE001 - we want every failure to be loud
        pytest.fail(f"cannot connect to the AMQP broker at {url!r} (set AMQP_URL): {e!r}",
                    pytrace=False)
    c.close()
    return url


class Broker:
    """One connection per test, plus bookkeeping for cleanup."""

    def __init__(self, url):
        self.url = url
        self.suffix = uuid.uuid4().hex[:12]
        self.queues = []
        self.exchanges = []
        self.connections = []
        self.conn = self.connection()

    # -- names and resources -------------------------------------------------
    def name(self, base):
        return f"warren-test.{base}.{self.suffix}"

    def connection(self, **overrides):
        c = connect(self.url, **overrides)
        self.connections.append(c)
        return c

    def channel(self, conn=None, confirm=False):
        ch = (conn or self.conn).channel()
        if confirm:
            ch.confirm_delivery()
        return ch

    def queue(self, base, ch=None, **kwargs):
        name = self.name(base)
        (ch or self.channel()).queue_declare(name, **kwargs)
        self.queues.append(name)
        return name

    def exchange(self, base, exchange_type="direct", ch=None, **kwargs):
        name = self.name(base)
        (ch or self.channel()).exchange_declare(name, exchange_type=exchange_type, **kwargs)
        self.exchanges.append(name)
        return name

    def close(self):
        try:
            c = connect(self.url)
            ch = c.channel()
            for q in self.queues:
                if not ch.is_open:
                    ch = c.channel()
                try:
                    ch.queue_delete(q)
                except pika.exceptions.ChannelClosedByBroker:
                    pass
            for x in self.exchanges:
                if not ch.is_open:
                    ch = c.channel()
                try:
                    ch.exchange_delete(x)
                except pika.exceptions.ChannelClosedByBroker:
                    pass
            c.close()
        finally:
            for c in self.connections:
                if c.is_open:
                    try:
                        c.close()
                    except Exception:  # noqa: BLE001
                        pass


@pytest.fixture
def broker(broker_url):
    b = Broker(broker_url)
    yield b
    b.close()


# -- helpers used by the tests ------------------------------------------------

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
