"""The metrics-overhead benchmark's `--smoke` mode runs end to end, so it cannot rot before
its numbers are taken (it also checks that metrics on and off give identical outputs)."""

import csv
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_metrics_overhead.py"


def test_bench_metrics_overhead_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "metrics_overhead.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["device", "date", "commit", "tokens", "strategy", "metrics",
                             "median_us", "overhead_pct", "export_us"]
    assert rows[0]["commit"] and rows[0]["date"]
    assert {(r["strategy"], r["metrics"]) for r in rows} == {
        (s, m) for s in ("top-2", "dynmole") for m in ("on", "off")}
    assert all(float(r["median_us"]) > 0 for r in rows)
