"""AMQPS as seen by pika: TLS with a client certificate (mutual TLS).

Warren's own tests (RabbitMQ's reference instance runs without TLS). They need a broker
with an AMQPS listener that requires client certificates, and say where it is with
``AMQPS_PORT`` and ``WARREN_TLS_DIR`` (``ca.crt``, ``client.crt``, ``client.key`` as
written by ``scripts/test-pki.sh``); ``scripts/test.sh`` starts such a broker for this
suite. Without them these tests fail: they never skip.
"""

import os
import ssl
import uuid

import pika
import pytest
from pika.exceptions import AMQPConnectionError

from pika_helpers import bodies, get_all


@pytest.fixture(scope="module")
def tls():
    port, d = os.environ.get("AMQPS_PORT"), os.environ.get("WARREN_TLS_DIR")
    if not port or not d:
        pytest.fail("AMQPS_PORT and WARREN_TLS_DIR must name a broker with an AMQPS listener "
                    "and its test PKI (scripts/test.sh sets them)", pytrace=False)
    return int(port), d


def params(port, context):
    return pika.ConnectionParameters(
        host="localhost", port=port, virtual_host="/",
        credentials=pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(context, "localhost"),
        connection_attempts=1, socket_timeout=5)


def context(d, client_cert=True):
    ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(os.path.join(d, "client.crt"), os.path.join(d, "client.key"))
    return ctx


def test_publish_and_consume_over_tls(tls):
    port, d = tls
    conn = pika.BlockingConnection(params(port, context(d)))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        q = f"warren-test.tls.{uuid.uuid4().hex[:12]}"
        ch.queue_declare(q, auto_delete=True)
        for i in range(3):
            ch.basic_publish("", q, f"tls-{i}".encode(),
                             pika.BasicProperties(delivery_mode=2))
        assert bodies(get_all(ch, q, expect=3)) == ["tls-0", "tls-1", "tls-2"]
        ch.queue_delete(q)
    finally:
        conn.close()


def test_client_without_certificate_is_refused(tls):
    port, d = tls
    with pytest.raises(AMQPConnectionError):
        pika.BlockingConnection(params(port, context(d, client_cert=False)))


def test_plain_amqp_on_the_tls_port_fails(tls):
    port, _d = tls
    with pytest.raises(AMQPConnectionError):
        pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=5))
