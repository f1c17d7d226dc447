"""The metrics-overhead benchmark's `--smoke` mode runs end to end, so it cannot rot before
its numbers are taken: metrics on and off give identical outputs, and the timed exports
write routing series."""

import csv
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_metrics_overhead.py"


def test_bench_metrics_overhead_smoke(tmp_path):
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    series = tmp_path / "prometheus"
    series.mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(series)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outputs differ" not in done.stdout
    with (tmp_path / "metrics_overhead.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["device", "date", "commit", "tokens", "strategy", "metrics",
                             "median_us", "overhead_pct", "export_us", "export_layers",
                             "export_slots"]
    assert {r["export_layers"] for r in rows if r["metrics"] == "on"} == {"2"}
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(series))
    selections = [s for m in registry.collect() for s in m.samples
                  if s.name == "mole_serve_expert_selections_total"]
    # The served layer's counters: seven per-linear routers and the FFN router, here in
    # 2 layers x 2 slots x 8 experts; each step adds 1-3 to every count, so every series
    # grew in every export (the first, then 3 timed ones).
    assert len(selections) == (7 + 1) * 2 * 2 * 8
    assert min(s.value for s in selections) >= 4
    assert rows[0]["commit"] and rows[0]["date"]
    assert {(r["strategy"], r["metrics"]) for r in rows} == {
        (s, m) for s in ("top-2", "dynmole") for m in ("on", "off")}
    assert all(float(r["median_us"]) > 0 for r in rows)
