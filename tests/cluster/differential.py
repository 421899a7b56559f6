#!/usr/bin/env python3
"""Cluster membership as a client sees it: a 3-node Warren cluster vs a 3-node RabbitMQ cluster.

Warren: three `warren-broker` processes on loopback (free ports, a shared secret, a temp data
dir each), started by this script. RabbitMQ: scripts/rabbitmq-cluster.sh (three private Debian
RabbitMQ 3.10 nodes joined with `rabbitmqctl join_cluster`), reset and started by this script
unless --rabbitmq-running.

Checked on both, through the management HTTP API only:

  1. start: every node's /api/nodes lists the 3 nodes, all `running: true`, with the same
     `type`; the time from launch until that holds on every node is printed for both.
  2. /api/overview on every node lists a `clustering` listener of that node.
  3. node 3 stopped (Warren: SIGTERM; RabbitMQ: its Erlang VM stopped with
     `rabbitmqctl stop`): nodes 1 and 2 list it with `running: false` within --detect-bound
     seconds (each node's time is printed).
  4. node 3 started again: every node lists all 3 running within --rejoin-bound seconds.
  5. definitions are the cluster's: a vhost created on node 1 while node 3 was stopped is on
     node 3 once it is back; a vhost, a user, its permissions and a policy created on
     different nodes are listed by every node (time printed); deleting the user on one
     node removes it everywhere. Status codes compared.
  6. queues across nodes: a durable queue declared (PUT) through node 1 lives on node 1 as
     every node's /api/queues says; a message published through node 2's management API
     reaches it and is read (POST /get) through node 3; purge through node 2; delete through
     node 3, then 404 on every node. Status codes, `node`, counts and payloads compared.

--bench-queues N (not run by scripts/test.sh): declares N durable queues and binds each to
amq.direct over one AMQP connection (pika) per cluster, to node 2, on both clusters in the
same run (each declare and bind is committed cluster-wide before its -ok on both), and
prints each one's time, rate and the ratio; the queues are deleted afterwards.

Every other difference a client could see (keys present on one side only, order of the
list, listeners of other nodes in /api/overview, the stopped node's entry) is printed as
INFO and does not fail the run. Exit 0: no mismatch of the checked facts; 1: a mismatch or a
bound exceeded; 2: a cluster could not be started.

Standard library only (urllib), so it runs with any python3.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from freeport import free_port  # noqa: E402
POLL = 0.2

failures = []
infos = []


def log(msg):
    print(msg, flush=True)


def fail(msg):
    failures.append(msg)
    log("FAIL  " + msg)


def info(msg):
    infos.append(msg)
    log("INFO  " + msg)


def ok(msg):
    log("ok    " + msg)


def get_json(base, path, timeout=3.0):
    req = urllib.request.Request(base + path)
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def send(base, method, path, body=None, timeout=10.0):
    """The status code of a management API request (errors included)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_status(base, path, want, bound):
    """Seconds until GET path answers `want`, or None if not within `bound`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if send(base, "GET", path) == want:
            return time.monotonic() - t0
        time.sleep(POLL)
    return None


def check_definitions(w, r, bound):
    """Fact 5 (all nodes running): changes on one node, visible on every node."""
    steps = [
        (0, "PUT", "/api/vhosts/diff-orders", {}),
        (1, "PUT", "/api/users/diff-alice", {"password": "pw", "tags": "management"}),
        (2, "PUT", "/api/permissions/diff-orders/diff-alice", {"configure": ".*", "write": ".*", "read": ".*"}),
        (0, "PUT", "/api/policies/diff-orders/diff-ttl",
         {"pattern": "^q", "definition": {"message-ttl": 60000}, "apply-to": "queues"}),
    ]
    for i, method, path, body in steps:
        cw, cr = send(w.mgmt[i], method, path, body), send(r.mgmt[i], method, path, body)
        if cw == cr:
            ok("%s %s on node%d: %d on both" % (method, path, i + 1, cw))
        else:
            fail("%s %s on node%d: warren %d, rabbitmq %d" % (method, path, i + 1, cw, cr))
    for path in ("/api/vhosts/diff-orders", "/api/users/diff-alice",
                 "/api/permissions/diff-orders/diff-alice", "/api/policies/diff-orders/diff-ttl"):
        for c in (w, r):
            seen = [wait_status(c.mgmt[i], path, 200, bound) for i in range(3)]
            if None in seen:
                fail("%s: %s not on every node within %.0f s (%s)" % (c.label, path, bound, seen))
            else:
                log("%-8s %s on every node after %.2f s" % (c.label + ":", path, max(seen)))
    cw = send(w.mgmt[1], "DELETE", "/api/users/diff-alice")
    cr = send(r.mgmt[1], "DELETE", "/api/users/diff-alice")
    if cw != cr:
        fail("DELETE /api/users/diff-alice on node2: warren %d, rabbitmq %d" % (cw, cr))
    for c in (w, r):
        seen = [wait_status(c.mgmt[i], "/api/users/diff-alice", 404, bound) for i in range(3)]
        if None in seen:
            fail("%s: deleted user still on some node after %.0f s (%s)" % (c.label, bound, seen))
        else:
            ok("%s: deleted user gone from every node after %.2f s" % (c.label, max(seen)))


def try_nodes(base):
    try:
        return get_json(base, "/api/nodes")
    except (urllib.error.URLError, OSError, ValueError):
        return None


class Cluster:
    """Three nodes: names[i], mgmt[i] (base URL); subclasses start/stop node i (0-based)."""

    label = "?"

    def running_view(self, i):
        """{name: running} as node i lists them, or None if its API does not answer."""
        nodes = try_nodes(self.mgmt[i])
        if nodes is None:
            return None
        return {n.get("name"): n.get("running") for n in nodes}

    def wait_all_running(self, on, bound, t0):
        """Poll nodes `on` until each lists exactly the 3 names, all running. Returns
        {i: seconds since t0} for the nodes that got there within `bound`."""
        want = {n: True for n in self.names}
        done = {}
        while time.monotonic() - t0 < bound and len(done) < len(on):
            for i in on:
                if i not in done and self.running_view(i) == want:
                    done[i] = time.monotonic() - t0
            time.sleep(POLL)
        return done

    def wait_down(self, on, victim, bound, t0):
        done = {}
        while time.monotonic() - t0 < bound and len(done) < len(on):
            for i in on:
                if i in done:
                    continue
                view = self.running_view(i)
                if view is not None and view.get(self.names[victim]) is False:
                    done[i] = time.monotonic() - t0
            time.sleep(POLL)
        return done


class WarrenCluster(Cluster):
    label = "warren"

    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = workdir
        self.names = ["warren%d@localhost" % (i + 1) for i in range(3)]
        self.amqp = [free_port() for _ in range(3)]
        self.mgmt_ports = [free_port() for _ in range(3)]
        self.cluster_ports = [free_port() for _ in range(3)]
        self.mgmt = ["http://127.0.0.1:%d" % p for p in self.mgmt_ports]
        self.procs = [None, None, None]
        self.secret = os.path.join(workdir, "cluster-secret")
        with open(self.secret, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        os.chmod(self.secret, 0o600)

    def cmd(self, i):
        peers = ",".join("127.0.0.1:%d" % p for p in self.cluster_ports)
        return [
            self.binary,
            "--node-name", self.names[i],
            "--amqp-listen", "127.0.0.1:%d" % self.amqp[i],
            "--management-listen", "127.0.0.1:%d" % self.mgmt_ports[i],
            "--prometheus-listen", "none",
            "--cluster-listen", "127.0.0.1:%d" % self.cluster_ports[i],
            "--cluster-advertise", "127.0.0.1:%d" % self.cluster_ports[i],
            "--cluster-peers", peers,
            "--cluster-secret-file", self.secret,
            "--data-dir", os.path.join(self.workdir, "data%d" % (i + 1)),
            "--default-user", "guest", "--default-pass", "guest",
            "--log-level", "info",
        ]

    def start_node(self, i):
        env = dict(os.environ, NO_COLOR="1")
        for k in ("WARREN_CONFIG", "WARREN_DATA_DIR", "WARREN_AMQP_LISTEN"):
            env.pop(k, None)
        logf = open(os.path.join(self.workdir, "warren%d.log" % (i + 1)), "ab")
        self.procs[i] = subprocess.Popen(self.cmd(i), stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()

    def stop_node(self, i):
        p = self.procs[i]
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)

    def wait_exit(self, i, timeout=15):
        p = self.procs[i]
        if p is None:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def start(self):
        for i in range(3):
            self.start_node(i)

    def stop(self):
        for i in range(3):
            self.stop_node(i)
        for i in range(3):
            self.wait_exit(i)

    def dead(self):
        return [i for i in range(3) if self.procs[i] is not None and self.procs[i].poll() is not None]

    def log_tails(self):
        for i in range(3):
            path = os.path.join(self.workdir, "warren%d.log" % (i + 1))
            try:
                with open(path, errors="replace") as f:
                    lines = f.readlines()[-25:]
            except OSError:
                continue
            log("---- tail of %s ----" % path)
            sys.stdout.write("".join(lines))


class RabbitCluster(Cluster):
    label = "rabbitmq"

    def __init__(self, script):
        self.script = script
        out = subprocess.run([script, "urls"], check=True, capture_output=True, text=True).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        self.names = [r[1] for r in rows]
        self.mgmt = [r[3] for r in rows]
        self.amqp = [r[2] for r in rows]
        self.stopper = None

    def run(self, *args, check=True):
        log("+ %s %s" % (os.path.relpath(self.script, ROOT), " ".join(args)))
        return subprocess.run([self.script] + list(args), check=check)

    def start_node(self, i):
        return subprocess.Popen([self.script, "start-node", str(i + 1)])

    def stop_node(self, i):
        return subprocess.Popen([self.script, "stop-node", str(i + 1)])


def idx_name(cluster, name):
    """node name -> 'node N' so both clusters' listings compare."""
    try:
        return "node%d" % (cluster.names.index(name) + 1)
    except ValueError:
        return "unknown:" + str(name)


