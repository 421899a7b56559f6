"""Helpers for the link suites: Warren processes with fixed ports and data directories (so
they can be stopped and started again), the reference RabbitMQ (scripts/rabbitmq-ref.sh),
management API calls, publishing and counting with pika.

Nothing here skips: a missing binary, broker or tool is an error.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pika

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from freeport import free_port  # noqa: E402
REF = os.path.join(ROOT, "scripts", "rabbitmq-ref.sh")


def wait_for(what, cond, timeout=60.0, every=0.1):
    """Polls cond() until it is truthy; raises with `what` on timeout."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = cond()
        except Exception as e:  # noqa: BLE001 - a broker restarting refuses for a while
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Api:
    """A management API (RabbitMQ's or Warren's), as guest."""

    def __init__(self, base, user="guest", password="guest"):
        self.base = base.rstrip("/") + "/api"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", self.auth)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        return status, (json.loads(raw) if raw else None)

    def ok(self, method, path, body=None):
        status, v = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {v}"
        return v

    def get(self, path):
        return self.ok("GET", path)

    def param(self, component, name, value, vhost="/"):
        return self.ok("PUT", f"/parameters/{component}/{q(vhost)}/{q(name)}", {"value": value})

    def delete_param(self, component, name, vhost="/"):
        return self.call("DELETE", f"/parameters/{component}/{q(vhost)}/{q(name)}")

    def policy(self, name, pattern, definition, apply_to="all", vhost="/"):
        return self.ok("PUT", f"/policies/{q(vhost)}/{q(name)}",
                       {"pattern": pattern, "definition": definition, "apply-to": apply_to})

    def delete_policy(self, name, vhost="/"):
        return self.call("DELETE", f"/policies/{q(vhost)}/{q(name)}")

    def depth(self, queue, vhost="/"):
        """Messages (ready + unacked) in a queue as the broker counts them now; None if missing."""
        status, v = self.call("GET", f"/queues/{q(vhost)}/{q(queue)}")
        if status != 200:
            return None
        # RabbitMQ refreshes its counts every few seconds in the API; the AMQP passive
        # declare below is exact, so callers use `Amqp.count` where it matters.
        return v.get("messages")

    def shovel(self, name):
        for s in self.get("/shovels"):
            if s["name"] == name:
                return s
        return None

    def federation_links(self, obj):
        return [l for l in self.get("/federation-links")
                if l.get("exchange") == obj or l.get("queue") == obj]

    def delete_queue(self, name, vhost="/"):
        return self.call("DELETE", f"/queues/{q(vhost)}/{q(name)}")

    def delete_exchange(self, name, vhost="/"):
        return self.call("DELETE", f"/exchanges/{q(vhost)}/{q(name)}")


def q(s):
    return urllib.parse.quote(s, safe="")


class Amqp:
    """A pika connection to one broker with the few operations the tests need."""

    def __init__(self, url):
        self.url = url
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()

    def close(self):
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - it may be gone with its broker
            pass

    def count(self, queue):
        """Ready messages, exactly (passive declare); 0 if the queue does not exist."""
        try:
            ch = self.conn.channel()
            n = ch.queue_declare(queue, passive=True).method.message_count
            ch.close()
            return n
        except pika.exceptions.ChannelClosedByBroker:
            return 0

    def publish_n(self, queue, n, prefix="m", exchange="", routing_key=None, durable=True):
        """Publishes n persistent messages `{prefix}{i:06}` with confirms."""
        ch = self.conn.channel()
        if exchange == "":
            ch.queue_declare(queue, durable=durable)
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)
        for i in range(n):
            ch.basic_publish(exchange, routing_key or queue, f"{prefix}{i:06}".encode(), props)
        ch.close()

    def drain(self, queue):
        """Takes every message from a queue: a list of (body, properties)."""
        out = []
        ch = self.conn.channel()
        while True:
            m, props, body = ch.basic_get(queue, auto_ack=True)
            if m is None:
                break
            out.append((body.decode(), props))
        ch.close()
        return out


