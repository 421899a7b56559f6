"""Workload for prometheus_scrape_test.sh: runs AMQP traffic against Warren, then polls
the Prometheus HTTP API until the scraped values match (or 60 s pass).

Environment: AMQP_URL (Warren), PROMETHEUS_URL (the Prometheus server scraping it, with
jobs `warren` on /metrics and `warren-per-object` on /metrics/per-object).
"""

import json
import os
import sys
import time
import urllib.parse
import urllib.request
import uuid

import pika

AMQP_URL = os.environ["AMQP_URL"]
PROMETHEUS_URL = os.environ["PROMETHEUS_URL"]


def query(expr):
    url = PROMETHEUS_URL + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: {body}")
    return [float(s["value"][1]) for s in body["data"]["result"]]


def main():
    q = "prom-" + uuid.uuid4().hex[:8]
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(q)
    for i in range(7):
        ch.basic_publish("", q, b"x" * 10)
    try:
        ch.basic_publish("", "no-such-queue-" + q, b"u", mandatory=True)
    except pika.exceptions.UnroutableError:
        pass
    for _ in range(2):
        method, _, _ = ch.basic_get(q, auto_ack=False)
        ch.basic_ack(method.delivery_tag)
    ch.basic_consume(q, lambda *a: None)  # a consumer that never acks

    # The consumer takes every ready message (no prefetch): 5 unacked, 0 ready.
    expectations = {
        'up{job="warren"}': 1,
        'up{job="warren-per-object"}': 1,
        'rabbitmq_queue_messages_ready{job="warren"}': 0,
        'rabbitmq_queue_messages_unacked{job="warren"}': 5,
        'rabbitmq_queue_messages{job="warren"}': 5,
        'rabbitmq_queue_messages_bytes{job="warren"}': 50,
        'rabbitmq_queue_consumers{job="warren"}': 1,
        f'rabbitmq_queue_messages_unacked{{job="warren-per-object",vhost="/",queue="{q}"}}': 5,
        f'rabbitmq_queue_consumers{{job="warren-per-object",vhost="/",queue="{q}"}}': 1,
        'rabbitmq_connections{job="warren"}': 1,
        'rabbitmq_channels{job="warren"}': 1,
        'rabbitmq_consumers{job="warren"}': 1,
        'rabbitmq_queues{job="warren"}': 1,
        'rabbitmq_channel_messages_published_total{job="warren"}': 8,
        'rabbitmq_channel_messages_confirmed_total{job="warren"}': 8,
        'rabbitmq_channel_messages_unroutable_returned_total{job="warren"}': 1,
        'rabbitmq_channel_get_ack_total{job="warren"}': 2,
        'rabbitmq_channel_messages_acked_total{job="warren"}': 2,
        'rabbitmq_channel_messages_delivered_ack_total{job="warren"}': 5,
        'rabbitmq_queues_created_total{job="warren"}': 1,
        'rabbitmq_alarms_memory_used_watermark{job="warren"}': 0,
        'count(rabbitmq_identity_info{job="warren"})': 1,
        'count(rabbitmq_build_info{job="warren"})': 1,
        # As the RabbitMQ-Overview dashboard queries it (the identity join).
        'sum(rabbitmq_queue_messages_unacked * on(instance, job) group_left(rabbitmq_cluster)'
        ' rabbitmq_identity_info{job="warren"})': 5,
    }
    deadline = time.monotonic() + 60
    while True:
        conn.process_data_events(0.2)
        got = {}
        for expr in expectations:
            try:
                got[expr] = query(expr)
            except Exception as e:  # Prometheus may not have scraped yet
                got[expr] = repr(e)
        wrong = {e: got[e] for e, v in expectations.items() if got[e] != [float(v)]}
        if not wrong:
            break
        if time.monotonic() > deadline:
            for e, v in wrong.items():
                print(f"MISMATCH {e}: expected {expectations[e]}, got {v}", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.5)
    for e, v in expectations.items():
        print(f"ok  {e} = {v}")
    ch.queue_delete(q)
    conn.close()


if __name__ == "__main__":
    main()