def check_listing(w, r, report_info=True):
    """Fact 1 (and, if report_info, INFO differences) on every node of both clusters."""
    keys_w, keys_r = {}, {}
    for i in range(3):
        lw, lr = get_json(w.mgmt[i], "/api/nodes"), get_json(r.mgmt[i], "/api/nodes")
        fw = sorted((idx_name(w, n.get("name")), n.get("running"), n.get("type")) for n in lw)
        fr = sorted((idx_name(r, n.get("name")), n.get("running"), n.get("type")) for n in lr)
        if fw == fr and len(fw) == 3 and all(x[1] is True for x in fw):
            ok("node%d: /api/nodes lists %s (name, running, type) on both" % (i + 1, fw))
        else:
            fail("node%d: /api/nodes (name, running, type): warren %s, rabbitmq %s" % (i + 1, fw, fr))
        ow = [idx_name(w, n.get("name")) for n in lw]
        orr = [idx_name(r, n.get("name")) for n in lr]
        if ow != orr and report_info:
            info("node%d: order of /api/nodes: warren %s, rabbitmq %s" % (i + 1, ow, orr))
        for n in lw:
            keys_w.setdefault(idx_name(w, n.get("name")) == "node%d" % (i + 1), set()).update(n.keys())
        for n in lr:
            keys_r.setdefault(idx_name(r, n.get("name")) == "node%d" % (i + 1), set()).update(n.keys())
    if not report_info:
        return
    for own, what in ((True, "the answering node's own entry"), (False, "other members' entries")):
        only_r = sorted(keys_r.get(own, set()) - keys_w.get(own, set()))
        only_w = sorted(keys_w.get(own, set()) - keys_r.get(own, set()))
        if only_r:
            info("/api/nodes, %s: keys only RabbitMQ has (%d): %s" % (what, len(only_r), " ".join(only_r)))
        if only_w:
            info("/api/nodes, %s: keys only Warren has: %s" % (what, " ".join(only_w)))


