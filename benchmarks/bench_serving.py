"""Online serving: MoLE adapters vs plain vLLM LoRA vs the base model, as `vllm bench serve`
measures it (Poisson arrivals at swept request rates, streamed completions).

For each config the script starts its own `vllm serve` on localhost with random weights
(`--load-format dummy`: only shapes matter), sends a bounded number of requests per
(adapter count, request rate) point, and stops the server:
  base  stock vLLM, no adapters;
  lora  stock vLLM `--enable-lora` with N plain LoRA adapters of rank r;
  mole  `--enable-mole-adapters` with N MixLoRA adapters (E experts of rank r, top-k).
Each request's adapter is drawn from a Zipf law over the N adapters; prompt and output lengths
are uniform in [L/2, 3L/2]; `ignore_eos` makes every request produce its output length. Every
config and N sees the same arrival times, prompts and lengths at a given rate. All
N names of a config point at one adapter dir (disk stays small at 7B shape) but are distinct
adapters to vLLM: each gets its own id and slot.
Reports output tokens/s (over the time from the first send to the last answer) and TTFT /
TPOT p50 and p99. Rows are appended to `OUT/serving.csv`; `OUT/serving_throughput.png` and
`OUT/serving_latency.png` plot this run. A point with failed requests writes no row (its
first error is printed), a server that fails to start or warm up skips its config, and the
run exits 1 after the others, keeping its work dir for a look and its server logs' tails as
`OUT/server_CONFIG.log`.

CPU box:  python benchmarks/bench_serving.py                    (tiny shape, N = 1, 4)
GPU host: python benchmarks/bench_serving.py --shape llama2-7b  (N = 1, 8, 32)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import math
import os
import pathlib
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.checkpoint import save_adapter
from mole_serve.config import MoleConfig
from mole_serve.demo.server import (ServerError, VllmServer, default_env,
                                    exit_on_termination, vllm_max_lora_rank)
from provenance import commit

REPO = pathlib.Path(__file__).resolve().parents[1]

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMNS = ["device", "date", "commit", "model_shape", "config", "adapters", "request_rate",
           "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
ON_GPU = torch.cuda.is_available()


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="llama2-7b" if ON_GPU else "tiny")
    p.add_argument("--configs", default="base,lora,mole")
    p.add_argument("--adapters", type=ints, default=[1, 8, 32] if ON_GPU else [1, 4],
                   help="adapter counts N to sweep")
    p.add_argument("--rates", type=floats,
                   default=[1, 4, 16, math.inf] if ON_GPU else [1, 4],
                   help="request rates (requests/s, Poisson; inf: all at once, the saturated "
                        "throughput)")
    p.add_argument("--num-requests", type=int, default=200 if ON_GPU else 16,
                   help="requests per (N, rate) point")
    p.add_argument("--prompt-len", type=int, default=256 if ON_GPU else 32)
    p.add_argument("--output-len", type=int, default=128 if ON_GPU else 16)
    p.add_argument("--rank", type=int, default=16 if ON_GPU else 8)
    p.add_argument("--experts", type=int, default=8 if ON_GPU else 4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent over adapters")
    p.add_argument("--max-loras", type=int, default=32,
                   help="adapter slots (vLLM --max-loras), capped at max N")
    p.add_argument("--dtype", default="bfloat16" if ON_GPU else "float32")
    p.add_argument("--serve-args", default="", help="extra `vllm serve` arguments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--startup-timeout", type=float, default=300 if ON_GPU else 600,
                   help="seconds a server may take to become healthy")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (model, adapters, server logs; GBs at 7B shape) "
                        "also when nothing failed")
    return p.parse_args(argv)


# -- model and adapters ----------------------------------------------------------------------

def make_model_dir(path: pathlib.Path, shape: str) -> BaseShape:
    """config.json + tokenizer only: the server runs with `--load-format dummy`."""
    from transformers import LlamaConfig

    from mole_serve.demo.corpus import build_tokenizer

    dims = SHAPES[shape]
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(dims["vocab_size"] - len(tokenizer))])
    config = LlamaConfig(**dims, head_dim=dims["hidden_size"] // dims["num_attention_heads"],
                         architectures=["LlamaForCausalLM"],
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return BaseShape.from_hf_config(config)


def make_adapter(path: pathlib.Path, config: MoleConfig, base: BaseShape,
                 dtype: torch.dtype) -> pathlib.Path:
    """One adapter dir, which every adapter name serves (each name is still loaded and
    slotted apart); in the served dtype: half the bytes to write and read at bf16."""
    generator = torch.Generator().manual_seed(0)
    return save_adapter(init_adapter(config, base, path.name, generator=generator, b_std=0.01),
                        path, dtype=dtype)


def serve_args(config: str, args, adapter_dir: pathlib.Path | None) -> list[str]:
    n = max(args.adapters)
    common = ["--served-model-name", "base", "--load-format", "dummy", "--dtype", args.dtype,
              "--max-model-len", str(2 * (args.prompt_len + args.output_len) + 16),
              "--max-num-seqs", "256" if ON_GPU else "16"]
    if not ON_GPU:
        common.append("--enforce-eager")
    slots = ["--max-lora-rank", str(vllm_max_lora_rank(args.rank)),
             "--max-loras", str(min(n, args.max_loras)), "--max-cpu-loras", str(n),
             "--lora-modules",
             *(f"{config}{i}={adapter_dir}" for i in range(n))]
    extra = shlex.split(args.serve_args)
    if config == "base":
        return common + extra
    if config == "lora":
        return common + ["--enable-lora"] + slots + extra
    # MixLoRA adapters only: the DynMoLE family's layers (launches, slot buffers) are not built
    families = [] if any(a.startswith("--additional-config") for a in extra) else [
        "--additional-config", '{"mole": {"families": ["mixlora"]}}']
    return common + ["--enable-mole-adapters", "--max-mole-experts", str(args.experts),
                     "--max-mole-rank", str(args.rank)] + families + slots + extra


# -- load generation ------------------------------------------------------------------------

@dataclass
class Request:
    send_at: float
    model: str
    prompt: list[int]
    max_tokens: int


@dataclass
class Outcome:
    """One request's timings in seconds (`finished`: since the point's first send), or the
    error that failed it."""

    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    finished: float = 0.0
    error: str | None = None


def plan(config: str, n: int, rate: float, args, vocab: int, seed: int) -> list[Request]:
    """Poisson arrival times (the first at 0, as `vllm bench serve` sends it), uniform
    lengths and prompts from one seeded stream, the Zipf adapter choice from another: every
    config and adapter count gets the same arrivals and prompts."""
    load, popularity = random.Random(seed), random.Random(f"{seed}-adapters")
    weights = [1.0 / (i + 1) ** args.zipf for i in range(n)]
    length = lambda mean: load.randint(max(1, mean // 2), max(1, mean * 3 // 2))  # noqa: E731
    requests, at = [], 0.0
    for index in range(args.num_requests):
        at += load.expovariate(rate) if index else 0.0
        model = "base" if config == "base" else \
            f"{config}{popularity.choices(range(n), weights)[0]}"
        prompt = [load.randrange(10, vocab) for _ in range(length(args.prompt_len))]
        requests.append(Request(at, model, prompt, length(args.output_len)))
    return requests


async def send(client, url: str, request: Request, t0: float) -> Outcome:
    import httpx

    await asyncio.sleep(max(0.0, t0 + request.send_at - time.perf_counter()))
    started = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": request.model, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:500]
                return Outcome(error=f"{request.model}: HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                try:
                    chunk = json.loads(line[6:])
                except json.JSONDecodeError:
                    return Outcome(error=f"{request.model}: not JSON in the stream: {line:.200}")
                if chunk.get("error") or chunk.get("object") == "error":  # vLLM, mid-stream
                    return Outcome(error=f"{request.model}: {json.dumps(chunk)[:500]}")
                if chunk.get("choices") and ttft is None:
                    ttft = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Outcome(error=f"{request.model}: {type(exc).__name__}: {exc}")
    finished = time.perf_counter()
    if ttft is None or tokens == 0:
        return Outcome(error=f"{request.model}: the stream held no tokens")
    return Outcome(ttft, finished - started, tokens, finished - t0)


async def run_point(url: str, requests: list[Request]) -> list[Outcome]:
    import httpx

    limits = httpx.Limits(max_connections=len(requests))
    # trust_env off: proxy variables must not reroute requests to our own server
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(send(client, url, r, t0) for r in requests))


def summarize(outcomes: list[Outcome]) -> dict[str, float]:
    """`vllm bench serve`'s figures: output tokens over the time from the first send to the
    last answer; TPOT = (latency - TTFT) / (output tokens - 1) for requests of 2+ tokens."""
    ttft = np.array([o.ttft for o in outcomes]) * 1e3
    tpot = np.array([(o.latency - o.ttft) / (o.output_tokens - 1) for o in outcomes
                     if o.output_tokens > 1]) * 1e3
    span = max(o.finished for o in outcomes)
    return {"output_tok_s": sum(o.output_tokens for o in outcomes) / span,
            "ttft_p50_ms": np.percentile(ttft, 50), "ttft_p99_ms": np.percentile(ttft, 99),
            "tpot_p50_ms": np.percentile(tpot, 50) if tpot.size else float("nan"),
            "tpot_p99_ms": np.percentile(tpot, 99) if tpot.size else float("nan")}


def warm_up(url: str, models: list[str]) -> str | None:
    """One short request per adapter (loading adapters into slots is not what we measure);
    the first error, if any."""
    requests = [Request(0.0, m, [10, 11, 12], 2) for m in models]
    return next((o.error for o in asyncio.run(run_point(url, requests)) if o.error), None)


# -- results --------------------------------------------------------------------------------

def device_name() -> str:
    return torch.cuda.get_device_name(0) if ON_GPU else f"cpu-{os.cpu_count()}core"


def write_rows(out: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serving.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: pathlib.Path, stamp: dict) -> list[dict]:
    """The CSV's rows of this device, shape and commit: the configs of earlier runs too (a
    GPU call fits one 7B config), for plots that compare them."""
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f)
                if all(row[key] == str(value) for key, value in stamp.items()
                       if key != "date")]
    for row in rows:
        for key in COLUMNS[6:]:
            row[key] = float(row[key])
        row["adapters"] = int(row["adapters"])
    return rows


def plot(out: pathlib.Path, rows: list[dict]) -> None:
    """Throughput and latency percentiles against the request rate, a line per config and N
    (rate inf, all requests at once, drawn right of the largest finite rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r["request_rate"] for r in rows if math.isfinite(r["request_rate"])})
    saturated = 2 * finite[-1] if finite else 1.0
    all_at_once = any(not math.isfinite(r["request_rate"]) for r in rows)

    def x(row: dict) -> float:
        return row["request_rate"] if math.isfinite(row["request_rate"]) else saturated

    def label_rates(ax) -> None:
        ax.set_xticks(finite + [saturated] * all_at_once,
                      [f"{t:g}" for t in finite] + ["all at once"] * all_at_once)

    series: dict[str, list[dict]] = {}
    for row in sorted(rows, key=x):
        label = row["config"] if row["config"] == "base" else \
            f"{row['config']} N={row['adapters']}"
        series.setdefault(label, []).append(row)
    title = f"{rows[0]['model_shape']} on {rows[0]['device']}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        ax.plot([x(p) for p in points], [p["output_tok_s"] for p in points], marker="o",
                label=label)
    ax.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title=title)
    label_rates(ax)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serving_throughput.png", dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for label, points in series.items():
            rates = [x(p) for p in points]
            line, = ax.plot(rates, [p[f"{metric}_p50_ms"] for p in points], marker="o",
                            label=f"{label} p50")
            ax.plot(rates, [p[f"{metric}_p99_ms"] for p in points], marker="x", ls="--",
                    color=line.get_color(), label=f"{label} p99")
        ax.set(xlabel="request rate (req/s)", ylabel=f"{metric.upper()} (ms)", title=title)
        label_rates(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "serving_latency.png", dpi=120)
    plt.close("all")


