#!/usr/bin/env python3
"""A deep replicated queue (a benchmark, not run by scripts/test.sh).

Starts a 3-node Warren cluster on loopback (tests/cluster/differential.py's WarrenCluster),
then PerfTest on node 1 publishes --messages persistent --size-byte messages with confirms
(100 outstanding) and no consumer to a quorum queue (3 replicas), so the queue only grows.
Prints the time, the rate (launch of PerfTest included) and each node's peak RSS and data
directory size. What it shows: how adding to a backlog slows down as the queue grows (every
snapshot encodes every waiting message) and the memory a deep queue costs.

  .deps/venv/bin/python tests/cluster/backlog.py --warren-bin "$CARGO_TARGET_DIR/release/warren-broker"

PerfTest comes from scripts/deps.sh (~/.cache/warren/perf-test-*/).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import differential as d  # noqa: E402


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(d.ROOT, "target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warren-bin", default=os.path.join(target, "release", "warren-broker"))
    ap.add_argument("--messages", type=int, default=200000)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    jars = sorted(glob.glob(os.path.join(cache, "warren", "perf-test-*", "perf-test-*-with-dependencies.jar")))
    if not jars:
        sys.exit("PerfTest not found under %s/warren: run scripts/deps.sh" % cache)
    work = tempfile.mkdtemp(prefix="warren-backlog-")
    cluster = d.WarrenCluster(args.warren_bin, work)
    try:
        cluster.start()
        if len(cluster.wait_all_running([0, 1, 2], 60, time.monotonic())) != 3:
            sys.exit("the cluster did not form within 60 s (logs in %s)" % work)
        time.sleep(2)
        url = "amqp://guest:guest@127.0.0.1:%d/%%2f" % cluster.amqp[0]
        t0 = time.monotonic()
        run = subprocess.run(
            ["java", "-jar", jars[-1], "-h", url, "-x", "1", "-y", "0", "-C", str(args.messages),
             "-s", str(args.size), "-c", "100", "-f", "persistent", "-u", "backlog", "-ad", "false",
             "--queue-args", "x-queue-type=quorum", "-z", "900", "-i", "5"],
            capture_output=True, text=True)
        took = time.monotonic() - t0
        if run.returncode != 0:
            sys.exit("PerfTest failed:\n" + run.stdout[-2000:] + run.stderr[-2000:])
        for line in run.stdout.splitlines():
            if "sent:" in line:
                print("  " + line.strip()[:160])
        print("published %d messages of %d B in %.1f s: %.0f msg/s (PerfTest's start included)"
              % (args.messages, args.size, took, args.messages / took))
        for i, proc in enumerate(cluster.procs):
            with open("/proc/%d/status" % proc.pid) as f:
                hwm = [line.split()[1] for line in f if line.startswith("VmHWM")][0]
            du = subprocess.run(["du", "-sm", os.path.join(work, "data%d" % (i + 1))],
                                capture_output=True, text=True).stdout.split()[0]
            print("node %d: peak RSS %d MiB, data dir %s MiB" % (i + 1, int(hwm) // 1024, du))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
