"""Kernel benchmark: one MoLE FFN layer on the Triton kernels vs the frozen FFN and the naive
per-adapter, per-expert PyTorch loop (imported from `mole_serve.reference`, so benchmark and
test references cannot drift).

Rows: tokens x adapters (1, 32) x popularity (uniform, Zipf 1.0) x strategy (MixLoRA top-2,
MixLoRA dynamic top-p and per-linear DynMoLE, both calibrated to the same mean experts per
token as top-2, DynMoLE's averaged over its gate, up and down routers) x impl:
- `base`: merged gate/up GEMM + SiLU·mul + down GEMM (what a server without adapters runs);
- `mole`: the layer as vLLM runs it: the same two GEMMs and SiLU·mul plus the kernels
  (3 launches for MixLoRA and for DynMoLE; up to E experts per token, as a served slot),
  token plan prebuilt;
- `naive`: `reference.ffn_literal` per adapter on its tokens (host syncs; every selected expert
  runs the whole frozen FFN, as MoE-PEFT does).
`median_us`: CUDA-graph replay (`do_bench_cudagraph`) where the impl is capturable, else
`do_bench`; `bytes_floor_us`: bytes that must move (frozen weights, x, y, the routers and
LoRA factors of the experts this batch selects) / measured device copy bandwidth;
`launches`: kernels seen by the profiler in one call. Building the token plan (once per step,
shared by every layer) is timed apart, in `plan.csv`. On the GPU each batch's MoLE layer is
also captured in a CUDA graph and its replay compared with an eager call (bit-identical).

Usage: python benchmarks/bench_kernels.py [--out DIR]     (GPU: the issue's sizes, bf16)
       python benchmarks/bench_kernels.py --smoke          (CPU interpreter, tiny sizes)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import pathlib
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mole_serve.adapter import BaseShape, MoleAdapter, init_adapter
from mole_serve.config import MoleConfig
from mole_serve.kernels import (BLOCK_M, Routing, configs, dynmole_down_delta_,
                                dynmole_gate_up, dynmole_gate_up_route, dynmole_intermediate_,
                                gated_lora_, mixlora_down_delta_, mixlora_experts_,
                                mixlora_route, num_slots, plan_tokens)
from mole_serve.reference import FrozenFFN, ffn_literal
from mole_serve.stack import LayerStack, stack_layer
from provenance import commit, write_csv

COLUMNS = ["gpu", "date", "commit", "tokens", "adapters", "popularity", "strategy", "impl",
           "median_us", "bytes_floor_us", "launches"]
FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Setup:
    hidden: int
    intermediate: int
    experts: int
    rank: int
    dtype: torch.dtype
    tokens: tuple[int, ...]
    adapters: tuple[int, ...]
    popularities: tuple[str, ...]
    calibration_tokens: int
    calibration_steps: int
    calibration_tolerance: float  # of the mean experts per token the top_p bisection reaches


FULL = Setup(4096, 11008, 8, 16, torch.bfloat16, (1, 16, 64, 256, 1024, 4096), (1, 32),
             ("uniform", "zipf1.0"), 512, 10, 0.05)
SMOKE = Setup(64, 96, 4, 4, torch.float32, (6,), (1, 3), ("uniform", "zipf1.0"), 32, 3, 1.0)


def shape_of(setup: Setup) -> BaseShape:
    return BaseShape(setup.hidden, setup.intermediate, 1, 1, 1, setup.hidden)


def config(strategy: str, setup: Setup, top_p: float) -> MoleConfig:
    e, r = setup.experts, setup.rank
    if strategy == "top-2":
        return MoleConfig("mixlora", e, r, 2 * r, FFN, top_k=2)
    if strategy == "top-p":
        return MoleConfig("mixlora-dynamic", e, r, 2 * r, FFN, top_p=top_p)
    return MoleConfig("dynmole", e, r, 2 * r, FFN, top_p=top_p, keep_top_k=1)


def make_adapters(strategy: str, setup: Setup, count: int, top_p: float) -> list[MoleAdapter]:
    g = torch.Generator().manual_seed(0)
    # Router std 2/sqrt(H): logits of std 2, so top-p picks a varying number of experts, and
    # DynMoLE's entropy broadcast (flatter routers send many tokens to all experts) leaves
    # top-2's mean of 2 experts per token within reach (unit logits: 2.6 at any top_p).
    return [init_adapter(config(strategy, setup, top_p), shape_of(setup), f"a{i}", generator=g,
                         b_std=0.02, router_std=2 * setup.hidden ** -0.5) for i in range(count)]


def mean_experts(strategy: str, setup: Setup, top_p: float, device: str) -> float:
    """Mean selected experts per token, as the benchmarked pipeline routes them (served
    dtype and k_max); for DynMoLE the mean over its gate, up and down routers (down routes
    the intermediate, whose spread differs from x's)."""
    layer = Layer(setup, make_adapters(strategy, setup, 1, top_p), device)
    n = setup.calibration_tokens
    x = torch.randn(n, setup.hidden, generator=torch.Generator().manual_seed(1)).to(
        device, setup.dtype)
    plan = plan_tokens(torch.zeros(n, dtype=torch.long, device=device), 1, BLOCK_M)
    routings: list = []
    layer.mole(x, plan, routings)
    return torch.stack([(r.weights > 0).float().sum(1).mean() for r in routings]).mean().item()


def calibrate_top_p(strategy: str, setup: Setup, device: str, target: float = 2.0) -> float:
    """Bisect top_p so the mean experts per token matches top-2's; refuse to go on at
    another mean (the comparison with top-2 would be of unequal work)."""
    low, high = 0.0, 1.0
    for _ in range(setup.calibration_steps):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_experts(strategy, setup, mid, device) < target else (
            low, mid)
    top_p = (low + high) / 2
    reached = mean_experts(strategy, setup, top_p, device)
    if abs(reached - target) > setup.calibration_tolerance:
        raise SystemExit(f"{strategy}: no top_p gives {target} experts per token with these "
                         f"routers (top_p={top_p:.4f} gives {reached:.2f})")
    return top_p


def draw_slots(tokens: int, adapters: int, popularity: str, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens * 1000 + adapters)
    if popularity == "uniform":
        probs = torch.ones(adapters)
    else:  # Zipf(1.0): adapter a drawn with probability proportional to 1 / (a + 1)
        probs = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float)
    return torch.multinomial(probs, tokens, replacement=True, generator=g).to(device)


