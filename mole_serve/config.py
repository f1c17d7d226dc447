"""MoleConfig: one adapter config for every routing strategy, in MoE-PEFT's on-disk format.

MoE-PEFT (and the `mixlora` package) write `adapter_config.json`; we parse the modern and the
legacy (m-LoRA: `"mixtral"`, `w1/w2/w3_proj`) spellings and DynMoLE's, validate them with
errors that name the adapter, the field and the expected value, and write the modern form
back so the peers can load what we produce.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"

MIXLORA = "mixlora"
MIXLORA_DYNAMIC = "mixlora-dynamic"
MIXLORA_SWITCH = "mixlora-switch"
DYNMOLE = "dynmole"
PLAIN_LORA = "lora"  # a PEFT LoRA: the baseline, and what vLLM serves natively
STRATEGIES = (MIXLORA, MIXLORA_DYNAMIC, MIXLORA_SWITCH, DYNMOLE, PLAIN_LORA)
FFN_EXPERT_STRATEGIES = (MIXLORA, MIXLORA_DYNAMIC, MIXLORA_SWITCH)

PEFT_TYPE_OF = {MIXLORA: "MIXLORA", MIXLORA_DYNAMIC: "MIXLORA", MIXLORA_SWITCH: "MIXLORA",
                DYNMOLE: "DYNMOLE", PLAIN_LORA: "LORA"}

ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
ALL_PROJS = ATTENTION_PROJS + FFN_PROJS
MOE_PEFT_ORDER = ATTENTION_PROJS + ("gate_proj", "down_proj", "up_proj")  # how it writes lists

LEGACY_STRATEGIES = {"mixtral": MIXLORA, "switch": MIXLORA_SWITCH}
# Adapter families a server can be limited to (the layers they need differ): FFN-level experts
# with attention LoRA, or a router on every adapted linear.
FAMILIES = {"mixlora": FFN_EXPERT_STRATEGIES, "dynmole": (DYNMOLE,)}
LEGACY_PROJS = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
_SAME_AS = {"gelu_new": "gelu_pytorch_tanh"}  # transformers' names for one function


def same_activation(a: str, b: str) -> bool:
    return _SAME_AS.get(a, a) == _SAME_AS.get(b, b)

# Fields we interpret. Anything else in a config file is kept verbatim and written back.
_KNOWN_KEYS = {
    "peft_type", "routing_strategy", "num_experts", "r", "lora_alpha", "lora_dropout",
    "target_modules", "top_k", "top_p", "temperature", "keep_top_k", "entropy_threshold",
    "entropy_index", "entropy_eps", "entropy_type", "expert_capacity",
    "sparse_step", "use_rslora", "use_dora", "act_fn", "base_model_name_or_path", "task_type",
    "bias", "expert_lora", "fan_in_fan_out",
}


# PEFT inits that only set the first adapter weights (vLLM's list): a saved adapter of one of
# them is a plain LoRA on the unmodified base.
BASE_PRESERVING_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})


@dataclass(frozen=True)
class AdapterLimits:
    """What a server (or caller) can hold; None means unlimited."""

    max_rank: int | None = None
    max_experts: int | None = None


@dataclass(frozen=True)
class MoleConfig:
    """One MoLE adapter: routing strategy, experts, LoRA shape and the routing knobs.

    `top_k` applies to `mixlora`; `top_p` and `temperature` to `mixlora-dynamic`;
    `top_p`, `keep_top_k` and the entropy fields to `dynmole` (per-linear routers).
    Attention projections in `target_modules` carry plain LoRA for MixLoRA and routed
    experts for DynMoLE.
    """

    routing_strategy: str
    num_experts: int
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    lora_dropout: float = 0.05
    top_k: int = 2
    top_p: float = 0.8
    temperature: float = 0.0
    keep_top_k: int = 2
    entropy_threshold: float = 0.9
    entropy_index: float = 1.1
    entropy_eps: float = 1e-5
    expert_capacity: int = 32
    use_rslora: bool = False
    act_fn: str | None = None  # the experts' activation; None = the base model's (as the peers)
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # -- derived -------------------------------------------------------------------------
    @property
    def peft_type(self) -> str:
        return PEFT_TYPE_OF[self.routing_strategy]

    @property
    def scaling(self) -> float:
        """LoRA scale s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def is_per_linear(self) -> bool:
        """DynMoLE puts a router on every adapted linear instead of one per FFN."""
        return self.routing_strategy == DYNMOLE

    @property
    def has_ffn_experts(self) -> bool:
        """The MixLoRA family: one router per FFN, experts are whole FFNs."""
        return self.routing_strategy in FFN_EXPERT_STRATEGIES

    @property
    def family(self) -> str | None:
        """Key of FAMILIES the strategy belongs to; None for plain LoRA."""
        return next((f for f, members in FAMILIES.items() if self.routing_strategy in members),
                    None)

    @property
    def is_plain_lora(self) -> bool:
        return self.routing_strategy == PLAIN_LORA

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """Projections carrying one plain LoRA pair (MixLoRA: attention; plain LoRA: all)."""
        if self.is_plain_lora:
            return self.target_modules
        return self.attention_targets if self.has_ffn_experts else ()

    @property
    def max_experts_per_token(self) -> int:
        """k_max: how many expert slots a token can need (static shapes use this)."""
        if self.routing_strategy == MIXLORA:
            return self.top_k
        if self.routing_strategy == MIXLORA_SWITCH:
            return 1
        return 0 if self.is_plain_lora else self.num_experts

    @property
    def ffn_targets(self) -> tuple[str, ...]:
        return tuple(p for p in FFN_PROJS if p in self.target_modules)

    @property
    def attention_targets(self) -> tuple[str, ...]:
        return tuple(p for p in ATTENTION_PROJS if p in self.target_modules)

    # -- parsing --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], adapter: str = "<adapter>",
                  limits: AdapterLimits | None = None) -> "MoleConfig":
        """Parse MoE-PEFT / mixlora / DynMoLE / legacy m-LoRA config dicts."""
        if not isinstance(raw, dict):
            raise AdapterError(adapter, CONFIG_NAME, "a JSON object", type(raw).__name__)

        def need(key: str) -> Any:
            if key not in raw:
                raise AdapterError(adapter, f"{CONFIG_NAME}:{key}", "present", "missing")
            return raw[key]

        peft_type = str(raw.get("peft_type", "")).upper()
        expert_lora = raw.get("expert_lora") or {}
        if not isinstance(expert_lora, dict):
            raise AdapterError(adapter, f"{CONFIG_NAME}:expert_lora", "a JSON object",
                               repr(expert_lora))
        for key, source in (("use_dora", raw), ("expert_lora.use_dora", expert_lora)):
            if _flag(adapter, key, source.get("use_dora")):
                raise AdapterError(
                    adapter, f"{CONFIG_NAME}:{key}", "false",
                    "true (DoRA is refused: MoE-PEFT does not save the DoRA magnitude vectors, "
                    "so the checkpoint cannot reproduce the trained model)")
        strategy = raw.get("routing_strategy")
        if strategy is None and peft_type in ("DYNMOLE", "LORA"):
            strategy = DYNMOLE if peft_type == "DYNMOLE" else PLAIN_LORA
        if strategy == PLAIN_LORA:
            _check_plain_lora(raw, adapter)
        if isinstance(strategy, str):
            strategy = LEGACY_STRATEGIES.get(strategy, strategy)
        if strategy not in STRATEGIES:
            raise AdapterError(adapter, f"{CONFIG_NAME}:routing_strategy",
                               f"one of {list(STRATEGIES)}", repr(raw.get("routing_strategy")))
        if peft_type and peft_type != PEFT_TYPE_OF[strategy]:
            raise AdapterError(adapter, f"{CONFIG_NAME}:peft_type",
                               f"{PEFT_TYPE_OF[strategy]!r} for routing {strategy!r}",
                               repr(raw.get("peft_type")))

        # The peers build the experts' LoRA from the top level updated with expert_lora, so a
        # key set there alone applies to the experts only (e.g. rsLoRA scaling).
        for key in ("r", "lora_alpha", "use_rslora"):
            top = _flag(adapter, key, raw.get(key)) if key == "use_rslora" else raw.get(key)
            if key in expert_lora and expert_lora[key] != top:
                raise AdapterError(
                    adapter, f"{CONFIG_NAME}:expert_lora.{key}", f"equal to top-level {key} "
                    f"({top!r}); experts scaled or shaped unlike the other LoRA layers are "
                    "not supported", repr(expert_lora[key]))

        targets = need("target_modules")
        if isinstance(targets, dict):
            targets = [name for name, on in targets.items() if on]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(adapter, f"{CONFIG_NAME}:target_modules",
                               "a list of module names", repr(targets))
        targets = [LEGACY_PROJS.get(t, t) for t in targets]
        unknown = [t for t in targets if t not in ALL_PROJS]
        if unknown:
            raise AdapterError(adapter, f"{CONFIG_NAME}:target_modules",
                               f"names among {list(ALL_PROJS)}", repr(unknown))

        if "broadcast_threshhold" in raw:
            raise AdapterError(
                adapter, f"{CONFIG_NAME}:broadcast_threshhold", "'entropy_threshold' (the "
                "released DynMoLE rule)", "an early DynMoLE config whose broadcast compared an "
                "unnormalised entropy; its threshold cannot be translated")
        defaults = {MIXLORA_DYNAMIC: {"top_p": 0.8}, DYNMOLE: {"top_p": 0.75}}.get(strategy, {})
        threshold = raw.get("entropy_threshold", 0.9)
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_KEYS}
        config = cls(
            routing_strategy=strategy,
            num_experts=_integer(adapter, "num_experts", 1 if strategy == PLAIN_LORA
                                 else need("num_experts")),
            r=_integer(adapter, "r", need("r")),
            lora_alpha=_integer(adapter, "lora_alpha", need("lora_alpha")),
            target_modules=tuple(p for p in ALL_PROJS if p in targets),
            lora_dropout=_number(adapter, "lora_dropout", raw.get("lora_dropout", 0.0)),
            top_k=_integer(adapter, "top_k", raw.get("top_k", 2)),
            top_p=_number(adapter, "top_p", raw.get("top_p", defaults.get("top_p", 0.8))),
            temperature=_number(adapter, "temperature", raw.get("temperature", 0.0)),
            keep_top_k=_integer(adapter, "keep_top_k", raw.get("keep_top_k", 2)),
            entropy_threshold=_number(adapter, "entropy_threshold", threshold),
            entropy_index=_number(adapter, "entropy_index", raw.get("entropy_index", 1.1)),
            entropy_eps=_number(adapter, "entropy_eps", raw.get("entropy_eps", 1e-5)),
            expert_capacity=_integer(adapter, "expert_capacity", raw.get("expert_capacity", 32)),
            use_rslora=_flag(adapter, "use_rslora", raw.get("use_rslora")),
            act_fn=raw.get("act_fn") or None,
            base_model_name_or_path=raw.get("base_model_name_or_path") or None,
            task_type=raw.get("task_type", "CAUSAL_LM"),
            extra=extra,
        )
        if raw.get("entropy_type", "tsallis") != "tsallis":
            raise AdapterError(adapter, f"{CONFIG_NAME}:entropy_type", "'tsallis'",
                               repr(raw.get("entropy_type")))
        config.validate(adapter, limits)
        return config

    def validate(self, adapter: str = "<adapter>", limits: AdapterLimits | None = None) -> None:
        """Raise AdapterError for values no strategy can serve or the limits exclude."""
        def check(ok: bool, key: str, expected: str, found: Any) -> None:
            if not ok:
                raise AdapterError(adapter, f"{CONFIG_NAME}:{key}", expected, repr(found))

        check(self.num_experts >= 1, "num_experts", ">= 1", self.num_experts)
        check(self.r >= 1, "r", ">= 1", self.r)
        check(self.lora_alpha > 0, "lora_alpha", "> 0", self.lora_alpha)
        check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)", self.lora_dropout)
        check(len(self.target_modules) > 0, "target_modules", "at least one module",
              list(self.target_modules))
        check(all(t in ALL_PROJS for t in self.target_modules), "target_modules",
              f"names among {list(ALL_PROJS)}", list(self.target_modules))
        check(self.act_fn is None or self.act_fn in ACTIVATIONS, "act_fn",
              f"one of {list(ACTIVATIONS)}", self.act_fn)
        if self.routing_strategy == MIXLORA:
            check(1 <= self.top_k <= self.num_experts, "top_k",
                  f"in [1, num_experts={self.num_experts}]", self.top_k)
        if self.routing_strategy in (MIXLORA_DYNAMIC, DYNMOLE):
            check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
            check(self.temperature >= 0.0, "temperature", ">= 0", self.temperature)
        if self.routing_strategy == DYNMOLE:
            # DynMoLE accepts a floor above num_experts (it keeps every expert) and asserts a
            # positive threshold (0 would broadcast every token to every expert).
            check(self.keep_top_k >= 1, "keep_top_k", ">= 1", self.keep_top_k)
            check(self.entropy_threshold > 0.0, "entropy_threshold", "> 0",
                  self.entropy_threshold)
            check(0.0 < self.entropy_index <= 2.0, "entropy_index", "in (0, 2]",
                  self.entropy_index)
            # > 0 as DynMoLE asserts: log(p + eps) of a zero probability is -inf otherwise
            check(self.entropy_eps > 0.0, "entropy_eps", "> 0", self.entropy_eps)
        if limits is not None:
            if limits.max_rank is not None:
                check(self.r <= limits.max_rank, "r", f"<= the server's max rank "
                      f"{limits.max_rank}", self.r)
            if limits.max_experts is not None:
                check(self.num_experts <= limits.max_experts, "num_experts",
                      f"<= the server's max experts {limits.max_experts}", self.num_experts)

    # -- writing --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The modern MoE-PEFT layout (field order as MoE-PEFT writes it); PEFT's for LoRA."""
        if self.is_plain_lora:
            return self._peft_lora_dict()
        out: dict[str, Any] = {}
        if self.use_rslora:
            out["use_rslora"] = True
        # The peers assert exact JSON types: ints for r / lora_alpha, floats for the rest.
        out.update(bias="none", peft_type=self.peft_type, r=int(self.r),
                   lora_alpha=int(self.lora_alpha), lora_dropout=float(self.lora_dropout),
                   target_modules=[p for p in MOE_PEFT_ORDER if p in self.target_modules],
                   routing_strategy=self.routing_strategy, num_experts=self.num_experts)
        if self.act_fn is not None:
            out["act_fn"] = self.act_fn
        if self.routing_strategy == MIXLORA:
            out["top_k"] = self.top_k
        elif self.routing_strategy == MIXLORA_DYNAMIC:
            out.update(top_p=float(self.top_p), temperature=float(self.temperature))
        elif self.routing_strategy == MIXLORA_SWITCH:
            out.update(expert_capacity=self.expert_capacity, sparse_step=None)
        else:
            out.update(top_p=float(self.top_p), keep_top_k=int(self.keep_top_k),
                       entropy_threshold=float(self.entropy_threshold),
                       entropy_index=float(self.entropy_index), entropy_type="tsallis",
                       entropy_eps=float(self.entropy_eps))
        out.update(self.extra)
        # mixlora refuses a non-string base path; "" says "unknown" and still loads there.
        out["base_model_name_or_path"] = self.base_model_name_or_path or ""
        out["task_type"] = self.task_type
        return out

    def _peft_lora_dict(self) -> dict[str, Any]:
        """A PEFT `LoraConfig` that PEFT, vLLM and MoE-PEFT all read."""
        out = {"peft_type": "LORA", "task_type": self.task_type,
               "base_model_name_or_path": self.base_model_name_or_path or "",
               "r": int(self.r), "lora_alpha": int(self.lora_alpha),
               "lora_dropout": float(self.lora_dropout),
               "target_modules": [p for p in MOE_PEFT_ORDER if p in self.target_modules],
               "bias": "none", "use_rslora": self.use_rslora, "use_dora": False,
               "fan_in_fan_out": False}
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> "MoleConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, adapter_dir: str | pathlib.Path, adapter: str | None = None,
             limits: AdapterLimits | None = None) -> "MoleConfig":
        adapter = adapter or pathlib.Path(adapter_dir).name
        return cls.from_dict(read_config_json(adapter_dir, adapter), adapter, limits)

    def save(self, adapter_dir: str | pathlib.Path) -> None:
        path = pathlib.Path(adapter_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_config_json(adapter_dir: str | pathlib.Path, adapter: str) -> dict[str, Any]:
    """The adapter dir's config.json as a dict (AdapterError when missing or not JSON)."""
    path = pathlib.Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(adapter, CONFIG_NAME, f"a file at {path}", "no such file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(adapter, CONFIG_NAME, "valid JSON", str(exc)) from None
    except OSError as exc:
        raise AdapterError(adapter, CONFIG_NAME, "a readable file", str(exc)) from None
    if not isinstance(raw, dict):
        raise AdapterError(adapter, CONFIG_NAME, "a JSON object", type(raw).__name__)
    return raw


def _check_plain_lora(raw: dict[str, Any], adapter: str) -> None:
    """PEFT LoRA options that change the math and that we do not implement are refused (the
    set vLLM's own loader refuses, and per-layer selections the reference does not build)."""
    for key, expected in (
            ("rank_pattern", "empty (one rank and alpha for every module)"),
            ("alpha_pattern", "empty (one rank and alpha for every module)"),
            ("modules_to_save", "empty"), ("trainable_token_indices", "empty"),
            ("layers_to_transform", "empty (every layer adapted)"),
            ("layers_pattern", "empty (every layer adapted)"),
            ("layer_replication", "empty (the base's layers as they are)"),
            ("alora_invocation_tokens", "empty (Activated LoRA, which applies from its "
                                        "invocation tokens on, is not implemented)"),
            ("use_bdlora", "empty (block-diagonal LoRA is not implemented)"),
            ("lora_bias", "false (LoRA bias is not implemented)"),
            ("use_qalora", "false (QALoRA is not implemented)"),
            ("fan_in_fan_out", "false")):
        if raw.get(key):
            raise AdapterError(adapter, f"{CONFIG_NAME}:{key}", expected, repr(raw[key]))
    if raw.get("bias", "none") != "none":
        raise AdapterError(adapter, f"{CONFIG_NAME}:bias", "'none'", repr(raw["bias"]))
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in BASE_PRESERVING_INITS:
        raise AdapterError(adapter, f"{CONFIG_NAME}:init_lora_weights", "an init that leaves "
                           f"the base weights unchanged (true, false or one of "
                           f"{sorted(BASE_PRESERVING_INITS)}): PiSSA, OLoRA, CorDA and LoftQ "
                           "adapters apply to a modified base", repr(init))


def _integer(adapter: str, key: str, value: Any) -> int:
    """MoE-PEFT asserts ints (e.g. `lora_alpha`); accept 16.0 but refuse 16.5 or "16"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise AdapterError(adapter, f"{CONFIG_NAME}:{key}", "an integer", repr(value))
    return int(value)


def _flag(adapter: str, key: str, value: Any) -> bool:
    """A JSON boolean (absent or null = false), as the peers' config checks assert; read
    without them, the string "false" would count as true."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise AdapterError(adapter, f"{CONFIG_NAME}:{key}", "true or false", repr(value))


def _number(adapter: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(adapter, f"{CONFIG_NAME}:{key}", "a finite number", repr(value))
    return float(value)