class Warren:
    """A warren-broker process that keeps its ports and data directory across restarts."""

    def __init__(self, name, cluster_name=None, extra=(), netns=None, host="127.0.0.1",
                 user="guest", password="guest"):
        self.bin = os.environ.get("WARREN_BIN") or os.path.join(ROOT, "target", "debug", "warren-broker")
        if not os.access(self.bin, os.X_OK):
            raise AssertionError(f"warren-broker binary not found at {self.bin} (set WARREN_BIN)")
        self.name = name
        self.cluster = cluster_name or name
        self.dir = tempfile.mkdtemp(prefix=f"warren-links-{name}-")
        self.host = host
        self.port = free_port()
        self.mgmt = free_port()
        self.prom = free_port()
        self.extra = list(extra)
        self.netns = netns
        self.user, self.password = user, password
        if user != "guest":
            self.extra += ["--default-user", user, "--default-pass", password]
        self.proc = None
        self.starts = 0
        self.start()

    @property
    def url(self):
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/%2f"

    @property
    def api(self):
        return Api(f"http://{self.host}:{self.mgmt}", self.user, self.password)

    def log_path(self):
        return os.path.join(self.dir, f"warren-{self.starts}.log")

    def start(self):
        self.starts += 1
        cmd = [self.bin, "--data-dir", os.path.join(self.dir, "data"),
               "--amqp-listen", f"{self.host}:{self.port}",
               "--management-listen", f"{self.host}:{self.mgmt}",
               "--prometheus-listen", f"{self.host}:{self.prom}",
               "--cluster-name", self.cluster, "--node-name", f"warren@{self.cluster}",
               *self.extra]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, NO_COLOR="1")
        for k in ("WARREN_CONFIG", "WARREN_DATA_DIR", "WARREN_AMQP_LISTEN"):
            env.pop(k, None)
        self.log = open(self.log_path(), "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"warren {self.name} exited at start:\n{self.tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"warren {self.name} did not listen on {self.port}:\n{self.tail()}")

    def tail(self, n=40):
        try:
            with open(self.log_path()) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM):
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"warren {self.name} did not stop on {sig!r}:\n{self.tail()}")
        if sig == signal.SIGTERM:
            assert code == 0, f"warren {self.name} exited with {code} on SIGTERM:\n{self.tail()}"
        self.proc = None
        self.log.close()

    def restart(self, sig=signal.SIGTERM, pause=0.5):
        self.stop(sig)
        time.sleep(pause)
        self.start()

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Reference:
    """The reference RabbitMQ of scripts/rabbitmq-ref.sh (already started by the caller)."""

    def __init__(self):
        self.url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5673/%2f")
        self.api = Api(os.environ.get("RABBITMQ_MGMT_URL", "http://127.0.0.1:15673"))
        try:
            self.overview = self.api.get("/overview")
        except OSError as e:
            raise AssertionError(f"the reference RabbitMQ is not reachable ({self.api.base}): {e}")
        plugins = {x.get("name") for x in self.overview.get("exchange_types", [])}
        if "x-federation-upstream" not in plugins:
            raise AssertionError("the reference RabbitMQ lacks the federation plugin "
                                 "(scripts/rabbitmq-ref.sh enables rabbitmq_federation)")
        self.cluster = self.api.get("/cluster-name")["name"]
        parsed = urllib.parse.urlparse(self.url)
        self.port = parsed.port

    def ctl(self, *args):
        return subprocess.run([REF, *args], check=True, capture_output=True, text=True).stdout

    def stop(self, kill=False):
        if kill:
            base = os.environ.get("WARREN_REF_DIR", os.path.join(tempfile.gettempdir(), "warren-rabbitmq-ref"))
            with open(os.path.join(base, "rabbitmq.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGKILL)
            while True:
                try:
                    os.kill(pid, 0)
                    time.sleep(0.1)
                except ProcessLookupError:
                    break
        else:
            self.ctl("stop")

    def start(self):
        self.ctl("start")