def served_k_max(stack: LayerStack) -> LayerStack:
    """The served layer routes to as many experts per token as a slot has (`layers.py`: any
    strategy may come to a slot), not the adapters' own most (2 for top-2)."""
    return LayerStack(
        stack.ffn and dataclasses.replace(stack.ffn, k_max=stack.ffn.router.shape[1]),
        {proj: dataclasses.replace(g, k_max=g.router.shape[1]) for proj, g in stack.gated.items()},
        stack.lora)


@functools.lru_cache(maxsize=2)
def frozen_weights(setup: Setup, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen gate_up [2I, H] and down [H, I] every layer of a run shares (seeded: the
    calibration routes what the timed layers route)."""
    g = torch.Generator().manual_seed(2)
    H, I = setup.hidden, setup.intermediate

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(device, setup.dtype)

    return weight(2 * I, H), weight(H, I)


class Layer:
    """One decoder layer's frozen FFN (merged gate/up, as vLLM stores it) and MoLE stacks."""

    def __init__(self, setup: Setup, adapters: list[MoleAdapter], device: str):
        I = setup.intermediate
        self.gate_up, self.down = frozen_weights(setup, device)
        self.frozen = FrozenFFN(self.gate_up[:I], self.gate_up[I:], self.down)
        self.adapters = [_to_device(a, device) for a in adapters]
        self.stack: LayerStack = served_k_max(stack_layer(adapters, 0, shape_of(setup)).to(
            device, setup.dtype))
        # DynMoLE's gate and up share x: one grouped route, as the served layer runs.
        self.gate_up_group = dynmole_gate_up(self.stack)
        self.intermediate = I

    def base(self, x):
        g, u = F.linear(x, self.gate_up).split(self.intermediate, dim=1)
        return F.linear(F.silu(g) * u, self.down)

    def mole(self, x, plan, routings: list | None = None):
        """The pipeline a vLLM layer runs (kernels/functional.py docstring); `routings`
        collects each routing decision (for the bytes floor)."""
        record = routings.append if routings is not None else (lambda routing: None)
        g, u = F.linear(x, self.gate_up).split(self.intermediate, dim=1)
        h = F.silu(g) * u
        down = self.stack.gated.get("down_proj")
        if self.gate_up_group is not None:
            grouped = dynmole_gate_up_route(x, plan, self.gate_up_group)
            for index in range(2):  # gate, up
                record(Routing(grouped.ids[index], grouped.weights[index],
                               grouped.shrink[index]))
            down_partials = dynmole_intermediate_(h, g, u, grouped, plan, self.gate_up_group,
                                                  down)
        ffn = self.stack.ffn
        if ffn is not None:
            routing = mixlora_route(x, plan, ffn)
            record(routing)
            partials = mixlora_experts_(h, g, u, routing, plan, ffn)
        y = F.linear(h, self.down)
        if ffn is not None:
            mixlora_down_delta_(y, partials, routing, plan, ffn)
        if self.gate_up_group is not None:
            dynmole_down_delta_(y, down_partials, plan, down)
            if routings is not None:  # down's routing, for the bytes floor (untimed)
                record(gated_lora_(y.clone(), h, plan, down))
        return y

    def naive(self, x, slots):
        y = torch.empty_like(x)
        for slot in slots.unique().tolist():
            rows = slots == slot
            a = self.adapters[slot]
            y[rows] = ffn_literal(x[rows], self.frozen, a.layers[0], a.config)
        return y


def _to_device(adapter: MoleAdapter, device: str) -> MoleAdapter:
    """Adapters stay fp32, as MoE-PEFT keeps them; the naive path computes LoRA in fp32."""
    for layer in adapter.layers:
        if layer.router is not None:
            layer.router = layer.router.to(device)
        layer.routers = {k: v.to(device) for k, v in layer.routers.items()}
        for experts in layer.experts.values():
            experts.a, experts.b = experts.a.to(device), experts.b.to(device)
    return adapter


def floor_bytes(layer: Layer, setup: Setup, x: torch.Tensor, slots: torch.Tensor,
                plan, with_adapters: bool) -> int:
    """Frozen weights + x + y, plus each selected expert's factors and each used router."""
    b = x.element_size()
    H, I, r, E = setup.hidden, setup.intermediate, setup.rank, setup.experts
    total = 3 * H * I * b + 2 * x.numel() * b
    if not with_adapters:
        return total
    routings: list = []
    layer.mole(x, plan, routings)
    slots_used = slots.unique().numel()
    if layer.stack.ffn is not None:
        pairs = _distinct_pairs(slots, routings[0])
        return total + pairs * (2 * r * H + 3 * I * r + H * r) * b + slots_used * E * H * 4
    for routing, fan_in in zip(routings, (H, H, I)):  # gate, up, down
        fan_out = H + I - fan_in
        total += _distinct_pairs(slots, routing) * (fan_in + fan_out) * r * b \
            + slots_used * E * fan_in * 4
    return total


def _distinct_pairs(slots, routing) -> int:
    keys = (slots[:, None] * 1024 + routing.ids.long())[routing.weights > 0]
    return keys.unique().numel()


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, graph=False)
    return 2 * n / seconds


