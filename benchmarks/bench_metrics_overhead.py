"""Cost of the routing metrics: one served decoder layer's MoLE work (attention projections,
FFN projections, MixLoRA experts) with `RoutingStats` on vs off, in the same run, on the same
adapters and inputs; plus the export that runs at step boundaries, outside the forward
(`RoutingExport.collect` + `flush`: counts to the host, Prometheus updated), timed for a whole
model (every layer's counters, every slot holding an adapter, fresh counts before each export)
with `PROMETHEUS_MULTIPROC_DIR` set, as `vllm serve --enable-mole-adapters` runs.

The two variants are timed interleaved (on, off, on, off, ...) so machine noise hits both
alike; `overhead_pct` compares medians. Layers use the Triton kernels with CUDA and the
reference math otherwise (on the step's MoLE rows, `slots.SlotBatch`), as the server does;
with CUDA each timing is a CUDA-graph replay median, as the server replays its decode steps
(eager timings would be Python's). Routers are drawn N(0, 1/sqrt(hidden)) and frozen weights
N(0, 1/fan_in): logits of unit scale, so routing is neither one-hot nor uniform.

Usage: python benchmarks/bench_metrics_overhead.py [--out DIR]   (default sizes: a 7B layer
                                                                 on GPU, a small one on CPU;
                                                                 writes metrics_overhead.csv)
       python benchmarks/bench_metrics_overhead.py --smoke       (tiny, seconds)
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import pathlib
import shutil
import statistics
import tempfile
import time

# Before prometheus_client is imported: it picks its value storage then.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mole-metrics-")
    atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)

import torch  # noqa: E402

from mole_serve.adapter import BaseShape, init_adapter  # noqa: E402
from mole_serve.config import MoleConfig  # noqa: E402
from mole_serve.layers import ATTENTION_GROUPS, FFNAdapters, ProjectionAdapters  # noqa: E402
from mole_serve.reference import FrozenFFN  # noqa: E402
from mole_serve.routing_stats import RoutingExport, RoutingStats  # noqa: E402
from mole_serve.slots import SlotLimits, TokenSlots  # noqa: E402
from bench_kernels import median_seconds  # noqa: E402
from provenance import commit, write_csv  # noqa: E402

COLUMNS = ["device", "date", "commit", "tokens", "strategy", "metrics", "median_us",
           "overhead_pct", "export_us", "export_layers", "export_slots"]
ALL_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STRATEGIES = {
    "top-2": MoleConfig("mixlora", num_experts=8, r=16, lora_alpha=32, top_k=2,
                        target_modules=ALL_PROJS),
    "dynmole": MoleConfig("dynmole", num_experts=8, r=16, lora_alpha=32, top_p=0.75,
                          target_modules=ALL_PROJS),
}


class ServedLayer:
    """The MoLE work of one decoder layer as `model.py` runs it, on fresh frozen weights."""

    def __init__(self, base: BaseShape, slots: torch.Tensor, num_slots: int, config: MoleConfig,
                 routing_stats: bool, device: torch.device, use_kernels: bool,
                 dtype: torch.dtype):
        limits = SlotLimits(num_slots, config.r, config.num_experts, dtype)
        token_slots = TokenSlots(num_slots, slots.shape[0], use_kernels, device,
                                 compact=device.type == "cpu" and not use_kernels)
        token_slots.set(slots)
        token_slots.prepare(slots.shape[0])  # once per step in the model, not per layer
        self.attention = ProjectionAdapters(limits, base, 0, token_slots, ATTENTION_GROUPS,
                                            use_kernels, routing_stats).to(device)
        self.ffn = FFNAdapters(limits, base, 0, token_slots, use_kernels,
                               routing_stats).to(device)
        g = torch.Generator().manual_seed(0)
        for slot in range(num_slots):
            adapter = init_adapter(config, base, f"a{slot}", generator=g,
                                   router_std=base.hidden ** -0.5)
            self.attention.fill(slot, adapter)
            self.ffn.fill(slot, adapter)
        self.slot_names = [f"a{slot}" for slot in range(num_slots)]
        self.attention_outputs = {key: sum(base.in_out(p)[1] for p in projs)
                                  for key, projs in ATTENTION_GROUPS.items()}
        self.gate_up = (torch.randn(2 * base.intermediate, base.hidden, generator=g)
                        * base.hidden ** -0.5).to(device, dtype)  # vLLM's fused layout
        down = (torch.randn(base.hidden, base.intermediate, generator=g)
                * base.intermediate ** -0.5).to(device, dtype)
        self.frozen = FrozenFFN(*self.gate_up.chunk(2), down)

    def gate_up_gemm(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.gate_up.T

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.ffn.slot_batch(x.shape[0])
        for group, fan_out in self.attention_outputs.items():  # deltas onto a zero output
            self.attention.project(x.new_zeros(x.shape[0], fan_out), x, batch, group)
        return self.ffn.around_frozen(x, self.gate_up_gemm, self.frozen.act_and_mul,
                                      self.frozen.down_gemm)

    def model_export(self, layers: int) -> "ModelExport":
        return ModelExport(self.attention.routing_stats() + self.ffn.routing_stats(), layers,
                           self.slot_names)


class ModelExport:
    """A whole model's routing counters shaped like one served layer's, every slot in use:
    `__call__` is what the model does at a step boundary once its interval has passed."""

    def __init__(self, layer_stats: list[RoutingStats], layers: int, slot_names: list[str]):
        slots = len(slot_names)
        self.stats = [RoutingStats(slots, s.experts, layer, s.routers).to(s.counts.device)
                      for layer in range(layers) for s in layer_stats]
        for stats in self.stats:
            for routed in stats.routed_slots:
                routed.update(range(slots))
        self.export = RoutingExport(self.stats)
        self.slot_names = slot_names
        self.step()
        self()  # creates every series: a one-off cost, not the steady one timed

    def step(self) -> None:
        """Counts of a step: every router, slot and column moves (untimed)."""
        for stats in self.stats:
            stats.counts += torch.randint_like(stats.counts, 1, 4)

    def __call__(self) -> None:
        self.export.collect(self.slot_names)
        self.export.flush()


def timed_us(fn, device: torch.device, graph: bool = True) -> float:
    if device.type == "cuda":
        return median_seconds(fn, "cuda", graph) * 1e6
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def once_us(fn, device: torch.device) -> float:
    """One call, timed from an idle device to an idle device (host work, not replayable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the serving dtype
    export_layers = 32  # Llama-2-7B's: the export's cost grows with the layer count
    if args.smoke:
        base, tokens, num_slots, repeats = BaseShape(64, 96, 1, 2, 1, 32), (8,), 2, 3
        export_layers = 2
    elif cuda:
        base, tokens, num_slots, repeats = BaseShape(4096, 11008, 1, 32, 32, 128), \
            (16, 256, 4096), 8, 5  # each timing is already a median of many replays
    else:
        # The CPU reference path is slow (~2 s per layer at 256 tokens): decode-sized only.
        base, tokens, num_slots, repeats = BaseShape(512, 1376, 1, 8, 8, 64), (16, 64), 4, 40

    name = torch.cuda.get_device_name() if cuda else "cpu"
    stamp = {"device": name, "date": datetime.date.today().isoformat(), "commit": commit()}
    rows = []
    for num_tokens in tokens:
        g = torch.Generator().manual_seed(num_tokens)
        x = torch.randn(num_tokens, base.hidden, generator=g).to(device, dtype)
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=g).to(device)
        for strategy, config in STRATEGIES.items():
            layers = {on: ServedLayer(base, slots, num_slots, config, on, device, cuda, dtype)
                      for on in (True, False)}
            difference = (layers[True](x) - layers[False](x)).abs().max().item()
            if difference:  # kernels built with and without counting: reported, not fatal
                print(f"{strategy}, {num_tokens} tokens: outputs differ by {difference:.3g}")
            times = {True: [], False: []}
            for _ in range(repeats):
                for on, layer in layers.items():
                    times[on].append(timed_us(lambda: layer(x), device))
            model_export = layers[True].model_export(export_layers)
            exports = []
            for _ in range(repeats):
                model_export.step()
                exports.append(once_us(model_export, device))
            export = statistics.median(exports)
            off = statistics.median(times[False])
            for on in (True, False):
                median = statistics.median(times[on])
                rows.append({**stamp, "tokens": num_tokens, "strategy": strategy,
                             "metrics": "on" if on else "off", "median_us": round(median, 1),
                             "overhead_pct": round(100 * (median / off - 1), 2),
                             "export_us": round(export, 1) if on else "",
                             "export_layers": export_layers if on else "",
                             "export_slots": num_slots if on else ""})
                print(rows[-1])
        # written after every size: rows are kept if a later size fails
        path = write_csv(args.out / "metrics_overhead.csv", COLUMNS,
                         [[row[c] for c in COLUMNS] for row in rows])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
