#!/usr/bin/env python3
"""Charts and a markdown report from one scripts/bench.sh run.

    python scripts/bench_report.py bench-results/<stamp> [--publish DIR]

Reads what bench.sh left in the run's directory: `meta.json` (mode, command, git revision,
host), and per broker and message size PerfTest's output `perftest-<broker>-<size>.txt`
(its summary lines) and `perftest-<broker>-<size>.csv` (one line per second). Writes, into
the same directory:

* `throughput.png` / `.svg`: receive rate per message size, Warren beside RabbitMQ, with the
  ratio over each pair;
* `latency.png` / `.svg`: latency percentiles (min, median, 75th, 95th, 99th) per broker and
  size, log scale (confirm latency when publishers wait for confirms, else consumer latency);
* `timeline.png` / `.svg`: the receive rate of every second of every case;
* `report.md`: the command, revision and machine, the tables, and the charts.

Every chart carries the command, revision and machine in its footer. `--publish DIR` also
copies the report and the PNG charts to DIR (the README shows docs/bench/<mode>/).
Exits 2 with a message when the directory holds no PerfTest output it can read.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

PERCENTILES = ("min", "median", "75th", "95th", "99th")
COLORS = {"warren": "#2b7bba", "rabbitmq": "#f28e2b"}
NAMES = {"warren": "Warren", "rabbitmq": "RabbitMQ"}


class ReportError(Exception):
    """The run's directory cannot be reported on (said to the user, exit 2)."""


@dataclass
class Case:
    broker: str
    size: int
    sent: float | None
    received: float
    # Percentiles in microseconds, in PERCENTILES order.
    latency: list[float]
    latency_kind: str
    # (second, receive rate) per line of PerfTest's CSV.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    # The broker's peak resident memory in KiB (bench.sh samples it each second), if known.
    peak_rss_kib: int | None = None


SUMMARY_RATE = re.compile(r"(sending|receiving) rate avg: ([0-9.]+) msg/s")
SUMMARY_LATENCY = re.compile(
    r"(consumer|confirm) latency min/median/75th/95th/99th ([0-9./]+) (µs|us|ms)"
)


def parse_summary(text: str, want: str) -> tuple[float | None, float, list[float]]:
    """Sending rate, receiving rate and `want` ("consumer" or "confirm") latency in µs."""
    rates: dict[str, float] = {}
    latency: list[float] | None = None
    for line in text.splitlines():
        if m := SUMMARY_RATE.search(line):
            rates[m.group(1)] = float(m.group(2))
        m = SUMMARY_LATENCY.search(line)
        if m and m.group(1) == want:
            scale = 1000.0 if m.group(3) == "ms" else 1.0
            values = [float(v) * scale for v in m.group(2).split("/")]
            if len(values) != len(PERCENTILES):
                raise ReportError(f"expected {len(PERCENTILES)} latency figures in: {line.strip()}")
            latency = values
    if "receiving" not in rates:
        raise ReportError("no 'receiving rate avg' line (did PerfTest finish?)")
    if latency is None:
        raise ReportError(f"no '{want} latency min/median/75th/95th/99th' line")
    return rates.get("sending"), rates["receiving"], latency


def parse_timeline(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                out.append((float(row["time (s)"]), float(row["received (msg/s)"] or 0)))
            except (KeyError, ValueError):
                continue
    return out


def parse_rss(path: Path) -> int | None:
    if not path.exists():
        return None
    samples = [int(v) for v in path.read_text(encoding="utf-8").split() if v.isdigit()]
    return max(samples) if samples else None


def load(run: Path) -> tuple[dict, list[Case]]:
    if not run.is_dir():
        raise ReportError(f"{run} is not a directory")
    meta_path = run / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    mode = meta.get("mode", "transient")
    kind = "consumer" if mode == "transient" else "confirm"
    cases = []
    for txt in sorted(run.glob("perftest-*-*.txt")):
        m = re.fullmatch(r"perftest-([a-z]+)-([0-9]+)\.txt", txt.name)
        if not m:
            continue
        broker, size = m.group(1), int(m.group(2))
        try:
            sent, received, latency = parse_summary(txt.read_text(encoding="utf-8"), kind)
        except ReportError as e:
            raise ReportError(f"{txt}: {e}") from None
        timeline = parse_timeline(txt.with_suffix(".csv"))
        rss = parse_rss(run / f"rss-{broker}-{size}.txt")
        cases.append(Case(broker, size, sent, received, latency, kind, timeline, rss))
    if not cases:
        raise ReportError(f"no PerfTest output (perftest-<broker>-<size>.txt) in {run}")
    order = {"warren": 0, "rabbitmq": 1}
    cases.sort(key=lambda c: (c.size, order.get(c.broker, 2), c.broker))
    return meta, cases


def human_us(us: float) -> str:
    if us >= 1_000_000:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1e3:.1f} ms"
    return f"{us:.0f} µs"


def human_size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def ratios(cases: list[Case]) -> dict[int, tuple[float, float]]:
    """Per size with both brokers: (receive rate ratio, p99 latency ratio) Warren/RabbitMQ."""
    by = {(c.broker, c.size): c for c in cases}
    out = {}
    for size in sorted({c.size for c in cases}):
        w, r = by.get(("warren", size)), by.get(("rabbitmq", size))
        if w and r and r.received > 0 and r.latency[-1] > 0:
            out[size] = (w.received / r.received, w.latency[-1] / r.latency[-1])
    return out


def footer(meta: dict) -> str:
    return (
        f"{meta.get('command', 'scripts/bench.sh')}\n"
        f"git {meta.get('git', '?')} · {meta.get('host', '?')} · {meta.get('stamp', '')}"
    )