def median_seconds(fn, device: str, graph: bool) -> float:
    if device == "cuda":
        import triton.testing
        fn()
        torch.cuda.synchronize()
        bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
        return bench(fn, return_mode="median") / 1e3
    fn()  # the smoke run only checks that every path runs: one timed call
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count_launches(fn, device: str) -> int | str:
    """Kernels (and memsets/copies) the profiler sees on the GPU in one call; '' on CPU."""
    if device != "cuda":
        return ""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def replays_in_cuda_graph(fn) -> bool:
    """Capture `fn` in a CUDA graph, replay it, compare with an eager call (same kernels,
    same inputs, no atomics in the output: bit-identical)."""
    eager = fn().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return torch.equal(captured, eager)


def measure(layer: Layer, setup: Setup, device: str, bandwidth: float, tokens: int,
            adapters: int, popularity: str, with_plan: bool
            ) -> tuple[list[list], float, float | None, bool]:
    """Rows [tokens, adapters, popularity, impl, median_us, bytes_floor_us, launches] of one
    batch, the kernels' error vs the naive loop on it (max |diff| / max |naive|), the plan's
    median seconds (None unless `with_plan`), and whether the layer replays exactly in a
    CUDA graph (True on CPU)."""
    x = torch.randn(tokens, setup.hidden, device=device, dtype=setup.dtype)
    slots = draw_slots(tokens, adapters, popularity, device)
    S = num_slots(layer.stack)
    plan = plan_tokens(slots, S, BLOCK_M)
    naive = layer.naive(x, slots).float()
    error = ((layer.mole(x, plan).float() - naive).abs().max() / naive.abs().max()).item()
    floors = {adapted: floor_bytes(layer, setup, x, slots, plan, adapted) / bandwidth
              for adapted in (False, True)}
    floors = {adapted: f"{seconds * 1e6:.1f}" for adapted, seconds in floors.items()}
    impls = {  # name: (callable, CUDA-graph capturable, bytes floor)
        "base": (lambda: layer.base(x), True, floors[False]),
        "mole": (lambda: layer.mole(x, plan), True, floors[True]),
        "naive": (lambda: layer.naive(x, slots), False, floors[True]),
    }
    rows = [[tokens, adapters, popularity, impl, f"{median_seconds(fn, device, graph) * 1e6:.1f}",
             floor, count_launches(fn, device)] for impl, (fn, graph, floor) in impls.items()]
    plan_s = median_seconds(lambda: plan_tokens(slots, S, BLOCK_M), device, True) \
        if with_plan else None
    replays = device != "cuda" or replays_in_cuda_graph(lambda: layer.mole(x, plan))
    return rows, error, plan_s, replays


