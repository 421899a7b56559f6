"""AMQPS as seen by pika: TLS with a client certificate (mutual TLS).

Warren's own tests (RabbitMQ's reference instance runs without TLS). They need a broker
with an AMQPS listener that requires client certificates, and say where it is with
``AMQPS_PORT`` and ``WARREN_TLS_DIR`` (``ca.crt``, ``client.crt``, ``client.key`` as
written by ``scripts/test-pki.sh``); ``scripts/test.sh`` starts such a broker for this
suite. Without them these tests fail: they never skip.
"""

import base64
import json
import os
import ssl
import urllib.parse
import urllib.request
import uuid

import pika
import pytest
from pika.credentials import ExternalCredentials
from pika.exceptions import AMQPConnectionError, AuthenticationError

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


def management(method, path, body=None):
    """A call to the management API of the broker under test (WARREN_MGMT_URL) as guest."""
    base = os.environ.get("WARREN_MGMT_URL")
    if not base:
        pytest.fail("WARREN_MGMT_URL must name the broker's management API "
                    "(scripts/test.sh sets it)", pytrace=False)
    req = urllib.request.Request(
        base + "/api/" + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json",
                 "authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read()
        return json.loads(text) if text else None


def test_sasl_external_logs_in_as_the_certificate_cn(tls):
    """SASL EXTERNAL: the client certificate (CN=app) names the user; it has no password."""
    port, d = tls
    user = "app"
    management("PUT", f"users/{user}", {"tags": ""})
    management("PUT", f"permissions/%2F/{user}",
               {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        p = params(port, context(d))
        p.credentials = ExternalCredentials()
        conn = pika.BlockingConnection(p)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            q = f"warren-test.external.{uuid.uuid4().hex[:12]}"
            ch.queue_declare(q, auto_delete=True)
            ch.basic_publish("", q, b"by certificate")
            assert bodies(get_all(ch, q, expect=1)) == ["by certificate"]
            ch.queue_delete(q)
            mine = [c for c in management("GET", "connections")
                    if c.get("auth_mechanism") == "EXTERNAL"]
            assert [c["user"] for c in mine] == [user], mine
        finally:
            conn.close()
    finally:
        management("DELETE", f"users/{urllib.parse.quote(user, safe='')}")
    # Without the user, the same certificate is refused.
    p = params(port, context(d))
    p.credentials = ExternalCredentials()
    with pytest.raises(AMQPConnectionError):
        pika.BlockingConnection(p)


def test_sasl_external_is_not_offered_over_plain_tcp():
    url = urllib.parse.urlsplit(os.environ.get("AMQP_URL", "amqp://127.0.0.1:5672/%2f"))
    p = pika.ConnectionParameters(host=url.hostname, port=url.port or 5672,
                                  credentials=ExternalCredentials(),
                                  connection_attempts=1, socket_timeout=5)
    # pika finds no EXTERNAL in connection.start and gives up.
    with pytest.raises(AuthenticationError):
        pika.BlockingConnection(p)
