"""Training throughput: our grouped MixLoRA training forward vs the literal MoE-PEFT loop.

Both train the same MixLoRA adapter (E=8, r=16, top-2, attention LoRA on q/k/v/o) on a
Llama-2-7B-shaped stack with random weights (a few layers suffice: the cost is per layer).
- `mole`: mole_serve.training (W_g x and W_u x once, k intermediates mixed before one W_d);
- `literal`: every selected expert runs the whole frozen FFN on its tokens, W_d included
  (`mole_serve.reference.mixlora_ffn_literal`, which reproduces MoE-PEFT's loop).
Each impl does forward + backward + AdamW step; tokens/s from the median of timed steps;
peak memory from torch.cuda.max_memory_allocated. Rows go to benchmarks/results/train.csv
(gpu,date,commit,impl,tokens_per_s,peak_mem_gb).

Usage: python benchmarks/bench_train.py            (GPU, bf16 base, 7B shape)
       python benchmarks/bench_train.py --smoke    (CPU, tiny shape, results to a temp dir)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import pathlib
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.config import MoleConfig
from mole_serve.reference import FrozenFFN, mixlora_ffn_literal
from mole_serve.training.modules import MoleTrainingModel
from provenance import commit

REPO = pathlib.Path(__file__).resolve().parents[1]


def build_model(shape: dict, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


class LiteralMLP(nn.Module):
    """MoE-PEFT's MixLoRA block on one adapter's tokens (all rows use the adapter)."""

    def __init__(self, mlp: nn.Module, owner: MoleTrainingModel, index: int, name: str):
        super().__init__()
        self.mlp, self.index, self.name = mlp.mlp, index, name
        self.__dict__["owner"] = owner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        params = self.owner.adapters[self.name]
        frozen = FrozenFFN(self.mlp.gate_proj.weight, self.mlp.up_proj.weight,
                           self.mlp.down_proj.weight)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out, _ = mixlora_ffn_literal(flat, frozen, params.layer(self.index), params.config)
        return out.reshape(hidden.shape)


def make_trainable(impl: str, shape: dict, dtype: torch.dtype, device: str):
    model = build_model(shape, dtype, device)
    config = MoleConfig("mixlora", num_experts=8, r=16, lora_alpha=32, top_k=2,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"), lora_dropout=0.0)
    adapter = init_adapter(config, BaseShape.from_hf_config(model.config), "bench",
                           generator=torch.Generator().manual_seed(0), b_std=0.01)
    trainable = MoleTrainingModel(model, [adapter]).to(device)
    if impl == "literal":
        for index, layer in enumerate(model.model.layers):
            layer.mlp = LiteralMLP(layer.mlp, trainable, index, "bench")
    return trainable


def measure(impl: str, shape: dict, batch: int, length: int, steps: int, dtype, device: str
            ) -> tuple[float, float]:
    trainable = make_trainable(impl, shape, dtype, device)
    optimizer = torch.optim.AdamW(trainable.adapters.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (batch, length), device=device)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 2):
        started = time.perf_counter()
        with trainable.rows(["bench"] * batch):
            logits = trainable(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    del trainable, optimizer
    gc.collect()  # the training wrappers point back at their model: a cycle, freed by gc only
    if device == "cuda":
        torch.cuda.empty_cache()
    return batch * length / statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, temp output")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default: benchmarks/results; --smoke: a temp dir)")
    args = parser.parse_args()
    if args.smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2)
        device, dtype, batch, length, steps = "cpu", torch.float32, 2, 16, 1
        out = args.out or pathlib.Path(tempfile.mkdtemp())
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                     num_attention_heads=32, num_key_value_heads=32)
        device, dtype = "cuda", torch.bfloat16
        batch, length, steps = args.batch, args.length, args.steps
        out = args.out or REPO / "benchmarks" / "results"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for impl in ("mole", "literal"):
        tokens_per_s, peak = measure(impl, shape, batch, length, steps, dtype, device)
        rows.append({"gpu": gpu, "date": datetime.date.today().isoformat(), "commit": commit(),
                     "impl": impl, "tokens_per_s": round(tokens_per_s, 1),
                     "peak_mem_gb": round(peak, 2)})
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"mole / literal tokens/s: {ratio:.2f}x -> {path}")


if __name__ == "__main__":
    sys.exit(main())
