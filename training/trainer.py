"""The training loop: several adapters in one batch, each with its own optimizer.

Every micro-step takes one micro-batch from each adapter that still has steps to go, runs
the frozen model once over all their rows, sums per-adapter losses (causal-LM CE + router
losses, each divided by that adapter's accumulation), and steps each adapter's AdamW on its
own accumulation schedule. Checkpoints hold everything needed to resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.checkpoint import load_adapter, save_adapter
from mole_serve.routing import route_config, router_loss

from .data import (EVAL_SPLITS, IGNORE, TRAIN_SPLITS, Example, batches, collate, load_records,
                   tokenize)
from .evaluate import ChoiceItem, choice_accuracy, choice_items, heldout_loss
from .modules import MoleTrainingModel
from .options import AdapterSpec, OptionsError, TrainOptions
from .report import RunLog

STATE_NAME = "trainer_state.pt"
# What a resumed adapter may change: its length and its evaluation. Its data file may move or
# be renamed; the examples themselves are compared.
RESUMABLE = ("data", "steps", "epochs", "eval_data", "choice_data")


class ResumeError(ValueError):
    """A checkpoint this run cannot resume (other adapters, another data order)."""


class DivergedError(ValueError):
    """A loss or weight that is no longer finite: what was trained is not written."""


@dataclass
class AdapterRun:
    """One adapter's moving parts during a run."""

    spec: AdapterSpec
    examples: list[Example]
    total_steps: int
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    micro_steps: int = 0
    steps: int = 0
    batches_taken: int = 0
    stream: object = None
    history: list[float] = field(default_factory=list)
    eval_examples: list[Example] | None = None    # read before training: a bad eval file
    choices: list[ChoiceItem] | None = None       # must not cost a finished run
    fingerprint: dict = field(default_factory=dict)  # what a resume must find unchanged

    @property
    def done(self) -> bool:
        return self.steps >= self.total_steps


def load_base(options: TrainOptions):
    """The frozen base model and tokenizer from a local dir (never the hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.dtype]
    base = options.base_model
    if pathlib.Path(base).is_dir() and not (pathlib.Path(base) / "config.json").is_file():
        raise OptionsError(f"base_model {base}: no config.json (not a transformers "
                           "checkpoint dir)")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as exc:  # no such dir (nor a cached hub id), a bad config
        where = "" if pathlib.Path(base).exists() else " is no directory, nor a cached hub id"
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OptionsError(f"base_model {base}{where}: transformers cannot load it: "
                           f"{first_line}") from None
    if options.pad_token is not None:
        pad_id = tokenizer.convert_tokens_to_ids(options.pad_token)
        if pad_id is None or (pad_id == tokenizer.unk_token_id
                              and options.pad_token != tokenizer.unk_token):
            raise OptionsError(f"--pad-token {options.pad_token!r} is not in the tokenizer's "
                               f"vocabulary (its eos token {tokenizer.eos_token!r} is)")
        tokenizer.pad_token = options.pad_token
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False})
    return model.to(training_device(options)), tokenizer


def training_device(options: TrainOptions) -> torch.device:
    """The run's device: `options.device` (checked by `validate`), else the GPU if any."""
    if options.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(options.device)