def check_overview(w, r):
    """Fact 2 on every node, and INFO on the listener lists."""
    for i in range(3):
        ov = {"warren": get_json(w.mgmt[i], "/api/overview"), "rabbitmq": get_json(r.mgmt[i], "/api/overview")}
        for label, c in (("warren", w), ("rabbitmq", r)):
            ls = ov[label].get("listeners", [])
            mine = [x for x in ls if x.get("protocol") == "clustering" and x.get("node") == c.names[i]]
            if mine:
                ok("node%d %s: /api/overview lists its clustering listener (port %s, ip %s)"
                   % (i + 1, label, mine[0].get("port"), mine[0].get("ip_address")))
            else:
                fail("node%d %s: /api/overview has no clustering listener of %s: %s"
                     % (i + 1, label, c.names[i], ls))
        lw = sorted({(idx_name(w, x.get("node")), x.get("protocol")) for x in ov["warren"].get("listeners", [])})
        lr = sorted({(idx_name(r, x.get("node")), x.get("protocol")) for x in ov["rabbitmq"].get("listeners", [])})
        if i == 0 and lw != lr:
            info("node1: /api/overview listeners (node, protocol): warren %s; rabbitmq %s "
                 "(RabbitMQ lists every running member's listeners, Warren its own)" % (lw, lr))
        if i == 0:
            kw = set(ov["warren"].get("listeners", [{}])[0].keys())
            kr = set(ov["rabbitmq"].get("listeners", [{}])[0].keys())
            if kw != kr:
                info("/api/overview listener keys: only RabbitMQ %s, only Warren %s"
                     % (sorted(kr - kw), sorted(kw - kr)))


