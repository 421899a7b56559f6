"""The link between two data centres cut and restored (run by tests/links/netns.sh, as root).

dc1 runs a shovel (its queue `src` → dc2's `dst`, on-confirm) and a federated exchange
(dc1's `fx` from dc2's). The cut is iptables DROP inside dc1 for dc2's address: packets
vanish, no RST, as when a WAN link fails; the links find out from missed heartbeats.
"""

import os
import subprocess
import threading
import time
import urllib.request

import pika

from linkkit import Amqp, Warren, wait_for

N = 3000


def iptables(ns, action, peer):
    for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
        subprocess.run(["ip", "netns", "exec", ns, "iptables", action, chain, flag, peer, "-j", "DROP"],
                       check=True)


def test_links_report_the_cut_reconnect_and_lose_nothing():
    ns1, ns2 = os.environ["NETNS_DC1"], os.environ["NETNS_DC2"]
    ip1, ip2 = os.environ["DC1_IP"], os.environ["DC2_IP"]
    creds = {"user": "links", "password": "links-secret"}
    dc1 = Warren("dc1", netns=ns1, host=ip1, **creds)
    dc2 = Warren("dc2", netns=ns2, host=ip2, **creds)
    cut = False
    try:
        peer = f"amqp://links:links-secret@{ip2}:{dc2.port}/%2f?heartbeat=2&connection_timeout=3000"
        a, b = Amqp(dc1.url), Amqp(dc2.url)
        a.ch.queue_declare("src", durable=True)
        a.ch.exchange_declare("fx", "topic", durable=True)
        a.ch.queue_declare("fq")
        a.ch.queue_bind("fq", "fx", "#")
        dc1.api.param("shovel", "cross", {
            "src-uri": "amqp://", "src-queue": "src", "dest-uri": peer, "dest-queue": "dst",
            "ack-mode": "on-confirm", "src-prefetch-count": 100, "reconnect-delay": 1})
        dc1.api.param("federation-upstream", "dc2", {"uri": peer, "reconnect-delay": 1})
        dc1.api.policy("fed", "^fx$", {"federation-upstream": "dc2"}, apply_to="exchanges")
        wait_for("the links", lambda: dc1.api.shovel("cross")["state"] == "running"
                 and [l["status"] for l in dc1.api.federation_links("fx")] == ["running"], 30)

        # A publisher on dc1 that keeps going through the cut.
        def publish():
            c = pika.BlockingConnection(pika.URLParameters(dc1.url))
            ch = c.channel()
            ch.confirm_delivery()
            for i in range(N):
                ch.basic_publish("", "src", f"m{i:06}".encode(), pika.BasicProperties(delivery_mode=2))
                time.sleep(0.002)
            c.close()

        t = threading.Thread(target=publish)
        t.start()
        wait_for("the shovel to move some", lambda: b.count("dst") >= 300, 30)
        iptables(ns1, "-I", ip2)
        cut = True
        started = time.time()
        st = wait_for("the shovel to report the cut",
                      lambda: (s := dc1.api.shovel("cross"))["state"] == "terminated" and s, 30)
        fl = wait_for("the federation link to report the cut",
                      lambda: (l := dc1.api.federation_links("fx")) and l[0]["status"] == "error" and l[0], 30)
        print(f"cut noticed after {time.time() - started:.1f}s: shovel {st['reason']!r}, "
              f"federation {fl['error']!r}")
        # While cut, the links alternate between failed and (re)starting; never running.
        metrics = urllib.request.urlopen(f"http://{ip1}:{dc1.prom}/metrics", timeout=5).read().decode()
        assert 'warren_shovel_state{vhost="/",shovel="cross",state="running"} 0' in metrics
        assert ('warren_federation_link_state{vhost="/",upstream="dc2",type="exchange",name="fx",'
                'state="running"} 0') in metrics
        time.sleep(3)  # still cut while the publisher goes on
        iptables(ns1, "-D", ip2)
        cut = False
        wait_for("the links to come back", lambda: dc1.api.shovel("cross")["state"] == "running"
                 and [l["status"] for l in dc1.api.federation_links("fx")] == ["running"], 60)
        t.join()
        wait_for("everything moved", lambda: a.count("src") == 0
                 and dc1.api.shovel("cross")["pending"] == 0 and b.count("dst") >= N, 120)
        time.sleep(1)
        got = {}
        for body, _ in b.drain("dst"):
            got[body] = got.get(body, 0) + 1
        lost = [i for i in range(N) if f"m{i:06}" not in got]
        assert not lost, f"{len(lost)} messages lost in on-confirm mode, e.g. {lost[:5]}"
        dups = sum(c - 1 for c in got.values())
        # Confirms dropped with the link are redelivered: at most the in-flight window.
        assert dups <= 100, f"{dups} duplicates"
        print(f"after the cut: {N} messages, none lost, {dups} sent twice (confirms lost in the cut)")
        # The federated exchange works again.
        b.ch.basic_publish("fx", "after.cut", b"federated")
        wait_for("a federated message", lambda: a.count("fq") == 1, 30)
    finally:
        if cut:
            iptables(ns1, "-D", ip2)
        dc1.close()
        dc2.close()
