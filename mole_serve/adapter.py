"""In-memory MoLE adapter: per-layer routers and LoRA factors, plus the base shapes they fit.

Tensors are kept in fp32, as MoE-PEFT trains and stores them; compute code casts as needed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ATTENTION_PROJS, MoleConfig


@dataclass(frozen=True)
class BaseShape:
    """The frozen Llama-family dimensions an adapter must fit."""

    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str | None = None  # the MLP's activation; None = not known

    @classmethod
    def from_hf_config(cls, config: Any) -> "BaseShape":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   num_layers=get("num_hidden_layers"), num_heads=heads,
                   num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
                   hidden_act=get("hidden_act") or get("hidden_activation"))  # Gemma's name

    def in_out(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection of the frozen model."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv),
                "v_proj": (self.hidden, kv), "o_proj": (q, self.hidden),
                "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate),
                "down_proj": (self.intermediate, self.hidden)}[proj]


@dataclass
class LoRA:
    """One plain LoRA pair: delta(x) = scaling * B A x."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]


@dataclass
class ExpertLoRAs:
    """The E expert LoRA pairs of one projection, stacked on dim 0."""

    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]


@dataclass
class MoleLayer:
    """What one decoder layer of an adapter holds.

    MixLoRA: `router` [E, hidden] for the FFN, `experts` for the targeted FFN projections and
    plain `lora` for targeted attention projections. DynMoLE: `routers` and `experts` for
    every targeted projection (attention included). Plain LoRA: `lora` only.
    """

    router: torch.Tensor | None = None
    experts: dict[str, ExpertLoRAs] = field(default_factory=dict)
    routers: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, LoRA] = field(default_factory=dict)


@dataclass
class MoleAdapter:
    name: str
    config: MoleConfig
    layers: list[MoleLayer]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def init_adapter(config: MoleConfig, base: BaseShape, name: str = "adapter", *,
                 generator: torch.Generator | None = None,
                 router_init_range: float | None = None, router_std: float | None = None,
                 b_std: float = 0.0) -> MoleAdapter:
    """A fresh adapter initialised as MoE-PEFT does.

    Routers read `router_init_range` as MoE-PEFT does: MixLoRA's FFN router N(0, range)
    (default 0.02; 1.0 for switch routing), DynMoLE's per-linear routers Kaiming-uniform with
    a = sqrt(range) (default 5.0: nn.Linear's init). A Kaiming-uniform(a=sqrt(5)), B zeros.
    MixLoRA experts record the base's activation when the config leaves it out, as MoE-PEFT
    does: mixlora 0.2.3 cannot load an adapter without one.
    Tests pass `router_std` (every router N(0, std)) and `b_std` to make the adapter change
    outputs and routing visibly.
    """
    def kaiming(*shape: int, a_squared: float = 5.0) -> torch.Tensor:
        bound = math.sqrt(6.0 / (1.0 + a_squared)) / math.sqrt(shape[-1])  # kaiming_uniform_
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    def normal(std: float, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    def router(*shape: int) -> torch.Tensor:
        if router_std is not None:
            return normal(router_std, *shape)
        if config.is_per_linear:
            return kaiming(*shape, a_squared=5.0 if router_init_range is None
                           else router_init_range)
        default = 1.0 if config.routing_strategy == "mixlora-switch" else 0.02
        return normal(default if router_init_range is None else router_init_range, *shape)

    if config.has_ffn_experts and config.act_fn is None:
        config = dataclasses.replace(config, act_fn=base.hidden_act)
    E, r = config.num_experts, config.r
    layers = []
    for _ in range(base.num_layers):
        layer = MoleLayer()
        if config.has_ffn_experts:
            layer.router = router(E, base.hidden)
        expert_projs = config.target_modules if config.is_per_linear else (
            config.ffn_targets if config.has_ffn_experts else ())
        for proj in expert_projs:
            fan_in, fan_out = base.in_out(proj)
            if config.is_per_linear:
                layer.routers[proj] = router(E, fan_in)
            layer.experts[proj] = ExpertLoRAs(kaiming(E, r, fan_in), normal(b_std, E, fan_out, r))
        for proj in config.lora_targets:
            fan_in, fan_out = base.in_out(proj)
            layer.lora[proj] = LoRA(kaiming(r, fan_in), normal(b_std, fan_out, r))
        layers.append(layer)
    return MoleAdapter(name, config, layers)


def is_attention(proj: str) -> bool:
    return proj in ATTENTION_PROJS
