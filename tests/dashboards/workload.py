"""A small, steady AMQP workload for panels_test.sh, so every panel of the Warren overview
dashboard has something to show: publishes with confirms, deliveries with manual and
automatic acknowledgement, requeues (redeliveries), basic.get, unroutable messages (returned
and dropped), a queue that grows with no consumer, and connection/channel churn.

Environment: AMQP_URL. Runs until WORKLOAD_SECONDS (default 600) pass or SIGTERM.
"""

import os
import signal
import sys
import time

import pika

AMQP_URL = os.environ["AMQP_URL"]
DEADLINE = time.monotonic() + float(os.environ.get("WORKLOAD_SECONDS", "600"))
running = True


def stop(*_):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)


def main():
    params = pika.URLParameters(AMQP_URL)
    conn = pika.BlockingConnection(params)
    pub = conn.channel()
    pub.confirm_delivery()
    for q in ("panels.work", "panels.auto", "panels.backlog"):
        pub.queue_declare(q)

    consumer = conn.channel()
    consumer.basic_qos(prefetch_count=50)
    seen = set()

    def on_work(ch, method, props, body):
        # Every fifth message is requeued once: it comes back as a redelivery.
        if not method.redelivered and int(body) % 5 == 0 and body not in seen:
            seen.add(body)
            ch.basic_nack(method.delivery_tag, requeue=True)
        else:
            seen.discard(body)
            ch.basic_ack(method.delivery_tag)

    consumer.basic_consume("panels.work", on_work)
    auto = conn.channel()
    auto.basic_consume("panels.auto", lambda *a: None, auto_ack=True)
    getter = conn.channel()

    n = 0
    last_churn = 0.0
    while running and time.monotonic() < DEADLINE:
        n += 1
        body = str(n).encode()
        pub.basic_publish("", "panels.work", body)
        pub.basic_publish("", "panels.auto", body)
        pub.basic_publish("", "panels.backlog", body)  # nobody consumes it: it grows
        try:
            pub.basic_publish("amq.direct", "nowhere", body, mandatory=True)
        except pika.exceptions.UnroutableError:
            pass  # returned, as it should be
        pub.basic_publish("amq.direct", "nowhere", body)  # not mandatory: dropped
        if n % 4 == 0:
            method, _, _ = getter.basic_get("panels.backlog", auto_ack=False)
            if method:
                getter.basic_ack(method.delivery_tag)
            getter.basic_get("panels.backlog", auto_ack=True)
        if time.monotonic() - last_churn > 5:
            # Connection and channel churn.
            last_churn = time.monotonic()
            c = pika.BlockingConnection(params)
            c.channel().close()
            c.close()
        conn.process_data_events(time_limit=0.2)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
