"""Slot-stacked adapter weights: what a server keeps per layer for `max_loras` adapter slots.

A batch is served with one set of tensors whatever adapters its tokens use: slot `s` holds
adapter `s`'s factors (zero-padded to the largest rank and expert count, which is exact:
padded ranks add zero, padded experts get probability 0), and every token indexes its slot.
Layouts follow DESIGN §1 rewrite 3 (gate and up shrinks fused: `[S, E, 2r, H]`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .adapter import BaseShape, MoleAdapter
from .config import ATTENTION_PROJS, FFN_PROJS
from .routing import NUM_COLUMNS, routing_row


@dataclass
class MixLoRAStack:
    """FFN-level experts (MixLoRA family) of one layer for S slots."""

    router: torch.Tensor       # [S, E, H] fp32
    gate_up_a: torch.Tensor    # [S, E, 2r, H]  rows [0, r) gate shrink, [r, 2r) up shrink
    gate_up_b: torch.Tensor    # [S, E, 2, I, r]
    down_a: torch.Tensor       # [S, E, r, I]
    down_b: torch.Tensor       # [S, E, H, r]
    scaling: torch.Tensor      # [S] fp32
    routing: torch.Tensor      # [S, NUM_COLUMNS] fp32 routing table
    enabled: torch.Tensor      # [S] bool: slot holds a MixLoRA-family adapter
    k_max: int


@dataclass
class GatedLoRAStack:
    """Per-linear routed experts (DynMoLE family) of one projection for S slots."""

    router: torch.Tensor       # [S, E, in] fp32
    a: torch.Tensor            # [S, E, r, in]
    b: torch.Tensor            # [S, E, out, r]
    scaling: torch.Tensor      # [S]
    routing: torch.Tensor      # [S, NUM_COLUMNS]
    enabled: torch.Tensor      # [S] bool
    k_max: int


@dataclass
class LoRAStack:
    """Plain LoRA of one projection for S slots (MixLoRA's attention LoRA, PEFT LoRA)."""

    a: torch.Tensor            # [S, r, in]
    b: torch.Tensor            # [S, out, r]
    scaling: torch.Tensor      # [S]
    enabled: torch.Tensor      # [S] bool


@dataclass
class LayerStack:
    """Everything one decoder layer needs; projections absent from every adapter are omitted."""

    ffn: MixLoRAStack | None
    gated: dict[str, GatedLoRAStack]
    lora: dict[str, LoRAStack]

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "LayerStack":
        """Move (and cast the LoRA factors, never the routing tables) in place."""
        for part in [self.ffn, *self.gated.values(), *self.lora.values()]:
            if part is None:
                continue
            for f in fields(part):
                value = getattr(part, f.name)
                if isinstance(value, torch.Tensor):
                    cast = dtype if (dtype is not None and f.name in _FACTORS) else None
                    setattr(part, f.name, value.to(device=device, dtype=cast))
        return self


_FACTORS = {"gate_up_a", "gate_up_b", "down_a", "down_b", "a", "b"}


def stack_layer(slots: list[MoleAdapter | None], layer: int, base: BaseShape) -> LayerStack:
    """Stack layer `layer` of the adapters in `slots` (None = empty slot)."""
    present = [a for a in slots if a is not None]
    ffn = _stack_mixlora(slots, layer, base) if any(
        a.config.has_ffn_experts for a in present) else None
    gated = {}
    for proj in ATTENTION_PROJS + FFN_PROJS:
        users = [a for a in present if a.config.is_per_linear and proj in a.config.target_modules]
        if users:
            gated[proj] = _stack_gated(slots, layer, proj, base)
    lora = {}
    for proj in ATTENTION_PROJS + FFN_PROJS:
        if any(proj in a.config.lora_targets for a in present):
            lora[proj] = _stack_lora(slots, layer, proj, base)
    return LayerStack(ffn, gated, lora)


def _sizes(adapters: list[MoleAdapter]) -> tuple[int, int]:
    return max(a.config.num_experts for a in adapters), max(a.config.r for a in adapters)


def _common(slots: list[MoleAdapter | None], uses) -> tuple[torch.Tensor, ...]:
    """Per-slot scaling, routing table and enabled flag for the slots `uses` selects."""
    scaling = torch.zeros(len(slots))
    table = torch.zeros(len(slots), NUM_COLUMNS)
    enabled = torch.zeros(len(slots), dtype=torch.bool)
    for s, a in enumerate(slots):
        if a is not None and uses(a):
            scaling[s], enabled[s] = a.config.scaling, True
            if not a.config.is_plain_lora:
                table[s] = routing_row(a.config)
    return scaling, table, enabled


def _stack_mixlora(slots: list[MoleAdapter | None], layer: int, base: BaseShape) -> MixLoRAStack:
    users = [a for a in slots if a is not None and a.config.has_ffn_experts]
    E, r = _sizes(users)
    S, H, I = len(slots), base.hidden, base.intermediate
    router = torch.zeros(S, E, H)
    gate_up_a, gate_up_b = torch.zeros(S, E, 2 * r, H), torch.zeros(S, E, 2, I, r)
    down_a, down_b = torch.zeros(S, E, r, I), torch.zeros(S, E, H, r)
    for s, a in enumerate(slots):
        if a is None or not a.config.has_ffn_experts:
            continue
        w, e, ra = a.layers[layer], a.config.num_experts, a.config.r
        router[s, :e] = w.router
        if "gate_proj" in w.experts:
            gate_up_a[s, :e, :ra] = w.experts["gate_proj"].a
            gate_up_b[s, :e, 0, :, :ra] = w.experts["gate_proj"].b
        if "up_proj" in w.experts:
            gate_up_a[s, :e, r:r + ra] = w.experts["up_proj"].a
            gate_up_b[s, :e, 1, :, :ra] = w.experts["up_proj"].b
        if "down_proj" in w.experts:
            down_a[s, :e, :ra] = w.experts["down_proj"].a
            down_b[s, :e, :, :ra] = w.experts["down_proj"].b
    scaling, table, enabled = _common(slots, lambda a: a.config.has_ffn_experts)
    k_max = max(a.config.max_experts_per_token for a in users)
    return MixLoRAStack(router, gate_up_a, gate_up_b, down_a, down_b, scaling, table, enabled,
                        k_max)


def _stack_gated(slots: list[MoleAdapter | None], layer: int, proj: str,
                 base: BaseShape) -> GatedLoRAStack:
    def uses(a: MoleAdapter) -> bool:
        return a.config.is_per_linear and proj in a.config.target_modules

    users = [a for a in slots if a is not None and uses(a)]
    E, r = _sizes(users)
    fan_in, fan_out = base.in_out(proj)
    S = len(slots)
    router, A, B = torch.zeros(S, E, fan_in), torch.zeros(S, E, r, fan_in), torch.zeros(
        S, E, fan_out, r)
    for s, a in enumerate(slots):
        if a is None or not uses(a):
            continue
        e, ra = a.config.num_experts, a.config.r
        router[s, :e] = a.layers[layer].routers[proj]
        A[s, :e, :ra] = a.layers[layer].experts[proj].a
        B[s, :e, :, :ra] = a.layers[layer].experts[proj].b
    scaling, table, enabled = _common(slots, uses)
    k_max = max(a.config.max_experts_per_token for a in users)
    return GatedLoRAStack(router, A, B, scaling, table, enabled, k_max)


def _stack_lora(slots: list[MoleAdapter | None], layer: int, proj: str,
                base: BaseShape) -> LoRAStack:
    def uses(a: MoleAdapter) -> bool:
        return proj in a.config.lora_targets

    r = max(a.config.r for a in slots if a is not None and uses(a))
    fan_in, fan_out = base.in_out(proj)
    A, B = torch.zeros(len(slots), r, fan_in), torch.zeros(len(slots), fan_out, r)
    for s, a in enumerate(slots):
        if a is not None and uses(a):
            A[s, :a.config.r] = a.layers[layer].lora[proj].a
            B[s, :, :a.config.r] = a.layers[layer].lora[proj].b
    scaling, _, enabled = _common(slots, uses)
    return LoRAStack(A, B, scaling, enabled)
