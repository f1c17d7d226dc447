"""The serving benchmark still runs at its smallest size (three real servers, a few
requests), and its load and figures are those of `vllm bench serve`: numbers belong in
benchmarks/RESULTS.md, never in tests."""

import asyncio
import collections
import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_bench_serving_smallest(tmp_path):
    from bench_serving import COLUMNS

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_serving.py", "--shape", "tiny", "--adapters", "2",
         "--rates", "8,inf", "--num-requests", "4", "--prompt-len", "8", "--output-len", "4",
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(scratch.glob("bench_serving_*"))  # the work dir (GBs at 7B) is removed
    with open(tmp_path / "serving.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert [(r["config"], r["adapters"], r["request_rate"]) for r in rows] == [
        (config, n, rate) for config, n in (("base", "0"), ("lora", "2"), ("mole", "2"))
        for rate in ("8.0", "inf")]
    for row in rows:
        assert float(row["output_tok_s"]) > 0 and float(row["ttft_p50_ms"]) > 0
        assert float(row["ttft_p99_ms"]) >= float(row["ttft_p50_ms"])
    for plot in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_plots_draw_every_config_of_the_csv_of_this_commit(tmp_path):
    """A GPU call serves one 7B config: the plots read back the configs earlier calls of
    the same commit wrote, and draw rate inf (all requests at once) too."""
    from bench_serving import COLUMNS, plot, read_rows, write_rows

    stamp = dict(device="gpu", date="2026-11-24", commit="abc", model_shape="llama2-7b")
    rows = [dict(stamp, config=config, adapters=n, request_rate=rate, output_tok_s=100.0,
                 ttft_p50_ms=1.0, ttft_p99_ms=2.0, tpot_p50_ms=1.0, tpot_p99_ms=2.0)
            for config, n in (("base", 0), ("mole", 8)) for rate in (4.0, math.inf)]
    write_rows(tmp_path, rows[:2])
    write_rows(tmp_path, [dict(rows[0], commit="older")])
    write_rows(tmp_path, [dict(rows[2], date="2026-11-25"), rows[3]])
    read = read_rows(tmp_path / "serving.csv", stamp)
    assert [(r["config"], r["request_rate"]) for r in read] == [
        ("base", 4.0), ("base", math.inf), ("mole", 4.0), ("mole", math.inf)]
    assert list(read[0]) == COLUMNS and read[2]["adapters"] == 8
    plot(tmp_path, read)
    for name in ("serving_throughput.png", "serving_latency.png"):
        assert (tmp_path / name).stat().st_size > 1000


def bench_args(*argv):
    from bench_serving import parse_args
    return parse_args(["--shape", "tiny", *argv])


def test_every_config_and_adapter_count_gets_the_same_load():
    """Same arrivals, prompts and lengths for base, LoRA and MoLE at a rate, whatever N:
    only the model names differ (a per-config random stream made base's load differ)."""
    from bench_serving import plan

    args = bench_args("--num-requests", "50")
    plans = {(config, n): plan(config, n, 4.0, args, vocab=1024, seed=0)
             for config, n in (("base", 0), ("lora", 1), ("lora", 8), ("mole", 8))}
    load = {key: [(r.send_at, r.prompt, r.max_tokens) for r in requests]
            for key, requests in plans.items()}
    assert all(value == load["base", 0] for value in load.values())
    assert load["base", 0][0][0] == 0.0                     # the first request goes at once
    assert {r.model for r in plans["base", 0]} == {"base"}
    assert [r.model[4:] for r in plans["lora", 8]] == [r.model[4:] for r in plans["mole", 8]]
    assert plan("lora", 8, 4.0, args, 1024, seed=1)[1].send_at != load["base", 0][1][0]


