"""The training benchmarks still run (at toy sizes): numbers live in benchmarks/RESULTS.md,
never in tests, but a benchmark that no longer starts is a defect."""

import csv
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_train_smoke(tmp_path):
    out = run("benchmarks/bench_train.py", "--smoke", "--out", str(tmp_path))
    assert "mole / literal tokens/s" in out
    with open(tmp_path / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gpu", "date", "commit", "impl", "tokens_per_s", "peak_mem_gb"]
    assert [r["impl"] for r in rows] == ["mole", "literal"]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


def test_bench_quality_tiny(tmp_path):
    run("benchmarks/bench_quality.py", "--steps", "2", "--pretrain-steps", "2",
        "--held-out", "2", "--out", str(tmp_path))
    with open(tmp_path / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"lora", "mixlora", "dynmole"}
    assert len(rows) == 12 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    params = {r["method"]: int(r["trainable_params"]) for r in rows}
    assert params["lora"] == params["mixlora"]  # matched on purpose
