"""Build the demo's default: a tiny Llama pre-trained here in seconds, and two adapters
trained on it by `mole_serve.training` (the same trainer as `python -m mole_serve.train`).

Results are cached under the work dir with what made them (the recipe, the adapters' shapes,
the code and library versions); a later run reuses them when all of that is unchanged and the
files are there (or rebuilds on request).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from mole_serve.training.data import IGNORE

from . import corpus

RECIPE_FILE = "recipe.json"
# The code a build runs: the demo's corpus and recipe, the trainer and what it imports.
BUILD_MODULES = ("mole_serve.demo.corpus", "mole_serve.demo.build", "mole_serve.training",
                 "mole_serve.adapter", "mole_serve.checkpoint", "mole_serve.config",
                 "mole_serve.reference", "mole_serve.routing", "mole_serve.stack")


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on; a cached build is reused only for an equal recipe."""

    hidden: int = 128
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    pretrain_steps: int = 700
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    train_rows: int = 2000
    train_steps: int = 200
    train_batch: int = 16
    train_lr: float = 5e-3
    held_out: int = 8
    seed: int = 0


# Two kinds of MoLE adapter side by side.
ADAPTER_SHAPES = {
    "reverse": dict(strategy="mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2),
    "upper": dict(strategy="dynmole", num_experts=4, r=8, lora_alpha=16),
}


@dataclass
class Build:
    base: pathlib.Path
    adapters: dict[str, pathlib.Path]
    held_out: list[str]


def build(workdir: pathlib.Path, recipe: Recipe, *, rebuild: bool = False,
          log=print) -> Build:
    """The cached build in `workdir`, made first if missing, stale or `rebuild`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".gitignore").write_text("# built by mole_serve.demo; never committed\n*\n")
    base, adapters = workdir / "base", workdir / "adapters"
    stamp = workdir / RECIPE_FILE
    wanted = build_inputs(recipe)
    present = (base / "config.json").is_file() and all(
        (adapters / name / "adapter_config.json").is_file() for name in ADAPTER_SHAPES)
    if rebuild or not present or not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        # Matrices this small gain nothing from more threads, and OpenMP threads spinning
        # against other work on a 2-core box made pre-training 7x slower.
        torch.set_num_threads(1)
        stamp.unlink(missing_ok=True)
        for stale in (base, adapters):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        pretrain_base(base, recipe)
        log(f"built base model in {time.monotonic() - started:.0f} s -> {base}")
        started = time.monotonic()
        train_adapters(base, adapters, recipe)
        log(f"trained adapters {list(ADAPTER_SHAPES)} in {time.monotonic() - started:.0f} s "
            f"-> {adapters}")
        stamp.write_text(json.dumps(wanted, indent=1))
    else:
        log(f"reusing the demo build in {workdir} (--rebuild to make it again)")
    return Build(base, {name: adapters / name for name in ADAPTER_SHAPES},
                 corpus.held_out_prompts(recipe.held_out))


def build_inputs(recipe: Recipe) -> dict:
    """Everything a build depends on, as stamped beside it."""
    import transformers

    code = hashlib.sha256()
    for path in build_sources():
        code.update(path.name.encode() + path.read_bytes())
    return {"recipe": dataclasses.asdict(recipe), "adapters": ADAPTER_SHAPES,
            "code_sha256": code.hexdigest(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def build_sources() -> list[pathlib.Path]:
    """The files of BUILD_MODULES, found through the import system (`mole_serve.training` is
    the repository's top-level training/ dir, mapped into the package)."""
    files = []
    for name in BUILD_MODULES:
        spec = importlib.util.find_spec(name)
        if spec.submodule_search_locations:  # a package: all its modules
            files += sorted(pathlib.Path(spec.origin).parent.glob("*.py"))
        else:
            files.append(pathlib.Path(spec.origin))
    return files


def pretrain_base(path: pathlib.Path, recipe: Recipe) -> None:
    """A random Llama trained as a plain LM on the embedded corpus, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = corpus.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        head_dim=recipe.hidden // recipe.heads, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    texts = corpus.pretraining_texts(recipe.pretrain_steps * recipe.pretrain_batch,
                                     seed=recipe.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 20 warm-up steps, then linear decay
        optimizer, lambda step: min(1.0, (step + 1) / 20) * (1.0 - step / recipe.pretrain_steps))
    model.train()
    for step in range(recipe.pretrain_steps):
        chunk = texts[step * recipe.pretrain_batch:(step + 1) * recipe.pretrain_batch]
        batch = tokenizer([t + tokenizer.eos_token for t in chunk], return_tensors="pt",
                          padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        model(**batch, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def train_adapters(base: pathlib.Path, out: pathlib.Path, recipe: Recipe) -> None:
    """Both task adapters in one multi-adapter run of the trainer."""
    from mole_serve.training.options import AdapterSpec, TrainOptions
    from mole_serve.training.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    exclude = set(corpus.held_out_prompts(recipe.held_out))
    specs = []
    for index, (task, shape) in enumerate(ADAPTER_SHAPES.items()):
        rows = corpus.task_rows(task, recipe.train_rows, seed=recipe.seed + 10 + index,
                                exclude=exclude)
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        specs.append(AdapterSpec(name=task, data=str(data), lr=recipe.train_lr,
                                 batch_size=recipe.train_batch, steps=recipe.train_steps,
                                 lora_dropout=0.0, **shape))
    options = TrainOptions(base_model=str(base), output_dir=str(out), adapters=specs,
                           seed=recipe.seed, scheduler="cosine", progress=sys.stderr.isatty())
    Trainer(options).train()
