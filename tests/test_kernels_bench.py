"""The kernel benchmark's and the tile tuner's `--smoke` modes run end to end (tiny sizes,
Triton interpreter), so the GPU scripts cannot rot between GPU sessions: every impl,
strategy and output column, the benchmark's built-in check that the kernels' output matches
the naive loop (exit status), and the tuner's table as the kernels load it."""

import csv
import dataclasses
import json
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


def test_tune_tiles_smoke_writes_a_table_the_kernels_pick(tmp_path, monkeypatch):
    """The tile tuner's `--smoke` run sweeps every kernel and writes tiles.csv and the
    device's JSON table; read back from $MOLE_SERVE_TUNED_CONFIG_FOLDER as the kernels read
    it, each token count gets the row of the smallest tuned count at or above it (else the
    largest), and another device keeps the untuned table."""
    from mole_serve.kernels import configs
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "tune_tiles.py"), "--smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "tiles.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gpu", "date", "commit", "tokens", "kernel", "tiles",
                             "median_us", "default_us"]
    assert {r["kernel"] for r in rows} == {"route", "experts", "expand"}
    assert all(float(r["median_us"]) > 0 for r in rows)
    device = "cpu-triton-interpreter"
    tuned = tmp_path / configs.tuned_file_name(device)
    smoke_row = configs.Tiles.from_json(json.loads(tuned.read_text())["tiles"]["6"])
    big = dataclasses.replace(smoke_row, expand=configs.ExpandTiles(256, 4, 8))
    document = {"device": device, "tiles": {"6": smoke_row.to_json(), "64": big.to_json()}}
    tuned.write_text(json.dumps(document))
    monkeypatch.setenv("MOLE_SERVE_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "_device_name", lambda: device)
    configs.tuned_tiles.cache_clear()
    try:
        assert [configs.pick_tiles(t) for t in (1, 6, 7, 64, 5000)] == [smoke_row] * 2 + [big] * 3
        monkeypatch.setattr(configs, "_device_name", lambda: "another GPU")
        assert configs.pick_tiles(7) == configs.table_tiles(7) == configs.TILE_TABLE[0][1]
    finally:
        configs.tuned_tiles.cache_clear()
