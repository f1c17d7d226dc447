"""The kernel benchmark's `--smoke` mode runs end to end (tiny sizes, Triton interpreter), so
the GPU benchmark cannot rot between GPU sessions: every impl, strategy and output column,
and its built-in check that the kernels' output matches the naive loop (exit status)."""

import csv
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # also on a GPU machine
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "kernels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gpu", "date", "commit", "tokens", "adapters", "popularity",
                             "strategy", "impl", "median_us", "bytes_floor_us", "launches"]
    assert {r["impl"] for r in rows} == {"base", "mole", "naive"}
    assert {r["strategy"] for r in rows} == {"top-2", "top-p", "dynmole"}
    assert {(r["adapters"], r["popularity"]) for r in rows} == {("1", "uniform"),
                                                               ("3", "uniform"),
                                                               ("3", "zipf1.0")}
    assert all(float(r["median_us"]) > 0 for r in rows)
    with (tmp_path / "plan.csv").open() as f:
        plans = list(csv.DictReader(f))
    assert len(plans) == 3 and all(float(r["median_us"]) > 0 for r in plans)
    assert (tmp_path / "kernels.png").stat().st_size > 10_000
