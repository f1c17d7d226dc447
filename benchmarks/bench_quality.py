"""Quality at equal trainable parameters: plain LoRA vs MixLoRA vs DynMoLE on a synthetic
multi-task set, on a tiny Llama first pre-trained here on a synthetic corpus (CPU, minutes).

Tasks (one mixed training set, held-out rows per task): name the first word, the last word,
the number of words, or the reversed pair of a two-word input. Accuracy = exact match of the
greedy answer, decoded through the reference integration (`mole_serve.hf`). MixLoRA uses
E=4, r=4, top-2; plain LoRA's and DynMoLE's (E=4) ranks are chosen so that their trainable
parameter counts come closest to MixLoRA's.
Rows: benchmarks/results/quality.csv (method,task,accuracy,trainable_params,steps,seed).

Usage: python benchmarks/bench_quality.py [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import random
import sys
import tempfile

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_model import WORDS, make_tiny_llama, write_jsonl  # noqa: E402

from mole_serve.adapter import BaseShape, init_adapter  # noqa: E402
from mole_serve.checkpoint import load_adapter, state_dict_items  # noqa: E402
from mole_serve.hf import attach_adapters  # noqa: E402
from mole_serve.training.data import ALPACA  # noqa: E402
from mole_serve.training.options import AdapterSpec, TrainOptions  # noqa: E402
from mole_serve.training.trainer import Trainer  # noqa: E402

COUNTS = {2: "two", 3: "three", 4: "four"}
TASKS = {
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "count": lambda w: COUNTS[len(w)],
    "swap": lambda w: " ".join(reversed(w)),
}


def rows(task: str, count: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(2 if task == "swap" else rng.randint(2, 4))]
        out.append({"instruction": f"{task}: {' '.join(words)}", "output": TASKS[task](words)})
    return out


def pretrain(base: pathlib.Path, steps: int, seed: int) -> None:
    """Full-parameter LM pre-training on word sequences and task-formatted text, so the
    fine-tuning starts from a model that knows the vocabulary and the prompt format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        texts = []
        for _ in range(16):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            texts.append(ALPACA.format(instruction=" ".join(words)) + " ".join(
                rng.sample(words, len(words))))
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(base)


def trainable_params(spec: AdapterSpec, base: BaseShape) -> int:
    adapter = init_adapter(spec.mole_config(None), base, spec.name)
    return sum(t.numel() for _, t in state_dict_items(adapter))


def matched(spec: AdapterSpec, target: int, shape: BaseShape) -> AdapterSpec:
    """`spec` with the rank (alpha = 2 r) whose parameter count is closest to `target`:
    counts are affine in r, so two probes give the line."""
    def at(r: int) -> int:
        return trainable_params(dataclasses.replace(spec, r=r, lora_alpha=2 * r), shape)

    one, two = at(1), at(2)
    rank = max(1, round((target - one) / (two - one)) + 1)
    return dataclasses.replace(spec, r=rank, lora_alpha=2 * rank)


@torch.no_grad()
def accuracy(model, tokenizer, adapter_dir: pathlib.Path, name: str, held_out: list[dict]
             ) -> float:
    attachment = attach_adapters(model, [load_adapter(adapter_dir, name)])
    correct = 0
    try:
        for row in held_out:
            prompt = ALPACA.format(instruction=row["instruction"])
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            answer_len = len(tokenizer(row["output"], add_special_tokens=False)["input_ids"])
            with attachment.use(name):
                out = model.generate(ids, max_new_tokens=answer_len + 2, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            correct += int(text.strip() == row["output"])
    finally:
        attachment.detach()
    return correct / len(held_out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_quality_"))
    base = make_tiny_llama(work / "base")
    pretrain(base, args.pretrain_steps, args.seed)
    rng = random.Random(args.seed + 1)
    train = [r for task in TASKS for r in rows(task, 200, rng)]
    rng.shuffle(train)
    held_out = {task: rows(task, args.held_out, rng) for task in TASKS}
    data = write_jsonl(work / "train.jsonl", train)
    shape = BaseShape.from_hf_config(AutoModelForCausalLM.from_pretrained(base).config)

    common = dict(data=str(data), lr=5e-3, batch_size=16, steps=args.steps, r=4, lora_alpha=8)
    mixlora = AdapterSpec("mixlora", strategy="mixlora", top_k=2, num_experts=4, **common)
    target = trainable_params(mixlora, shape)
    specs = [matched(AdapterSpec("lora", strategy="lora", **common), target, shape), mixlora,
             matched(AdapterSpec("dynmole", strategy="dynmole", num_experts=4, **common), target,
                     shape)]
    results = []
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for spec in specs:
        options = TrainOptions(base_model=str(base), output_dir=str(work / spec.name),
                               adapters=[spec], seed=args.seed, progress=False)
        adapter_dir = Trainer(options).train()[spec.name]
        params = trainable_params(spec, shape)
        for task, held in held_out.items():
            acc = accuracy(model, tokenizer, adapter_dir, spec.name, held)
            results.append({"method": spec.name, "task": task, "accuracy": round(acc, 3),
                            "trainable_params": params, "steps": args.steps,
                            "seed": args.seed})
            print(results[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print("\n| method | params | " + " | ".join(TASKS) + " | mean |")
    print("|---|---|" + "---|" * (len(TASKS) + 1))
    for spec in specs:
        mine = [r for r in results if r["method"] == spec.name]
        accs = [r["accuracy"] for r in mine]
        print(f"| {spec.name} | {mine[0]['trainable_params']} | "
              + " | ".join(f"{a:.2f}" for a in accs) + f" | {sum(accs) / len(accs):.2f} |")


if __name__ == "__main__":
    main()