def test_load_follows_poisson_arrivals_and_zipf_popularity():
    from bench_serving import plan

    args = bench_args("--num-requests", "4000", "--zipf", "1.0", "--prompt-len", "32")
    requests = plan("mole", 4, 8.0, args, vocab=1024, seed=0)
    gaps = [b.send_at - a.send_at for a, b in zip(requests, requests[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    counts = collections.Counter(r.model for r in requests)
    zipf = [1 / (i + 1) for i in range(4)]
    for i, weight in enumerate(zipf):
        assert counts[f"mole{i}"] / len(requests) == pytest.approx(weight / sum(zipf), abs=0.03)
    lengths = [len(r.prompt) for r in requests]
    assert min(lengths) == 16 and max(lengths) == 48


def test_summary_is_vllm_bench_serves():
    from bench_serving import Outcome, summarize

    result = summarize([Outcome(ttft=0.1, latency=1.1, output_tokens=11, finished=2.0),
                        Outcome(ttft=0.2, latency=0.2, output_tokens=1, finished=1.0)])
    assert result["output_tok_s"] == pytest.approx(12 / 2.0)   # first send to last answer
    assert result["tpot_p50_ms"] == pytest.approx(100.0)       # (1.1 - 0.1) / 10; n=1 skipped
    assert result["ttft_p50_ms"] == pytest.approx(150.0)


def test_failed_requests_are_outcomes_not_crashes():
    """A 4xx, a dropped connection or an empty stream fails its request only: the point is
    reported without a row and the sweep goes on."""
    from bench_serving import Request, send

    def stream(*chunks):
        return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    replies = {
        "ok": lambda: httpx.Response(200, text=stream(
            {"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
            {"choices": [], "usage": {"completion_tokens": 2}})),
        "missing": lambda: httpx.Response(404, json={"error": "no adapter"}),
        "empty": lambda: httpx.Response(200, text=stream()),
        "error": lambda: httpx.Response(200, text=stream(
            {"choices": [{"text": "a"}]}, {"error": {"message": "engine died"}})),
        "garbled": lambda: httpx.Response(200, text="data: {not json\n\n"),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        if model == "dropped":
            raise httpx.ReadError("connection reset", request=request)
        return replies[model]()

    async def outcomes():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return {m: await send(client, "http://server", Request(0.0, m, [1, 2], 2), 0.0)
                    for m in ("ok", "missing", "dropped", "empty", "error", "garbled")}

    got = asyncio.run(outcomes())
    assert got["ok"].error is None and got["ok"].output_tokens == 2
    assert "HTTP 404" in got["missing"].error and "no adapter" in got["missing"].error
    assert "ReadError" in got["dropped"].error
    assert "no tokens" in got["empty"].error
    assert "engine died" in got["error"].error
    assert "not JSON" in got["garbled"].error


@pytest.mark.parametrize("status", [0, 1])
def test_work_dir_is_removed_unless_a_point_failed(tmp_path, monkeypatch, status):
    """A failed sweep keeps its server logs; a good one frees the GBs of a 7B-shape run."""
    import tempfile

    import bench_serving

    def sweep(args, configs, work):
        (work / "mole.log").write_text("start\n" + "x" * 2**20 + "\nTraceback: engine died\n")
        return status

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bench_serving, "sweep", sweep)
    out = tmp_path / "out"
    assert bench_serving.main(["--shape", "tiny", "--out", str(out)]) == status
    assert len(list(tmp_path.glob("bench_serving_*"))) == status
    # and copies their tails beside the CSV, which is all that comes back from a GPU host
    kept = out / "server_mole.log"
    assert kept.exists() == bool(status)
    if status:
        text = kept.read_text()
        assert text.endswith("Traceback: engine died\n") and not text.startswith("start")


def test_a_config_whose_server_fails_is_skipped_and_the_run_fails(tmp_path, monkeypatch):
    """A server that does not start (or warm up) costs its config only: the other configs
    still write their rows, and the run exits 1."""
    import contextlib

    import bench_serving
    from mole_serve.demo.server import ServerError

    @contextlib.contextmanager
    def server(model, serve_args, **kwargs):
        if "--enable-lora" in serve_args:
            raise ServerError("vllm serve exited with 1")
        yield type("Served", (), {"url": "http://server"})()

    monkeypatch.setattr(bench_serving, "VllmServer", server)
    monkeypatch.setattr(bench_serving, "warm_up", lambda url, models: None)
    monkeypatch.setattr(bench_serving, "measure", lambda url, config, n, rate, args, vocab: {
        "config": config, "adapters": n, "request_rate": rate, "output_tok_s": 1.0,
        "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0, "tpot_p50_ms": 1.0, "tpot_p99_ms": 1.0})
    args = bench_args("--adapters", "2", "--rates", "4", "--out", str(tmp_path))
    status = bench_serving.sweep(args, ["base", "lora", "mole"], tmp_path / "work")
    assert status == 1
    with open(tmp_path / "serving.csv") as f:
        assert [r["config"] for r in csv.DictReader(f)] == ["base", "mole"]