def check_queues(w, r, bound):
    """Fact 6 (all nodes running): a queue on node 1, used through nodes 2 and 3."""
    log("== queues: declared through node1, published through node2, read through node3")
    path = "/api/queues/%2f/diff-q"
    compare("PUT %s on node1" % path,
            send(w.mgmt[0], "PUT", path, {"durable": True, "arguments": {}}),
            send(r.mgmt[0], "PUT", path, {"durable": True, "arguments": {}}))
    body = {"properties": {"delivery_mode": 2}, "routing_key": "diff-q", "payload": "across",
            "payload_encoding": "string"}
    compare("publish through node2: answer",
            post_json(w.mgmt[1], "/api/exchanges/%2f/amq.default/publish", body),
            post_json(r.mgmt[1], "/api/exchanges/%2f/amq.default/publish", body))
    # Every node lists the queue on node 1 (RabbitMQ's counts lag by its stats interval).
    for i in range(3):
        seen = {}
        for c in (w, r):
            t0 = time.monotonic()
            q = None
            while time.monotonic() - t0 < bound:
                lst = get_json(c.mgmt[i], "/api/queues/%2f")
                q = next((x for x in lst if x.get("name") == "diff-q"), None)
                if q and q.get("messages") == 1:
                    break
                time.sleep(POLL)
            seen[c.label] = (idx_name(c, q.get("node")) if q else None,
                             q.get("messages") if q else None)
        compare("node%d lists diff-q (node, messages)" % (i + 1), seen["warren"], seen["rabbitmq"])
    got = {}
    for c in (w, r):
        msgs = post_json(c.mgmt[2], "/api/queues/%2f/diff-q/get",
                         {"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"})
        got[c.label] = [m.get("payload") for m in msgs] if isinstance(msgs, list) else msgs
    compare("POST /get through node3", got["warren"], got["rabbitmq"])
    for what, node, p in (("purge", 1, path + "/contents"), ("delete", 2, path)):
        compare("%s through node%d" % (what, node + 1),
                send(w.mgmt[node], "DELETE", p), send(r.mgmt[node], "DELETE", p))
    for i in range(3):
        compare("GET %s on node%d after the delete" % (path, i + 1),
                send(w.mgmt[i], "GET", path), send(r.mgmt[i], "GET", path))


def compare(what, wv, rv):
    if wv == rv:
        ok("%s: %r on both" % (what, wv))
    else:
        fail("%s: warren %r, rabbitmq %r" % (what, wv, rv))


def post_json(base, path, body, timeout=10.0):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code


def bench_queues(url, n):
    """Seconds to declare n durable queues and bind each to amq.direct, one connection."""
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    names = ["bench-q-%05d" % i for i in range(n)]
    t0 = time.monotonic()
    for q in names:
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, "amq.direct", routing_key=q)
    took = time.monotonic() - t0
    for q in names:
        ch.queue_delete(q)
    conn.close()
    return took