def charts(run: Path, meta: dict, cases: list[Case]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    brokers = [b for b in ("warren", "rabbitmq") if any(c.broker == b for c in cases)]
    brokers += sorted({c.broker for c in cases} - set(brokers))
    sizes = sorted({c.size for c in cases})
    by = {(c.broker, c.size): c for c in cases}
    mode = meta.get("mode", "transient")
    if meta.get("scenario", "1p1c") != "1p1c":
        mode += f", {meta['scenario']}"
    written = []

    def save(fig, name: str) -> None:
        fig.text(0.01, 0.01, footer(meta), fontsize=7, color="#555555", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        for ext in ("png", "svg"):
            fig.savefig(run / f"{name}.{ext}", dpi=120)
        plt.close(fig)
        written.append(f"{name}.png")

    width = 0.8 / max(len(brokers), 1)

    # Throughput: a group of bars per size.
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, b in enumerate(brokers):
        xs = [s + (i - (len(brokers) - 1) / 2) * width for s in range(len(sizes))]
        ys = [by[(b, size)].received if (b, size) in by else 0 for size in sizes]
        bars = ax.bar(xs, ys, width, label=NAMES.get(b, b), color=COLORS.get(b))
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=8, padding=2)
    for s, size in enumerate(sizes):
        if size in (r := ratios(cases)):
            top = max(by[(b, size)].received for b in brokers if (b, size) in by)
            ax.annotate(f"{r[size][0]:.2f}×", (s, top * 1.12), ha="center", fontweight="bold")
    ax.set_xticks(range(len(sizes)), [human_size(s) for s in sizes])
    ax.set_ylabel("messages received per second")
    ax.set_ylim(0, max(c.received for c in cases) * 1.3)
    ax.set_title(f"Throughput, {mode} (higher is better)")
    ax.legend()
    save(fig, "throughput")

    # Latency percentiles: one panel per size, log scale.
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(7, 5 * len(sizes)), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, b in enumerate(brokers):
            if (b, size) not in by:
                continue
            xs = [p + (i - (len(brokers) - 1) / 2) * width for p in range(len(PERCENTILES))]
            us = by[(b, size)].latency
            bars = ax.bar(xs, [v / 1000 for v in us], width, label=NAMES.get(b, b), color=COLORS.get(b))
            ax.bar_label(bars, labels=[human_us(v) for v in us], fontsize=6, padding=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(range(len(PERCENTILES)), PERCENTILES)
        ax.set_ylabel(f"{cases[0].latency_kind} latency (ms, log)")
        ax.set_title(f"{human_size(size)}: latency (lower is better)")
        ax.legend()
    save(fig, "latency")

    # Timeline: every second of every case.
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for c in cases:
        if not c.timeline:
            continue
        style = styles[sizes.index(c.size) % len(styles)]
        ax.plot(
            [t for t, _ in c.timeline],
            [r for _, r in c.timeline],
            style,
            color=COLORS.get(c.broker),
            label=f"{NAMES.get(c.broker, c.broker)}, {human_size(c.size)}",
        )
    ax.set_xlabel("seconds into the case")
    ax.set_ylabel("messages received per second")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Receive rate per second, {mode}")
    ax.legend(fontsize=8)
    save(fig, "timeline")
    return written


def markdown(meta: dict, cases: list[Case], images: list[str]) -> str:
    lines = [
        f"# Warren vs RabbitMQ — PerfTest, {meta.get('stamp', '')}",
        "",
        f"- command: `{meta.get('command', 'scripts/bench.sh')}`",
    ]
    if meta.get("load"):
        lines.append(f"- load: {meta['load']}")
    for key in ("tool", "reference"):
        if meta.get(key):
            lines.append(f"- {key}: {meta[key]}")
    lines.append(f"- host: {meta.get('host', '?')}; git {meta.get('git', '?')}")
    kind = cases[0].latency_kind
    lines += [
        "",
        f"| broker | size | send rate (msg/s) | receive rate (msg/s) | {kind} p50 | {kind} p99 "
        "| peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        sent = f"{c.sent:,.0f}" if c.sent is not None else "?"
        rss = f"{c.peak_rss_kib / 1024:.0f}" if c.peak_rss_kib else "?"
        lines.append(
            f"| {NAMES.get(c.broker, c.broker)} | {human_size(c.size)} | {sent} | "
            f"{c.received:,.0f} | {human_us(c.latency[1])} | {human_us(c.latency[4])} | {rss} |"
        )
    if r := ratios(cases):
        lines += [
            "",
            "| size | receive rate Warren/RabbitMQ (higher is better) | "
            "p99 latency Warren/RabbitMQ (lower is better) |",
            "|---:|---:|---:|",
        ]
        for size, (rate, p99) in r.items():
            lines.append(f"| {human_size(size)} | {rate:.2f}× | {p99:.2f} |")
    lines.append("")
    for img in images:
        lines.append(f"![{img.removesuffix('.png')}]({img})")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="a bench-results/<stamp> directory")
    p.add_argument("--publish", type=Path, help="also copy report.md and the PNGs here")
    args = p.parse_args(argv)
    try:
        meta, cases = load(args.run)
    except ReportError as e:
        print(f"bench_report: {e}", file=sys.stderr)
        return 2
    images = charts(args.run, meta, cases)
    report = args.run / "report.md"
    report.write_text(markdown(meta, cases, images), encoding="utf-8")
    print(f"wrote {report} and {', '.join(images)}")
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ["report.md", *images]:
            shutil.copyfile(args.run / name, args.publish / name)
        print(f"published to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
