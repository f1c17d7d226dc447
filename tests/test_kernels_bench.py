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

import pytest

SCRIPT = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_smoke(tmp_path):
    # A checkout on the GPU host has no .git: the commit comes from the environment.
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOLE_SERVE_COMMIT": "abc1234"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "kernels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["commit"] for r in rows} == {"abc1234"}
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
    largest); layers wider than the tuning run (more experts, a larger rank) and another
    device keep the default table."""
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
    table = configs.TunedTable.parse(tuned.read_text(), tuned)
    assert (table.experts, table.rank) == (4, 4) and [c for c, _ in table.rows] == [6]
    small = table.rows[0][1]
    big = dataclasses.replace(small, route=configs.RouteTiles(256, 8, 8),
                              experts=configs.ExpertsTiles(128, 8),
                              expand=configs.ExpandTiles(256, 4, 8))
    tuned.write_text(json.dumps(configs.TunedTable(4, 4, ((6, small), (64, big))).to_json()))
    monkeypatch.setenv("MOLE_SERVE_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "_device_name", lambda: device)
    configs.tuned_tiles.cache_clear()
    try:
        assert [configs.pick_tiles(t, "expand", 4, 4) for t in (1, 6, 7, 64, 5000)] == \
            [small.expand] * 2 + [big.expand] * 3
        # Sizes are compared padded as the kernels pad them (to powers of two >= 16).
        assert configs.pick_tiles(7, "route", 16, 2 * 8) == big.route
        assert configs.pick_tiles(7, "experts", 3, 16) == big.experts
        default = configs.table_tiles(7)
        assert configs.pick_tiles(7, "route", 17, 8) == default.route  # more experts
        assert configs.pick_tiles(7, "route", 4, 2 * 16) == default.route  # a larger rank
        assert configs.pick_tiles(7, "experts", 4, 17) == default.experts
        monkeypatch.setattr(configs, "_device_name", lambda: "another GPU")
        assert configs.pick_tiles(7, "expand", 4, 4) == configs.TILE_TABLE[0][1].expand
    finally:
        configs.tuned_tiles.cache_clear()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("rank"), "not a tuned tile table"),
    (lambda d: d["tiles"]["6"]["expand"].update(split_n=0), "split_n=0 must be >= 1"),
    (lambda d: d["tiles"]["6"]["route"].update(block_h=48), "block_h=48 must be a power of two"),
    (lambda d: d["tiles"]["6"]["experts"].update(block_i=8), "block_i=8 must be a power of two"),
    (lambda d: d["tiles"]["6"]["route"].pop("lanes"), "not a tuned tile table"),
    (lambda d: d.update(tiles={}), "needs rows"),
])
def test_tuned_table_that_could_not_launch_is_refused_naming_its_file(edit, message):
    from mole_serve.kernels import configs
    tiles = configs.table_tiles(1)
    document = configs.TunedTable(8, 16, ((6, tiles),)).to_json()
    configs.TunedTable.parse(json.dumps(document), "ok.json")
    edit(document)
    with pytest.raises(ValueError, match=f"bad.json.*{message}"):
        configs.TunedTable.parse(json.dumps(document), "bad.json")


def bench_kernels():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_kernels
    return bench_kernels


def reference_router_logits(layer, adapter, x) -> list:
    """Each router's logits for `x` under the reference math: MixLoRA's FFN router, or
    DynMoLE's gate, up and down routers (down routes the adapted intermediate)."""
    import torch.nn.functional as F

    from mole_serve.reference import gated_linear_literal
    weights, config = adapter.layers[0], adapter.config
    if weights.router is not None:
        return [F.linear(x, weights.router)]
    frozen, routers, experts = layer.frozen, weights.routers, weights.experts
    gate, gate_logits = gated_linear_literal(x, frozen.gate, routers["gate_proj"],
                                             experts["gate_proj"], config)
    up, up_logits = gated_linear_literal(x, frozen.up, routers["up_proj"], experts["up_proj"],
                                         config)
    _, down_logits = gated_linear_literal(F.silu(gate) * up, frozen.down, routers["down_proj"],
                                          experts["down_proj"], config)
    return [gate_logits, up_logits, down_logits]


@pytest.mark.parametrize("strategy", ["top-2", "dynmole"])
def test_bytes_floor_counts_each_selected_expert_and_used_router_once(strategy):
    """The floor's bytes, counted independently from the reference routing of each slot's
    tokens: frozen weights, x and y, the factors of every distinct (slot, expert) a router
    selects (MixLoRA: gate/up/down factors of its FFN experts; DynMoLE: per projection)
    and each used slot's fp32 routers."""
    import torch

    from mole_serve.routing import route_config
    bk = bench_kernels()
    setup = bk.SMOKE
    H, I, r, E = setup.hidden, setup.intermediate, setup.rank, setup.experts
    adapters = bk.make_adapters(strategy, setup, 3, 0.75)
    layer = bk.Layer(setup, adapters, "cpu")
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(3))
    slots = bk.draw_slots(40, 3, "zipf1.0", "cpu")
    plan = bk.plan_tokens(slots, bk.num_slots(layer.stack), bk.BLOCK_M)
    expected = 3 * H * I * 4 + 2 * x.numel() * 4
    for slot in slots.unique().tolist():
        adapter = adapters[slot]
        logits = reference_router_logits(layer, adapter, x[slots == slot])
        fan_ins = [H] if strategy == "top-2" else [H, H, I]
        for router_logits, fan_in in zip(logits, fan_ins, strict=True):
            w, ids = route_config(router_logits, adapter.config)
            factors = 3 * r * H + 3 * r * I if strategy == "top-2" else (H + I) * r
            expected += len(set(ids[w > 0].tolist())) * factors * 4 + E * fan_in * 4
    assert bk.floor_bytes(layer, setup, x, slots, plan, True) == expected
    assert bk.floor_bytes(layer, setup, x, slots, plan, False) == 3 * H * I * 4 + 2 * 40 * H * 4


@pytest.mark.parametrize("strategy", ["top-p", "dynmole"])
def test_calibration_counts_the_experts_of_every_router(strategy):
    """Top-p and DynMoLE are compared with top-2 at its mean of 2 experts per token: the
    bisection reaches it, and the mean it bisects on is the reference's over every router
    (DynMoLE's down router included, which selects more than gate and up here)."""
    import torch

    from mole_serve.routing import route_config
    bk = bench_kernels()
    setup = dataclasses.replace(bk.SMOKE, calibration_tokens=256, calibration_steps=8,
                                calibration_tolerance=0.1)
    top_p = bk.calibrate_top_p(strategy, setup, "cpu")
    adapter = bk.make_adapters(strategy, setup, 1, top_p)[0]
    x = torch.randn(setup.calibration_tokens, setup.hidden,
                    generator=torch.Generator().manual_seed(1))
    means = [(route_config(logits, adapter.config)[0] > 0).float().sum(1).mean().item()
             for logits in reference_router_logits(bk.Layer(setup, [adapter], "cpu"), adapter, x)]
    assert abs(bk.mean_experts(strategy, setup, top_p, "cpu") - sum(means) / len(means)) <= 0.01
    assert abs(sum(means) / len(means) - 2.0) <= 0.1
