"""scripts/bench_report.py on PerfTest output kept from a real run (bench-results/20261207T030126Z:
BENCH_MODE=replicated, Warren beside RabbitMQ) and on variants of it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "scripts" / "bench_report.py"
FIXTURE = Path(__file__).parent / "fixtures" / "replicated"
PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def result_dir(tmp_path):
    d = tmp_path / "20261207T030126Z"
    shutil.copytree(FIXTURE, d)
    return d


def test_charts_and_report_of_a_run_with_both_brokers(result_dir, tmp_path):
    published = tmp_path / "docs" / "bench" / "replicated"
    r = run(result_dir, "--publish", published)
    assert r.returncode == 0, r.stderr
    for name in ("throughput", "latency", "timeline"):
        png = (result_dir / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000, name
        svg = (result_dir / f"{name}.svg").read_text()
        # Every chart names its command and revision.
        assert "ac3626e" in svg and "BENCH_MODE=replicated" in svg, name
        assert (published / f"{name}.png").read_bytes() == png
    report = (result_dir / "report.md").read_text()
    assert report == (published / "report.md").read_text()
    # The summary lines of both PerfTest outputs, and the ratios computed from them:
    # 14835 / 7147 received, 15293 µs / 27545 µs confirm p99.
    assert "| Warren | 1 KiB | 14,837 | 14,835 | 5.7 ms | 15.3 ms | ? |" in report
    assert "| RabbitMQ | 1 KiB | 7,147 | 7,147 | 11.5 ms | 27.5 ms | ? |" in report
    assert "| 1 KiB | 2.08× | 0.56 |" in report
    assert "confirm p99" in report
    assert "- host: 2 cores, Linux 6.18.44-fc-v1300; git ac3626e" in report
    assert "![throughput](throughput.png)" in report


def test_latency_in_milliseconds_and_one_broker_only(result_dir):
    (result_dir / "perftest-rabbitmq-1024.txt").unlink()
    (result_dir / "perftest-rabbitmq-1024.csv").unlink()
    txt = result_dir / "perftest-warren-1024.txt"
    text = txt.read_text()
    assert "2651/5734/7380/10388/15293 µs" in text
    txt.write_text(
        text.replace(
            "confirm latency min/median/75th/95th/99th 2651/5734/7380/10388/15293 µs",
            "confirm latency min/median/75th/95th/99th 2/5/6/9/150 ms",
        )
    )
    meta = json.loads((result_dir / "meta.json").read_text())
    assert run(result_dir).returncode == 0
    report = (result_dir / "report.md").read_text()
    assert "| Warren | 1 KiB | 14,837 | 14,835 | 5.0 ms | 150.0 ms | ? |" in report
    assert "Warren/RabbitMQ" not in report
    assert meta["git"] in report


def test_a_directory_without_perftest_output_is_refused_with_a_reason(tmp_path):
    r = run(tmp_path)
    assert r.returncode == 2
    assert "no PerfTest output" in r.stderr


def test_an_unfinished_perftest_run_is_refused_naming_the_file(result_dir):
    txt = result_dir / "perftest-warren-1024.txt"
    txt.write_text("\n".join(l for l in txt.read_text().splitlines() if "rate avg" not in l))
    r = run(result_dir)
    assert r.returncode == 2
    assert "perftest-warren-1024.txt" in r.stderr and "receiving rate avg" in r.stderr


def test_peak_memory_and_the_scenario_are_reported(result_dir):
    # bench.sh samples the broker's RSS (KiB) once a second; the peak is reported.
    (result_dir / "rss-warren-1024.txt").write_text("20480\n 51200\n30720\n")
    (result_dir / "rss-rabbitmq-1024.txt").write_text("")
    meta = json.loads((result_dir / "meta.json").read_text())
    meta["scenario"] = "10q"
    (result_dir / "meta.json").write_text(json.dumps(meta))
    assert run(result_dir).returncode == 0
    report = (result_dir / "report.md").read_text()
    assert "| Warren | 1 KiB | 14,837 | 14,835 | 5.7 ms | 15.3 ms | 50 |" in report
    assert "| RabbitMQ | 1 KiB | 7,147 | 7,147 | 11.5 ms | 27.5 ms | ? |" in report
    assert "replicated, 10q" in (result_dir / "throughput.svg").read_text()