def run(setup: Setup, device: str, out_dir: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Write kernels.csv, plan.csv (after every layer, so a run cut off keeps its rows) and
    kernels.png; returns the CSV's path and whether every batch's kernel output matched the
    naive loop and replayed exactly in a CUDA graph. The match is a guard against wrong
    experts or rows (errors of order 1), not a precision test (the kernel tests do that
    against fp32): fp32 1e-4 relative, bf16 5e-2, as both sides round to bf16 differently."""
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-triton-interpreter"
    head = [gpu, datetime.date.today().isoformat(), commit()]
    tolerance = 1e-4 if setup.dtype == torch.float32 else 5e-2
    bandwidth = copy_bandwidth(device)
    print(f"{gpu}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    tuned = device == "cuda" and configs.tuned_tiles(gpu)
    print(f"tiles: {'the tuned table of ' + gpu if tuned else 'the untuned default table'}")
    top_p = {s: calibrate_top_p(s, setup, device) for s in ("top-p", "dynmole")}
    for s, p in top_p.items():
        print(f"{s}: top_p={p:.4f} gives {mean_experts(s, setup, p, device):.2f} experts/token")
    rows, plan_rows, all_match = [], [], True
    for strategy in ("top-2", "top-p", "dynmole"):
        for adapters in setup.adapters:
            layer = Layer(setup, make_adapters(strategy, setup, adapters, top_p.get(strategy, 0)),
                          device)
            for popularity in setup.popularities if adapters > 1 else ("uniform",):
                for tokens in setup.tokens:
                    measured, error, plan_s, replays = measure(
                        layer, setup, device, bandwidth, tokens, adapters, popularity,
                        with_plan=strategy == "top-2")  # the plan is the same for all
                    all_match &= error <= tolerance and replays
                    print(f"{strategy} {adapters} adapters {popularity} {tokens} tokens: error "
                          f"vs naive {error:.1e}{'' if error <= tolerance else '  MISMATCH'}"
                          f"{'' if replays else '  CUDA-GRAPH REPLAY MISMATCH'}")
                    if plan_s is not None:
                        plan_rows.append(head + [tokens, adapters, popularity,
                                                 f"{plan_s * 1e6:.1f}"])
                    for tok, ads, pop, impl, *values in measured:
                        rows.append(head + [tok, ads, pop, strategy, impl, *values])
                        print(",".join(map(str, rows[-1][3:])), flush=True)
            path = write_csv(out_dir / "kernels.csv", COLUMNS, rows)
            write_csv(out_dir / "plan.csv", COLUMNS[:6] + ["median_us"], plan_rows)
    plot(rows, out_dir / "kernels.png")
    return path, all_match


def plot(rows: list[list], path: pathlib.Path) -> None:
    """Latency vs tokens per (strategy, adapters, popularity) panel; skipped without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    panels = sorted({(r[6], r[4], r[5]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (strategy, adapters, popularity) in zip(axes[0], panels):
        for impl in ("base", "mole", "naive"):
            points = [(r[3], float(r[8])) for r in rows
                      if (r[6], r[4], r[5], r[7]) == (strategy, adapters, popularity, impl)]
            ax.plot(*zip(*points), marker="o", label=impl)
        floor = [(r[3], float(r[9])) for r in rows
                 if (r[6], r[4], r[5], r[7]) == (strategy, adapters, popularity, "mole")]
        ax.plot(*zip(*floor), linestyle="--", color="gray", label="bytes floor")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="µs",
               title=f"{strategy}, {adapters} adapters, {popularity}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(parser: argparse.ArgumentParser
               ) -> tuple[argparse.Namespace, str, pathlib.Path]:
    """Adds --smoke and --out (shared with tune_tiles.py) and parses: (args, device, output
    folder)."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU under the Triton interpreter")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default: benchmarks/results; --smoke: a temp dir)")
    args = parser.parse_args()
    out = args.out or (pathlib.Path(tempfile.mkdtemp()) if args.smoke
                       else pathlib.Path(__file__).parent / "results")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no GPU: run with --smoke (interpreter, tiny sizes)")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        sys.exit("--smoke on a GPU machine: set TRITON_INTERPRET=1 before starting")
    return args, device, out


def main() -> None:
    args, device, out = parse_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    path, all_match = run(SMOKE if args.smoke else FULL, device, out)
    print(path)
    if not all_match:
        sys.exit("kernel output differs from the naive loop (MISMATCH above)")


if __name__ == "__main__":
    main()
