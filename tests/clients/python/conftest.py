"""Shared fixtures for the pika client suite.

The broker under test is taken from the environment variable ``AMQP_URL``
(default ``amqp://guest:guest@127.0.0.1:5672/%2f``).  If the broker cannot be
reached every test errors out with a clear message: this suite never skips.
"""

import uuid

import pika
import pytest

from pika_helpers import amqp_url, connect


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