def fmt_times(done, on):
    return ", ".join("node%d %s" % (i + 1, ("%.1f s" % done[i]) if i in done else "NOT SEEN") for i in on)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--warren-bin", default=os.path.join(target, "debug", "warren-broker"))
    ap.add_argument("--rabbitmq-script", default=os.path.join(ROOT, "scripts", "rabbitmq-cluster.sh"))
    ap.add_argument("--rabbitmq-running", action="store_true",
                    help="use the running RabbitMQ cluster as is (no reset/start; its start is not timed)")
    ap.add_argument("--keep-rabbitmq", action="store_true", help="leave the RabbitMQ cluster running")
    ap.add_argument("--start-bound", type=float, default=120.0, help="seconds for a cluster to form")
    ap.add_argument("--detect-bound", type=float, default=30.0,
                    help="seconds for the others to list a stopped node as not running")
    ap.add_argument("--rejoin-bound", type=float, default=60.0,
                    help="seconds for all to list a restarted node as running")
    ap.add_argument("--bench-queues", type=int, default=0, metavar="N",
                    help="also time declare+bind of N durable queues on both (not a test)")
    ap.add_argument("--workdir", help="Warren data dirs and logs (default: a temp dir, removed on success)")
    args = ap.parse_args()
    # SIGTERM (e.g. scripts/test.sh interrupted) runs the finally below: no Warren left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not os.access(args.warren_bin, os.X_OK):
        log("ERROR: no warren-broker at %s (cargo build -p warren-broker; CARGO_TARGET_DIR)" % args.warren_bin)
        return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="warren-cluster-diff.")
    os.makedirs(workdir, exist_ok=True)
    # A private copy of the binary: a rebuild in a shared target dir during the run must not
    # give the restarted node another version than the others (seen: "undecodable frame").
    binary = os.path.join(workdir, "warren-broker")
    shutil.copy2(args.warren_bin, binary)
    w = WarrenCluster(binary, workdir)
    r = RabbitCluster(args.rabbitmq_script)
    started_rabbit = False
    times = {}
    try:
        # ---- 1. start both, timed
        log("== start: Warren (3 processes) and RabbitMQ (%s)" % ("running already" if args.rabbitmq_running
                                                                 else "reset, start, join_cluster"))
        t0 = time.monotonic()
        w.start()
        done = w.wait_all_running(range(3), args.start_bound, t0)
        if len(done) < 3 or w.dead():
            fail("warren: cluster did not form within %.0f s (%s)" % (args.start_bound, fmt_times(done, range(3))))
            w.log_tails()
            return 2
        times["warren start"] = max(done.values())
        log("warren: all 3 list all 3 running after %.1f s (%s)" % (times["warren start"], fmt_times(done, range(3))))
        if not args.rabbitmq_running:
            r.run("reset")
            t0 = time.monotonic()
            started_rabbit = True
            res = r.run("start", check=False)
            if res.returncode != 0:
                fail("rabbitmq: scripts/rabbitmq-cluster.sh start failed (exit %d)" % res.returncode)
                return 2
        else:
            t0 = time.monotonic()
        done = r.wait_all_running(range(3), args.start_bound, t0)
        if len(done) < 3:
            fail("rabbitmq: cluster not formed (%s)" % fmt_times(done, range(3)))
            return 2
        if not args.rabbitmq_running:
            times["rabbitmq start"] = max(done.values())
            log("rabbitmq: all 3 list all 3 running after %.1f s (reset excluded)" % times["rabbitmq start"])

        # ---- facts 1 and 2
        log("== /api/nodes and /api/overview with all running")
        check_listing(w, r)
        check_overview(w, r)

        # ---- 3. stop node 3 of each
        victim, others = 2, [0, 1]
        log("== stop node3 (warren: SIGTERM; rabbitmq: rabbitmqctl stop, the whole VM)")
        t0 = time.monotonic()
        w.stop_node(victim)
        dw = w.wait_down(others, victim, args.detect_bound, t0)
        w.wait_exit(victim)
        t0 = time.monotonic()
        stopper = r.stop_node(victim)
        dr = r.wait_down(others, victim, args.detect_bound, t0)
        stopper.wait()
        stop_cmd = time.monotonic() - t0
        log("warren:   node3 listed running=false by %s" % fmt_times(dw, others))
        log("rabbitmq: node3 listed running=false by %s (the stop command returned after %.1f s)"
            % (fmt_times(dr, others), stop_cmd))
        for label, d in (("warren", dw), ("rabbitmq", dr)):
            if len(d) < len(others):
                fail("%s: stopped node3 not listed as running=false by every other node within %.0f s (%s)"
                     % (label, args.detect_bound, fmt_times(d, others)))
        if dw:
            times["warren detect"] = max(dw.values())
        if dr:
            times["rabbitmq detect"] = max(dr.values())
        # What the survivors list, and the stopped node's entry.
        for i in others:
            lw, lr = get_json(w.mgmt[i], "/api/nodes"), get_json(r.mgmt[i], "/api/nodes")
            fw = sorted((idx_name(w, n.get("name")), n.get("running"), n.get("type")) for n in lw)
            fr = sorted((idx_name(r, n.get("name")), n.get("running"), n.get("type")) for n in lr)
            if fw == fr:
                ok("node%d: /api/nodes with node3 stopped: %s on both" % (i + 1, fw))
            else:
                fail("node%d: /api/nodes with node3 stopped: warren %s, rabbitmq %s" % (i + 1, fw, fr))
            if i == others[0]:
                ew = [n for n in lw if n.get("name") == w.names[victim]]
                er = [n for n in lr if n.get("name") == r.names[victim]]
                if ew and er and set(ew[0]) != set(er[0]):
                    info("the stopped node's entry: warren keys %s, rabbitmq keys %s"
                         % (sorted(ew[0]), sorted(er[0])))

        # ---- 5a. a definition made while node 3 is down
        cw = send(w.mgmt[0], "PUT", "/api/vhosts/diff-while-down", {})
        cr = send(r.mgmt[0], "PUT", "/api/vhosts/diff-while-down", {})
        if cw == cr:
            ok("PUT /api/vhosts/diff-while-down on node1 with node3 stopped: %d on both" % cw)
        else:
            fail("PUT /api/vhosts/diff-while-down with node3 stopped: warren %d, rabbitmq %d" % (cw, cr))

        # ---- 4. start node 3 again
        log("== start node3 again")
        t0 = time.monotonic()
        w.start_node(victim)
        jw = w.wait_all_running(range(3), args.rejoin_bound, t0)
        t0 = time.monotonic()
        starter = r.start_node(victim)
        jr = r.wait_all_running(range(3), args.rejoin_bound, t0)
        starter.wait()
        log("warren:   all 3 running again, as listed by %s" % fmt_times(jw, range(3)))
        log("rabbitmq: all 3 running again, as listed by %s" % fmt_times(jr, range(3)))
        for label, d in (("warren", jw), ("rabbitmq", jr)):
            if len(d) < 3:
                fail("%s: not every node lists all 3 running within %.0f s of node3's restart (%s)"
                     % (label, args.rejoin_bound, fmt_times(d, range(3))))
        if len(jw) == 3:
            times["warren rejoin"] = max(jw.values())
        if len(jr) == 3:
            times["rabbitmq rejoin"] = max(jr.values())
        if len(jw) == 3 and len(jr) == 3:
            check_listing(w, r, report_info=False)
            # ---- 5. definitions
            log("== definitions: made on one node, on every node")
            for c in (w, r):
                t = wait_status(c.mgmt[victim], "/api/vhosts/diff-while-down", 200, args.rejoin_bound)
                if t is None:
                    fail("%s: node3 does not have the vhost made while it was down" % c.label)
                else:
                    ok("%s: node3 has the vhost made while it was down (%.2f s after it listed all running)"
                       % (c.label, t))
            check_definitions(w, r, args.detect_bound)
            check_queues(w, r, args.rejoin_bound)
            if args.bench_queues:
                n = args.bench_queues
                log("== benchmark: declare + bind %d durable queues through node2, one connection" % n)
                tw = bench_queues("amqp://guest:guest@127.0.0.1:%d/%%2f" % w.amqp[1], n)
                tr = bench_queues(r.amqp[1], n)
                log("warren:   %.2f s, %.0f queues/s" % (tw, n / tw))
                log("rabbitmq: %.2f s, %.0f queues/s" % (tr, n / tr))
                log("ratio (warren rate / rabbitmq rate): %.2fx" % (tr / tw))
    except (urllib.error.URLError, OSError) as e:
        fail("HTTP/process error: %r" % (e,))
    finally:
        w.stop()
        if started_rabbit and not args.keep_rabbitmq:
            r.run("stop", check=False)
        if failures:
            w.log_tails()
        try:
            os.unlink(binary)
        except OSError:
            pass

    log("")
    log("times (s):   %-10s %-10s" % ("warren", "rabbitmq"))
    for what in ("start", "detect", "rejoin"):
        tw, tr = times.get("warren " + what), times.get("rabbitmq " + what)
        log("  %-9s %-10s %-10s" % (what, "%.1f" % tw if tw is not None else "-",
                                     "%.1f" % tr if tr is not None else "-"))
    log("cluster differential: %d INFO difference(s), %d failure(s)" % (len(infos), len(failures)))
    if failures:
        log("Warren logs kept in %s" % workdir)
        return 1
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
