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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mole-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON/YAML run file (any number of adapters)")
    run = p.add_argument_group("run")
    run.add_argument("--base-model", help="local transformers Llama-family checkpoint dir")
    run.add_argument("--output-dir")
    run.add_argument("--dtype", choices=["float32", "bfloat16"])
    run.add_argument("--device", help="torch device for the base and adapters (default: cuda "
                     "when available, else cpu)")
    run.add_argument("--gradient-checkpointing", action="store_true", default=None)
    run.add_argument("--cutoff-len", type=int)
    run.add_argument("--train-on-inputs", action="store_true", default=None,
                     help="train on prompt tokens too (MoE-PEFT's behaviour)")
    run.add_argument("--no-eos", dest="add_eos", action="store_false", default=None)
    run.add_argument("--scheduler", choices=["constant", "cosine"])
    run.add_argument("--warmup-steps", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--save-every", type=int, help="checkpoint every N micro-steps")
    run.add_argument("--resume", action="store_true", default=None)
    run.add_argument("--write-bin", action="store_true", default=None,
                     help="also write adapter_model.bin for MoE-PEFT / mixlora")
    run.add_argument("--pad-token")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    one = p.add_argument_group("one adapter (without --config)")
    one.add_argument("--name")
    one.add_argument("--data", help="JSON/JSONL (alpaca or chat rows) or a datasets dir")
    one.add_argument("--strategy", choices=STRATEGIES)  # validate says why switch is not
    for flag, kind in (("num-experts", int), ("r", int), ("lora-alpha", int),
                       ("lora-dropout", float), ("top-k", int), ("top-p", float),
                       ("temperature", float), ("keep-top-k", int),
                       ("entropy-threshold", float), ("entropy-index", float),
                       ("router-init-range", float), ("lr", float),
                       ("weight-decay", float), ("max-grad-norm", float),
                       ("batch-size", int), ("accumulation", int),
                       ("steps", int), ("epochs", float), ("balance-coef", float),
                       ("entropy-coef", float)):
        one.add_argument(f"--{flag}", type=kind)
    one.add_argument("--no-attention", dest="attention", action="store_false", default=None,
                     help="adapt the FFN only")
    one.add_argument("--target-modules", nargs="+", metavar="PROJ",
                     help="projections to adapt (default: all seven, or the FFN's three with "
                          "--no-attention)")
    one.add_argument("--rslora", dest="use_rslora", action="store_true", default=None)
    one.add_argument("--eval-data")
    one.add_argument("--choice-data", help="JSONL with choices/answer for accuracy")
    return p


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    raw = load_options_file(args.config) if args.config else {}
    values = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    raw.update({k: v for k, v in values.items() if k in RUN_FLAGS})
    adapter = {k: v for k, v in values.items() if k in ADAPTER_FLAGS}
    if adapter:
        if raw.get("adapters"):
            raise SystemExit("give adapter flags or a config file with 'adapters', not both")
        adapter.setdefault("name", "adapter")
        raw["adapters"] = [adapter]
    for key in ("base_model", "output_dir"):
        if not raw.get(key):
            raise SystemExit(f"--{key.replace('_', '-')} is required")
    return options_from_dict(raw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"mole-train: {exc}") from None
    from mole_serve.training.data import DataError
    from mole_serve.training.options import OptionsError
    from mole_serve.training.trainer import ResumeError, Trainer

    try:
        paths = Trainer(options).train()
    except (DataError, OptionsError, ResumeError, OSError) as exc:  # the user's, not ours
        raise SystemExit(f"mole-train: {exc}") from None
    for name, path in paths.items():
        print(f"adapter {name!r} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
