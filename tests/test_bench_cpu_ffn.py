"""The CPU FFN benchmark's `--smoke` mode runs end to end, so it cannot rot before its
numbers are taken: compact steps and every-row steps agree on every case."""

import csv
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_cpu_ffn.py"


def test_bench_cpu_ffn_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "cpu_ffn.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["tokens_slots"], r["mode"]) for r in rows] == [("", "frozen")] + [
        (case, mode) for case in ("all base model", "half base half top-2", "all top-2",
                                  "all top-p") for mode in ("every_row", "compact")]
    assert all(float(r["median_s"]) > 0 and r["commit"] for r in rows)