# -- driver ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    configs = args.configs.split(",")
    unknown = set(configs) - {"base", "lora", "mole"}
    if unknown:
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; known: base, lora, mole")
    try:
        vllm_max_lora_rank(args.rank)
    except ValueError as exc:
        raise SystemExit(f"--rank: {exc}") from None
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_serving_"))
    status = 1
    try:
        status = sweep(args, configs, work)
        return status
    finally:
        if status:
            keep_server_logs(work, args.out)
        if args.keep or status:
            print(f"work dir kept (server logs: {work}/*.log): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def keep_server_logs(work: pathlib.Path, out: pathlib.Path, tail_bytes: int = 2**20) -> None:
    """The servers' log tails beside the CSV (`OUT/server_CONFIG.log`): the work dir of a
    run on a borrowed machine never comes back, and a failed point's engine traceback is
    the only account of why."""
    out.mkdir(parents=True, exist_ok=True)
    for log in sorted(work.glob("*.log")):
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - tail_bytes))
            (out / f"server_{log.name}").write_bytes(f.read())


def sweep(args: argparse.Namespace, configs: list[str], work: pathlib.Path) -> int:
    """Every config's server in turn, every (N, rate) point against it; 1 if a server or a
    point failed (the others still run)."""
    base = make_model_dir(work / "model", args.shape)
    vocab = SHAPES[args.shape]["vocab_size"]
    adapters = {
        "lora": MoleConfig("lora", num_experts=1, r=args.rank, lora_alpha=2 * args.rank,
                           target_modules=TARGETS),
        "mole": MoleConfig("mixlora", num_experts=args.experts, r=args.rank,
                           lora_alpha=2 * args.rank, top_k=args.top_k, target_modules=TARGETS),
    }
    env = default_env(work / "vllm-cache")
    stamp = dict(device=device_name(), date=datetime.date.today().isoformat(), commit=commit(),
                 model_shape=args.shape)
    rows, failures = [], 0
    for config in configs:
        adapter_dir = make_adapter(work / config, adapters[config], base,
                                   getattr(torch, args.dtype)) if config in adapters else None
        counts = [0] if config == "base" else args.adapters
        print(f"[{config}] {time.strftime('%H:%M:%S')} starting vllm serve ...", flush=True)
        try:
            with VllmServer(work / "model", serve_args(config, args, adapter_dir),
                            log_path=work / f"{config}.log", env=env, metrics=False,
                            startup_timeout_s=args.startup_timeout) as server:
                print(f"[{config}] {time.strftime('%H:%M:%S')} healthy", flush=True)
                error = warm_up(server.url, ["base"] if config == "base"
                                else [f"{config}{i}" for i in range(max(counts))])
                if error:
                    raise ServerError(f"warm-up failed: {error}")
                for n in counts:
                    for rate in args.rates:
                        row = measure(server.url, config, n, rate, args, vocab)
                        if row is None:
                            failures += 1
                            continue
                        rows.append({**stamp, **row})
                        print(json.dumps(rows[-1]), flush=True)
                        write_rows(args.out, rows[-1:])  # kept if a later point fails
        except ServerError as exc:
            failures += 1
            print(f"[{config}] skipped: {exc}", flush=True)
    if rows:
        plot(args.out, read_rows(args.out / "serving.csv", stamp))
        print(f"rows appended to {args.out / 'serving.csv'}; plots in {args.out}")
    return 1 if failures else 0


def measure(url: str, config: str, n: int, rate: float, args, vocab: int) -> dict | None:
    """One (N, rate) point's row, or None (printed why) when a request failed."""
    outcomes = asyncio.run(run_point(url, plan(config, n, rate, args, vocab, seed=args.seed)))
    errors = [o.error for o in outcomes if o.error]
    if errors:
        print(f"[{config}] N={n} rate={rate}: {len(errors)} of {len(outcomes)} requests "
              f"failed, no row; first: {errors[0]}", flush=True)
        return None
    return {"config": config, "adapters": n, "request_rate": rate,
            **{k: round(float(v), 2) for k, v in summarize(outcomes).items()}}


if __name__ == "__main__":
    exit_on_termination()  # a killed run stops its server and keeps its work dir
    sys.exit(main())