def _schedule(spec: AdapterSpec, total: int):
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    def __init__(self, options: TrainOptions, model=None, tokenizer=None):
        options.validate()
        self.options = options
        self.output = pathlib.Path(options.output_dir)
        earlier = [] if options.resume else checkpoints_in(self.output)
        if earlier:
            raise ResumeError(f"{self.output} holds checkpoints of an earlier run (up to "
                              f"{earlier[-1].name}): --resume continues it; else use another "
                              "--output-dir or remove them")
        if model is None:
            model, tokenizer = load_base(options)
        self.tokenizer = tokenizer
        base = BaseShape.from_hf_config(model.config)
        self.runs: dict[str, AdapterRun] = {}
        adapters = []
        specs = options.adapter_specs()
        for spec in specs:
            config = spec.mole_config(options.base_model)
            generator = torch.Generator().manual_seed(options.seed + spec.seed_offset)
            adapters.append(init_adapter(config, base, spec.name, generator=generator,
                                         router_init_range=spec.router_init_range))
            examples = self._examples(spec, spec.data)
            per_step = spec.batch_size * spec.accumulation
            total = spec.steps or max(1, math.ceil(spec.epochs * len(examples) / per_step))
            if spec.warmup_steps >= total:
                raise OptionsError(f"adapter {spec.name!r}: warmup_steps {spec.warmup_steps} "
                                   f"must be below its {total} optimizer steps (its lr would "
                                   f"peak at {total / (spec.warmup_steps + 1):.2g} x lr)")
            run = self.runs[spec.name] = AdapterRun(spec, examples, total)
            run.fingerprint = self._fingerprint(run)
            if spec.eval_data:
                run.eval_examples = self._examples(spec, spec.eval_data, EVAL_SPLITS)
            if spec.choice_data:
                run.choices = choice_items(load_records(spec.choice_data, EVAL_SPLITS),
                                           tokenizer, str(spec.choice_data))
        device = next(model.parameters()).device
        self.model = MoleTrainingModel(
            model, adapters, [options.seed + s.seed_offset for s in specs]).to(device)
        for name, run in self.runs.items():
            params = list(self.model.adapters[name].parameters())
            run.optimizer = torch.optim.AdamW(params, lr=run.spec.lr,
                                              weight_decay=run.spec.weight_decay)
            run.scheduler = torch.optim.lr_scheduler.LambdaLR(
                run.optimizer, _schedule(run.spec, run.total_steps))
            run.stream = batches(run.examples, run.spec.batch_size,
                                 options.seed + run.spec.seed_offset)
        self.micro_step = 0
        self.log = RunLog(self.output, progress=options.progress, resume=options.resume)
        if options.resume:
            self._resume()
            self.log.keep_until(self.micro_step)  # re-run micro-steps are logged again

    def _examples(self, spec: AdapterSpec, source: str,
                  splits: tuple[str, ...] = TRAIN_SPLITS) -> list[Example]:
        tokenized = tokenize(load_records(source, splits), self.tokenizer,
                             cutoff=spec.cutoff_len, train_on_inputs=spec.train_on_inputs,
                             add_eos=self.options.add_eos, source=source)
        rows = len(tokenized.examples) + tokenized.dropped
        where = f"adapter {spec.name!r}, {source}: "
        if tokenized.truncated:
            print(f"warning: {where}{tokenized.truncated} of {rows} rows were longer than "
                  f"cutoff_len={spec.cutoff_len} and were truncated")
        if tokenized.dropped:
            print(f"warning: {where}{tokenized.dropped} of {rows} rows were left out: no "
                  f"answer token within cutoff_len={spec.cutoff_len} (a prompt that fills it, "
                  "or an empty answer)")
        return tokenized.examples

    # -- one micro-step --------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One micro-batch of every unfinished adapter through one forward and backward."""
        active = [run for run in self.runs.values() if not run.done]
        groups = []
        for run in active:
            groups.append(next(run.stream))
            run.batches_taken += 1
        batch = collate(groups, self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        names = [run.spec.name for run, group in zip(active, groups) for _ in group]
        self.model.train()
        for run in active:  # an adapter's dropout masks follow its own progress only
            self.model.adapters[run.spec.name].step = run.micro_steps
        started = time.perf_counter()
        # backward inside too: gradient checkpointing re-runs adapter forwards during it
        with self.model.rows(names, batch["attention_mask"]) as router_log:
            logits = self.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            metrics = self._backward(logits, batch, active, groups, router_log)
        return self._finish_step(active, metrics, int(batch["attention_mask"].sum()), started)

    def _backward(self, logits: torch.Tensor, batch: dict, active: list[AdapterRun],
                  groups: list, router_log) -> dict[str, dict]:
        """Sum every adapter's loss (CE + router losses, over its accumulation) and
        backpropagate once; returns per-adapter metrics."""
        total, metrics, start = 0.0, {}, 0
        for run, group in zip(active, groups):
            rows = slice(start, start + len(group))
            start += len(group)
            ce = causal_lm_loss(logits[rows], batch["labels"][rows])
            aux = torch.zeros((), device=ce.device)
            router_logits = router_log.of(run.spec.name)
            config = self.model.adapters[run.spec.name].config
            if router_logits is not None:
                aux = router_loss(router_logits, config, balance_coef=run.spec.balance_coef,
                                  entropy_coef=run.spec.entropy_coef)
            # each micro-batch's mean weighs the same, however many answer tokens it holds
            # (MoE-PEFT's accumulation, whose adapters these reproduce)
            total = total + (ce + aux) / run.spec.accumulation
            metrics[run.spec.name] = {"loss": ce.item(), "aux": aux.item(),
                                      "load": expert_load(router_logits, config)}
        total.backward()
        return metrics

    def _finish_step(self, active: list[AdapterRun], metrics: dict, tokens: int,
                     started: float) -> dict[str, float]:
        elapsed = time.perf_counter() - started
        for name, m in metrics.items():  # before any optimizer applies the step
            if not (math.isfinite(m["loss"]) and math.isfinite(m["aux"])):
                raise DivergedError(
                    f"adapter {name!r}: the loss is {m['loss']} (router loss {m['aux']}) at "
                    f"micro-step {self.micro_step + 1}: training diverged; lower its lr or "
                    f"keep max_grad_norm on (this run writes no adapter; re-run into another "
                    f"--output-dir or remove its checkpoints)")
        used_lr = {run.spec.name: run.scheduler.get_last_lr()[0] for run in active}
        for run in active:
            run.micro_steps += 1
            run.history.append(metrics[run.spec.name]["loss"])
            if run.micro_steps % run.spec.accumulation == 0:
                if run.spec.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(
                        self.model.adapters[run.spec.name].parameters(), run.spec.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
                run.steps += 1
        self.micro_step += 1
        for run in active:
            m = metrics[run.spec.name]
            self.log.write(step=self.micro_step, adapter=run.spec.name, loss=m["loss"],
                           aux=m["aux"], lr=used_lr[run.spec.name],
                           tokens_per_s=tokens / elapsed, load=m["load"])
        return {name: m["loss"] for name, m in metrics.items()}

    # -- the whole run ---------------------------------------------------------------------
    def train(self) -> dict[str, pathlib.Path]:
        total = sum(r.total_steps * r.spec.accumulation for r in self.runs.values())
        self.log.start(total, initial=sum(r.micro_steps for r in self.runs.values()))
        while any(not r.done for r in self.runs.values()):
            self.step()
            if self.options.save_every and self.micro_step % self.options.save_every == 0:
                self.save_checkpoint()
        self.log.close()
        self._refuse_diverged()  # every adapter before any is written
        paths = {name: self.save_adapter(name, self.output / name) for name in self.runs}
        results = self.evaluate()
        for name, values in results.items():
            print(f"eval {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
        self.log.finish(results)
        return paths

    def evaluate(self) -> dict[str, dict[str, float]]:
        results = {}
        for name, run in self.runs.items():
            values = {}
            if run.eval_examples is not None:
                values.update(heldout_loss(self.model, name, run.eval_examples,
                                           self.tokenizer.pad_token_id))
            if run.choices is not None:
                values["accuracy"] = choice_accuracy(self.model, name, run.choices)
            if values:
                results[name] = values
        return results

    def _refuse_diverged(self) -> None:
        """The last optimizer step can make weights non-finite with no forward after it."""
        for name in self.runs:
            if not all(torch.isfinite(p).all() for p in self.model.adapters[name].parameters()):
                raise DivergedError(f"adapter {name!r}: weights are no longer finite after "
                                    f"micro-step {self.micro_step}: training diverged; lower "
                                    "its lr or keep max_grad_norm on")

    def save_adapter(self, name: str, path: pathlib.Path) -> pathlib.Path:
        adapter = self.model.adapters[name].to_adapter(self.model.base.num_layers)
        return save_adapter(adapter, path, bin=self.options.write_bin)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> pathlib.Path:
        self._refuse_diverged()
        path = self.output / f"checkpoint-{self.micro_step}"
        for name in self.runs:
            self.save_adapter(name, path / name)
        state = {"micro_step": self.micro_step, "runs": {
            name: {"optimizer": run.optimizer.state_dict(),
                   "scheduler": run.scheduler.state_dict(), "micro_steps": run.micro_steps,
                   "steps": run.steps, "batches_taken": run.batches_taken,
                   "history": run.history, "fingerprint": run.fingerprint,
                   # inside an accumulation window: the gradients summed so far
                   "grads": {key: p.grad.detach().cpu() for key, p in
                             self.model.adapters[name].named_parameters()
                             if p.grad is not None}}
            for name, run in self.runs.items()}}
        torch.save(state, path / STATE_NAME)
        return path

    def _fingerprint(self, run: AdapterRun) -> dict:
        """What an adapter's training so far depends on: a resume that changes any of it would
        mix two runs (a new lr, say, would be overwritten by the saved scheduler's)."""
        examples = hashlib.sha256()
        for example in run.examples:
            examples.update(json.dumps([example.input_ids, example.labels]).encode())
        return {**{key: value for key, value in dataclasses.asdict(run.spec).items()
                   if key not in RESUMABLE},
                "seed": self.options.seed, "dtype": self.options.dtype,
                "examples (sha256 of the token ids)": examples.hexdigest()}

    def _resume(self) -> None:
        checkpoints = checkpoints_in(self.output)
        if not checkpoints:
            print(f"resume: no checkpoint in {self.output}, starting fresh")
            return
        path = checkpoints[-1]
        state = torch.load(path / STATE_NAME, weights_only=True)
        if sorted(state["runs"]) != sorted(self.runs):
            raise ResumeError(f"--resume: {path} holds adapters {sorted(state['runs'])}, this "
                             f"run trains {sorted(self.runs)}; resume with the same adapters "
                             "or use another --output-dir")
        self.micro_step = state["micro_step"]
        for name, run in self.runs.items():
            saved = state["runs"][name]
            # keys a later version adds are not in an older checkpoint: not compared (none
            # saved before 2026-11-24)
            then = saved.get("fingerprint", {})
            changed = [f"{key} {then[key]!r} -> {value!r}"
                       for key, value in run.fingerprint.items()
                       if key in then and then[key] != value]
            if changed:
                raise ResumeError(f"--resume: adapter {name!r} changed since {path}: "
                                  f"{'; '.join(changed)}; resume it as it was trained, or use "
                                  "another --output-dir")
            if saved["steps"] > run.total_steps:
                raise ResumeError(f"--resume: adapter {name!r} is at optimizer step "
                                  f"{saved['steps']} in {path}, past this run's "
                                  f"{run.total_steps}: give steps >= {saved['steps']}")
            params = self.model.adapters[name]
            params.copy_from(load_adapter(path / name, name))
            for key, p in params.named_parameters():
                grad = saved.get("grads", {}).get(key)  # none saved before 2026-11-23
                p.grad = None if grad is None else grad.to(p.device, p.dtype)
            run.optimizer.load_state_dict(saved["optimizer"])
            run.scheduler.load_state_dict(saved["scheduler"])
            run.micro_steps, run.steps = saved["micro_steps"], saved["steps"]
            run.history = list(saved["history"])
            for _ in range(saved["batches_taken"]):
                next(run.stream)
            run.batches_taken = saved["batches_taken"]
        print(f"resumed from {path} (micro-step {self.micro_step})")


def checkpoints_in(output: pathlib.Path) -> list[pathlib.Path]:
    """A run's complete checkpoints, oldest first (the state file is written last: a
    checkpoint without it was cut off while saving)."""
    return sorted((p for p in output.glob("checkpoint-*")
                   if p.name.split("-")[1].isdigit() and (p / STATE_NAME).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled (non -100) positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def expert_load(router_logits: torch.Tensor | None, config) -> list[float]:
    """Share of routed (token, expert) selections per expert, for the progress display."""
    if router_logits is None:
        return []
    with torch.no_grad():
        weights, ids = route_config(router_logits.detach(), config)
        keep = (weights > 0).float()
        counts = torch.zeros(router_logits.shape[-1]).index_add(
            0, ids.reshape(-1).cpu(), keep.reshape(-1).cpu())
        return (counts / counts.sum().clamp_min(1)).tolist()
