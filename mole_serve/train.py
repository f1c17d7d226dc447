"""`python -m mole_serve.train` / `mole-train`: train MoLE adapters the server and peers load.

One adapter from flags:
    python -m mole_serve.train --base-model BASE --data math.jsonl --name math \\
        --strategy mixlora --num-experts 8 --r 16 --top-k 2 --steps 200 --output-dir out
Several adapters in one batch from a JSON / YAML file (see mole_serve.training.options):
    python -m mole_serve.train --config run.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mole_serve.config import STRATEGIES
from mole_serve.training.options import (AdapterSpec, TrainOptions, load_options_file,
                                         options_from_dict)

RUN_FLAGS = {f.name for f in dataclasses.fields(TrainOptions)} - {"adapters"}
# flags named like a run option set the run's value, which every adapter without its own takes
ADAPTER_FLAGS = {f.name for f in dataclasses.fields(AdapterSpec)} - RUN_FLAGS


# What each option sets; `_help` appends the dataclass default, so help and behaviour agree.
HELP = {
    "base_model": "local transformers Llama-family checkpoint dir (required)",
    "output_dir": "where the adapter dirs, checkpoints, log and loss curve go (required)",
    "dtype": "the frozen base's dtype; router and LoRA parameters stay fp32",
    "device": "torch device for the base and adapters; unset: cuda when available, else cpu",
    "gradient_checkpointing": "recompute each decoder layer in the backward pass (less memory)",
    "cutoff_len": "tokens per sequence; longer rows are cut and counted in a warning",
    "train_on_inputs": "train on prompt tokens too (MoE-PEFT's behaviour)",
    "add_eos": "do not append the tokenizer's EOS token to each answer",
    "scheduler": "learning-rate schedule after the warm-up",
    "warmup_steps": "optimizer steps of linear warm-up",
    "seed": "with the adapter's name, seeds its init, data order and dropout",
    "save_every": "checkpoint every N micro-steps (0: only the final adapters)",
    "resume": "continue from the checkpoint in --output-dir (same options and data)",
    "write_bin": "also write adapter_model.bin for MoE-PEFT / mixlora",
    "pad_token": "a tokenizer token to pad with, for a tokenizer that has none (e.g. its EOS)",
    "progress": "no progress bar (the log files are still written)",
    "name": "the adapter's dir under --output-dir (default: adapter)",
    "data": "JSON/JSONL (alpaca or chat `messages` rows) or a datasets.load_from_disk dir",
    "strategy": "routing: MixLoRA top-k, dynamic top-p, DynMoLE, or plain LoRA "
                "(mixlora-switch adapters are served, not trained here)",
    "num_experts": "LoRA experts per router",
    "r": "LoRA rank of each expert",
    "lora_alpha": "LoRA scaling numerator: alpha / r (alpha / sqrt(r) with --rslora)",
    "lora_dropout": "dropout on each LoRA input while training",
    "top_k": "experts per token (mixlora)",
    "top_p": "router probability mass kept (mixlora-dynamic default 0.8, dynmole 0.75)",
    "temperature": "mixlora-dynamic: router probabilities divided by it (0: none)",
    "keep_top_k": "dynmole: experts always kept",
    "entropy_threshold": "dynmole: a token whose normalised Tsallis entropy is above it uses "
                         "every expert (>= 1: never)",
    "entropy_index": "dynmole: Tsallis entropy index q",
    "router_init_range": "router init as MoE-PEFT reads it: std of MixLoRA's normal init "
                         "(0.02), a^2 of DynMoLE's Kaiming init (5.0)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping per optimizer step (0: off)",
    "batch_size": "rows per micro-step",
    "accumulation": "micro-steps per optimizer step",
    "steps": "optimizer steps; unset: --epochs over the data",
    "epochs": "passes over the data when --steps is not given",
    "balance_coef": "load-balance loss coefficient",
    "entropy_coef": "dynmole: router entropy loss coefficient",
    "attention": "adapt the FFN only",
    "target_modules": "projections to adapt; unset: all seven, or the FFN's three with "
                      "--no-attention",
    "use_rslora": "rank-stabilised LoRA scaling",
    "eval_data": "JSON/JSONL held out for loss and perplexity",
    "choice_data": "JSONL with choices/answer for accuracy (scored as MoE-PEFT does)",
}
# the run's value of an option an adapter may override is the default an adapter gets
DEFAULTS = {f.name: f.default for cls in (AdapterSpec, TrainOptions)
            for f in dataclasses.fields(cls)}


def _help(name: str) -> str:
    default = DEFAULTS.get(name)
    shown = default is not None and not isinstance(default, bool) and \
        default is not dataclasses.MISSING
    return f"{HELP[name]} (default: {default})" if shown else HELP[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mole-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON/YAML run file (any number of adapters); flags given "
                   "as well set the run's options")
    run = p.add_argument_group("run")
    one = p.add_argument_group("one adapter (without --config)")

    def flag(group, name: str, *names: str, **kwargs) -> None:
        """`--name-with-dashes`, or the given flag names, setting option `name`."""
        group.add_argument(*(names or [f"--{name.replace('_', '-')}"]), dest=name,
                           help=_help(name), **kwargs)

    switch = {"action": "store_true", "default": None}
    flag(run, "base_model")
    flag(run, "output_dir")
    flag(run, "dtype", choices=["float32", "bfloat16"])
    flag(run, "device")
    flag(run, "gradient_checkpointing", **switch)
    flag(run, "cutoff_len", type=int)
    flag(run, "train_on_inputs", **switch)
    flag(run, "add_eos", "--no-eos", action="store_false", default=None)
    flag(run, "scheduler", choices=["constant", "cosine"])
    flag(run, "warmup_steps", type=int)
    flag(run, "seed", type=int)
    flag(run, "save_every", type=int)
    flag(run, "resume", **switch)
    flag(run, "write_bin", **switch)
    flag(run, "pad_token")
    flag(run, "progress", "--no-progress", action="store_false", default=None)
    flag(one, "name")
    flag(one, "data")
    flag(one, "strategy", choices=STRATEGIES)  # validate says why switch is not trained
    for name, kind in (("num_experts", int), ("r", int), ("lora_alpha", int),
                       ("lora_dropout", float), ("top_k", int), ("top_p", float),
                       ("temperature", float), ("keep_top_k", int),
                       ("entropy_threshold", float), ("entropy_index", float),
                       ("router_init_range", float), ("lr", float),
                       ("weight_decay", float), ("max_grad_norm", float),
                       ("batch_size", int), ("accumulation", int),
                       ("steps", int), ("epochs", float), ("balance_coef", float),
                       ("entropy_coef", float)):
        flag(one, name, type=kind)
    flag(one, "attention", "--no-attention", action="store_false", default=None)
    flag(one, "target_modules", nargs="+", metavar="PROJ")
    flag(one, "use_rslora", "--rslora", **switch)
    flag(one, "eval_data")
    flag(one, "choice_data")
    return p


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    raw = load_options_file(args.config) if args.config else {}
    values = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    raw.update({k: v for k, v in values.items() if k in RUN_FLAGS})
    adapter = {k: v for k, v in values.items() if k in ADAPTER_FLAGS}
    if adapter:
        if raw.get("adapters"):
            raise SystemExit("mole-train: give adapter flags or a config file with "
                             "'adapters', not both")
        adapter.setdefault("name", "adapter")
        raw["adapters"] = [adapter]
    for key in ("base_model", "output_dir"):
        if not raw.get(key):
            raise SystemExit(f"mole-train: --{key.replace('_', '-')} is required")
    return options_from_dict(raw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"mole-train: {exc}") from None
    from mole_serve.training.data import DataError
    from mole_serve.training.options import OptionsError
    from mole_serve.training.trainer import DivergedError, ResumeError, Trainer

    try:
        paths = Trainer(options).train()
    except (DataError, OptionsError, ResumeError, DivergedError, OSError) as exc:  # not ours
        raise SystemExit(f"mole-train: {exc}") from None
    for name, path in paths.items():
        print(f"adapter {name!r} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
