"""What a training run is told: run options plus one spec per adapter (MoE-PEFT-template-like).

A run is described by flags (one adapter) or by a JSON / YAML file (any number of adapters,
each with its own data, hyper-parameters and optimizer), e.g.

    {"base_model": "BASE", "output_dir": "out", "scheduler": "cosine",
     "adapters": [{"name": "math", "data": "math.jsonl", "strategy": "mixlora", "steps": 200},
                  {"name": "code", "data": "code.jsonl", "strategy": "dynmole", "lr": 1e-4,
                   "scheduler": "constant", "warmup_steps": 10}]}

The run's `scheduler`, `warmup_steps`, `cutoff_len` and `train_on_inputs` are defaults that an
adapter may override.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import types
import typing
import zlib
from dataclasses import dataclass, field
from typing import Any

from mole_serve.config import (ALL_PROJS, CONFIG_NAME, DYNMOLE, FFN_PROJS, MIXLORA,
                               MIXLORA_DYNAMIC, MIXLORA_SWITCH, PLAIN_LORA, STRATEGIES,
                               MoleConfig)
from mole_serve.errors import AdapterError


class OptionsError(ValueError):
    """Run or adapter options that cannot work; names the option."""


@dataclass
class AdapterSpec:
    """One adapter to train: its data, its MoLE shape and its optimizer."""

    name: str
    data: str
    strategy: str = "mixlora"
    num_experts: int = 8
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    attention: bool = True
    target_modules: list[str] | None = None
    top_k: int = 2
    top_p: float | None = None
    temperature: float = 0.0
    keep_top_k: int = 2
    entropy_threshold: float = 0.9
    entropy_index: float = 1.1
    use_rslora: bool = False
    router_init_range: float | None = None
    lr: float = 2e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0      # gradient clipping per optimizer step; 0 turns it off
    batch_size: int = 8
    accumulation: int = 1
    steps: int | None = None
    epochs: float = 1.0
    balance_coef: float = 0.001
    entropy_coef: float = 0.01
    eval_data: str | None = None
    choice_data: str | None = None
    # Left None, these take the run's value (MoE-PEFT gives each adapter its own LR scheduler).
    scheduler: str | None = None
    warmup_steps: int | None = None
    cutoff_len: int | None = None
    train_on_inputs: bool | None = None

    def mole_config(self, base_model: str | None) -> MoleConfig:
        targets = tuple(self.target_modules) if self.target_modules else (
            ALL_PROJS if self.attention else FFN_PROJS)
        top_p = self.top_p if self.top_p is not None else (
            0.75 if self.strategy == "dynmole" else 0.8)
        config = MoleConfig(
            routing_strategy=self.strategy, num_experts=1 if self.strategy == "lora"
            else self.num_experts, r=self.r, lora_alpha=self.lora_alpha,
            target_modules=targets, lora_dropout=self.lora_dropout, top_k=self.top_k,
            top_p=top_p, temperature=self.temperature, keep_top_k=self.keep_top_k,
            entropy_threshold=self.entropy_threshold, entropy_index=self.entropy_index,
            use_rslora=self.use_rslora,
            base_model_name_or_path=_absolute(base_model))
        config.validate(self.name)
        return config

    @property
    def seed_offset(self) -> int:
        """Per-adapter seed: an adapter's init, data order and dropout depend on the run seed
        and its name only, so training it with others gives what training it alone gives."""
        return zlib.crc32(self.name.encode())


@dataclass
class TrainOptions:
    base_model: str
    output_dir: str
    adapters: list[AdapterSpec] = field(default_factory=list)
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    cutoff_len: int = 512
    train_on_inputs: bool = False
    add_eos: bool = True
    scheduler: str = "constant"
    warmup_steps: int = 0
    seed: int = 42
    save_every: int = 0
    resume: bool = False
    write_bin: bool = False
    pad_token: str | None = None
    progress: bool = True
    device: str | None = None      # None: "cuda" when available, else "cpu"

    def adapter_specs(self) -> list[AdapterSpec]:
        """The adapters, each with the run's value of every per-adapter option it leaves
        unset (copies: `adapters` stays as given, so a later change of a run default holds)."""
        return [dataclasses.replace(spec, **{key: getattr(self, key) for key in RUN_DEFAULTS
                                             if getattr(spec, key) is None})
                for spec in self.adapters]

    def validate(self) -> None:
        """Refuse what would fail later, naming the option (the adapters as they will run)."""
        if not self.adapters:
            raise OptionsError("no adapters to train: give --data (and --name) or a config file "
                               "with an 'adapters' list")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise OptionsError(f"adapter names must be unique, got {names}")
        odd = [name for name in names if not ADAPTER_NAME.fullmatch(name)]
        if odd:  # each names a dir under output_dir and a module of the training model
            raise OptionsError(f"adapter names must be letters, digits, '_' and '-' (not "
                               f"first), got {odd}")
        if self.save_every < 0:
            raise OptionsError(f"save_every must be >= 0 (0: no checkpoints), got "
                               f"{self.save_every}")
        if self.dtype not in ("float32", "bfloat16"):
            raise OptionsError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.device is not None:
            _check_device(self.device)
        _check_schedule("run", self)
        for spec in self.adapter_specs():
            _check_adapter(spec, self)


def _check_adapter(spec: AdapterSpec, run: TrainOptions) -> None:
    """An adapter's options, before the base model loads (minutes at 7B)."""
    where = f"adapter {spec.name!r}"
    _check_schedule(where, spec)
    if spec.strategy not in TRAINABLE:
        raise OptionsError(f"{where}: strategy must be one of {list(TRAINABLE)}, got "
                           f"{spec.strategy!r}" + (" (switch routing's expert capacity and "
                           "jitter are not trained here; the server serves MoE-PEFT's switch "
                           "adapters)" if spec.strategy == MIXLORA_SWITCH else ""))
    for key, ok, rule in (("batch_size", spec.batch_size >= 1, ">= 1"),
                          ("accumulation", spec.accumulation >= 1, ">= 1"),
                          ("lr", spec.lr > 0, "> 0"), ("epochs", spec.epochs > 0, "> 0"),
                          ("steps", spec.steps is None or spec.steps >= 1, ">= 1"),
                          ("weight_decay", spec.weight_decay >= 0, ">= 0"),
                          ("max_grad_norm", spec.max_grad_norm >= 0, ">= 0 (0: off)"),
                          ("balance_coef", spec.balance_coef >= 0, ">= 0"),
                          ("router_init_range", spec.router_init_range is None
                           or spec.router_init_range >= 0, ">= 0"),
                          ("entropy_coef", spec.entropy_coef >= 0, ">= 0")):
        if not ok:
            raise OptionsError(f"{where}: {key} must be {rule}, got {getattr(spec, key)!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(AdapterSpec)}
    for key, strategies in ONLY_FOR.items():
        if getattr(spec, key) != defaults[key] and spec.strategy not in strategies:
            raise OptionsError(f"{where}: {key} applies to {' / '.join(strategies)} only, not "
                               f"to {spec.strategy} (it would be ignored)")
    if spec.target_modules and not spec.attention:
        raise OptionsError(f"{where}: give target_modules or attention=false (--no-attention), "
                           "not both")
    try:
        config = spec.mole_config(run.base_model)
    except AdapterError as exc:  # named as the option, not as the config file it becomes
        option = exc.item.removeprefix(f"{CONFIG_NAME}:")
        raise OptionsError(f"{where}: {option} must be {exc.expected}, got {exc.found}") from None
    if config.has_ffn_experts and not config.ffn_targets:
        raise OptionsError(f"{where}: {spec.strategy}'s experts are FFNs: target_modules "
                           f"must include one of {list(FFN_PROJS)} (a plain LoRA on attention "
                           f"alone: strategy lora), got {list(config.target_modules)}")
    if run.write_bin and spec.lora_dropout == 0:
        raise OptionsError(f"{where}: lora_dropout 0 with write_bin: MoE-PEFT and mixlora "
                           "assert lora_dropout > 0 when they load an adapter (e.g. 0.05)")


RUN_DEFAULTS = ("scheduler", "warmup_steps", "cutoff_len", "train_on_inputs")
TRAINABLE = tuple(s for s in STRATEGIES if s != MIXLORA_SWITCH)
MOLE_STRATEGIES = tuple(s for s in TRAINABLE if s != PLAIN_LORA)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Options only some strategies read: set to another value for any other, they are refused.
ONLY_FOR = {"top_k": (MIXLORA,), "top_p": (MIXLORA_DYNAMIC, DYNMOLE),
            "temperature": (MIXLORA_DYNAMIC,), "keep_top_k": (DYNMOLE,),
            "entropy_threshold": (DYNMOLE,), "entropy_index": (DYNMOLE,),
            "entropy_coef": (DYNMOLE,), "num_experts": MOLE_STRATEGIES,
            "balance_coef": MOLE_STRATEGIES, "router_init_range": MOLE_STRATEGIES}


def _check_schedule(where: str, options: TrainOptions | AdapterSpec) -> None:
    if options.scheduler not in ("constant", "cosine"):
        raise OptionsError(f"{where}: scheduler must be constant or cosine, "
                           f"got {options.scheduler!r}")
    for key, least in (("warmup_steps", 0), ("cutoff_len", 2)):
        if getattr(options, key) < least:
            raise OptionsError(f"{where}: {key} must be >= {least}, got {getattr(options, key)}")


def _absolute(base_model: str | None) -> str | None:
    """A local base dir as an absolute path (mixlora loads the base from the adapter's config,
    from wherever it runs); a (cached) hub id as it is."""
    if base_model and pathlib.Path(base_model).exists():
        return str(pathlib.Path(base_model).resolve())
    return base_model


def _check_device(name: str) -> None:
    import torch
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionsError(f"device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"device {name!r}: this torch sees no CUDA device")


def load_options_file(path: str | pathlib.Path) -> dict[str, Any]:
    """A JSON or YAML run description as a plain dict; errors name the file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OptionsError(f"{path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise OptionsError(f"{path}: invalid YAML ({exc})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionsError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise OptionsError(f"{path}: expected a mapping of run options, found "
                           f"{type(raw).__name__}")
    return raw


def options_from_dict(raw: dict[str, Any]) -> TrainOptions:
    """Build options from a file's dict, refusing unknown keys (typos would be silent)."""
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise OptionsError(f"unknown run option(s) {unknown}; known: {sorted(known)}")
    adapter_fields = {f.name for f in dataclasses.fields(AdapterSpec)}
    specs = []
    items = raw.get("adapters", [])
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise OptionsError(f"'adapters' must be a list of objects (one per adapter), got "
                           f"{items!r:.80}")
    required = [f.name for f in dataclasses.fields(AdapterSpec)
                if f.default is dataclasses.MISSING]
    for number, item in enumerate(items, start=1):
        bad = sorted(set(item) - adapter_fields)
        if bad:
            raise OptionsError(f"unknown adapter option(s) {bad}; known: {sorted(adapter_fields)}")
        missing = [key for key in required if key not in item]
        if missing:
            raise OptionsError(f"adapter {number} ({item.get('name', 'unnamed')}): missing "
                               f"{missing} (--{missing[0]} for one adapter from flags)")
        specs.append(AdapterSpec(**_typed(AdapterSpec, item, f"adapter {item.get('name')!r}")))
    run = _typed(TrainOptions, {k: v for k, v in raw.items() if k != "adapters"}, "run")
    options = TrainOptions(**run, adapters=specs)
    options.validate()
    return options


def _typed(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` checked against `cls`'s field types. Numbers written as text become numbers
    (YAML reads `lr: 2e-4` as a string); anything else of the wrong type is refused here,
    not deep inside the first training step."""
    hints = typing.get_type_hints(cls)
    typed = {}
    for key, value in values.items():
        hint = hints[key]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = typing.get_args(hint) if union else (hint,)
        if value is None and type(None) in allowed:
            typed[key] = value
            continue
        kind = next(t for t in allowed if t is not type(None))
        typed[key] = _as(kind, value, f"{where}: {key}")
    return typed


def _as(kind: Any, value: Any, where: str) -> Any:
    if kind is float and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number):
            return number
    elif kind is int and not isinstance(value, (bool, float)):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    elif kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    elif typing.get_origin(kind) is list and isinstance(value, list) and all(
            isinstance(v, str) for v in value):
        return value
    expected = "a finite number" if kind is float else getattr(kind, "__name__", str(kind))
    raise OptionsError(f"{where} must be {expected}, got {value!r}")
