"""The serving benchmark still runs at its smallest size (three real servers, a few
requests): numbers belong in benchmarks/RESULTS.md, never in tests."""

import csv
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_bench_serving_smallest(tmp_path):
    from bench_serving import COLUMNS

    done = subprocess.run(
        [sys.executable, "benchmarks/bench_serving.py", "--shape", "tiny", "--adapters", "2",
         "--rates", "8", "--num-requests", "4", "--prompt-len", "8", "--output-len", "4",
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "serving.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert [(r["config"], r["adapters"]) for r in rows] == [("base", "0"), ("lora", "2"),
                                                             ("mole", "2")]
    for row in rows:
        assert float(row["output_tok_s"]) > 0 and float(row["ttft_p50_ms"]) > 0
        assert float(row["ttft_p99_ms"]) >= float(row["ttft_p50_ms"])
    for plot in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / plot).stat().st_size > 1000
