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
class GroupedLoRAStack:
    """G projections that read the same input (q/k/v, gate/up) in one layout, so that one
    route and one expand launch serve them all; their outputs are adjacent column ranges of
    one fused output, as vLLM's merged linears produce it."""

    router: torch.Tensor       # [G, S, E, in] fp32
    a: torch.Tensor            # [G, S, E, r, in]
    b: torch.Tensor            # [S, E, sum(out_sizes), r]: the members' B along the out dim
    scaling: torch.Tensor      # [G, S]
    routing: torch.Tensor      # [G, S, NUM_COLUMNS]
    enabled: torch.Tensor      # [G, S] bool
    k_max: int
    out_sizes: tuple[int, ...]

    @classmethod
    def of(cls, stacks: list[GatedLoRAStack]) -> "GroupedLoRAStack":
        """Group per-projection stacks of equal slots, experts and rank (one: views only)."""
        shapes = {(s.a.shape, s.k_max) for s in stacks}
        if len(shapes) != 1:
            raise ValueError(f"grouped projections need equal (slots, experts, rank, in) "
                             f"and k_max; found {sorted(shapes)}")
        if len(stacks) == 1:
            (one,) = stacks
            return cls(one.router[None], one.a[None], one.b, one.scaling[None],
                       one.routing[None], one.enabled[None], one.k_max, (one.b.shape[2],))
        return cls(*(torch.stack([getattr(s, f) for s in stacks])
                     for f in ("router", "a")), torch.cat([s.b for s in stacks], dim=2),
                   *(torch.stack([getattr(s, f) for s in stacks])
                     for f in ("scaling", "routing", "enabled")),
                   stacks[0].k_max, tuple(s.b.shape[2] for s in stacks))

    def member(self, index: int) -> GatedLoRAStack:
        """Projection `index` as a `GatedLoRAStack` of views (the reference math's form)."""
        first = sum(self.out_sizes[:index])
        return GatedLoRAStack(self.router[index], self.a[index],
                              self.b[:, :, first:first + self.out_sizes[index]],
                              self.scaling[index], self.routing[index], self.enabled[index],
                              self.k_max)


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
    """Stack layer `layer` of the adapters in `slots` (None = empty slot), sized to fit them."""
    present = [a for a in slots if a is not None]
    ffn = None
    mixlora = [a for a in present if a.config.has_ffn_experts]
    if mixlora:
        E, r = _sizes(mixlora)
        ffn = empty_mixlora(len(slots), E, r, base.hidden, base.intermediate,
                            k_max=max(a.config.max_experts_per_token for a in mixlora))
        for s, adapter in enumerate(slots):
            fill_mixlora(ffn, s, adapter, layer)
    gated, lora = {}, {}
    for proj in ATTENTION_PROJS + FFN_PROJS:
        routed = [a for a in present if proj in a.layers[layer].routers]
        if routed:
            E, r = _sizes(routed)
            gated[proj] = empty_gated(len(slots), E, r, *base.in_out(proj),
                                      k_max=max(a.config.max_experts_per_token for a in routed))
        plain = [a for a in present if proj in a.config.lora_targets]
        if plain:
            lora[proj] = empty_lora(len(slots), _sizes(plain)[1], *base.in_out(proj))
        for s, adapter in enumerate(slots):
            if proj in gated:
                fill_gated(gated[proj], s, adapter, layer, proj)
            if proj in lora:
                fill_lora(lora[proj], s, adapter, layer, proj)
    return LayerStack(ffn, gated, lora)


def _sizes(adapters: list[MoleAdapter]) -> tuple[int, int]:
    return max(a.config.num_experts for a in adapters), max(a.config.r for a in adapters)


# -- empty stacks and per-slot fills: what a server does when vLLM (de)activates a slot -----
def empty_mixlora(slots: int, experts: int, rank: int, hidden: int, intermediate: int,
                  k_max: int) -> MixLoRAStack:
    S, E, r, H, I = slots, experts, rank, hidden, intermediate
    return MixLoRAStack(torch.zeros(S, E, H), torch.zeros(S, E, 2 * r, H),
                        torch.zeros(S, E, 2, I, r), torch.zeros(S, E, r, I),
                        torch.zeros(S, E, H, r), *_empty_tables(S), k_max)


def empty_gated(slots: int, experts: int, rank: int, fan_in: int, fan_out: int,
                k_max: int) -> GatedLoRAStack:
    S, E, r = slots, experts, rank
    return GatedLoRAStack(torch.zeros(S, E, fan_in), torch.zeros(S, E, r, fan_in),
                          torch.zeros(S, E, fan_out, r), *_empty_tables(S), k_max)


def empty_lora(slots: int, rank: int, fan_in: int, fan_out: int) -> LoRAStack:
    scaling, _, enabled = _empty_tables(slots)
    return LoRAStack(torch.zeros(slots, rank, fan_in), torch.zeros(slots, fan_out, rank),
                     scaling, enabled)


def _empty_tables(slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.zeros(slots), torch.zeros(slots, NUM_COLUMNS),
            torch.zeros(slots, dtype=torch.bool))


def _set_tables(stack, slot: int, adapter: MoleAdapter | None) -> None:
    stack.enabled[slot] = adapter is not None
    stack.scaling[slot] = 0.0 if adapter is None else adapter.config.scaling
    if hasattr(stack, "routing"):
        stack.routing[slot] = 0.0 if adapter is None else routing_row(adapter.config)


@torch.no_grad()
def fill_mixlora(stack: MixLoRAStack, slot: int, adapter: MoleAdapter | None,
                 layer: int) -> None:
    """Put `adapter`'s FFN experts of layer `layer` in row `slot` (zeros if it has none)."""
    for table in (stack.router, stack.gate_up_a, stack.gate_up_b, stack.down_a, stack.down_b):
        table[slot].zero_()
    if adapter is None or not adapter.config.has_ffn_experts:
        _set_tables(stack, slot, None)
        return
    _set_tables(stack, slot, adapter)
    w, e, ra, r = adapter.layers[layer], adapter.config.num_experts, adapter.config.r, \
        stack.down_a.shape[2]
    stack.router[slot, :e] = w.router
    if "gate_proj" in w.experts:
        stack.gate_up_a[slot, :e, :ra] = w.experts["gate_proj"].a
        stack.gate_up_b[slot, :e, 0, :, :ra] = w.experts["gate_proj"].b
    if "up_proj" in w.experts:
        stack.gate_up_a[slot, :e, r:r + ra] = w.experts["up_proj"].a
        stack.gate_up_b[slot, :e, 1, :, :ra] = w.experts["up_proj"].b
    if "down_proj" in w.experts:
        stack.down_a[slot, :e, :ra] = w.experts["down_proj"].a
        stack.down_b[slot, :e, :, :ra] = w.experts["down_proj"].b


@torch.no_grad()
def fill_gated(stack: GatedLoRAStack, slot: int, adapter: MoleAdapter | None, layer: int,
               proj: str) -> None:
    """Put `adapter`'s routed experts of `proj` in row `slot` (zeros if it has none)."""
    for table in (stack.router, stack.a, stack.b):
        table[slot].zero_()
    if adapter is None or proj not in adapter.layers[layer].routers:
        _set_tables(stack, slot, None)
        return
    _set_tables(stack, slot, adapter)
    w, e, ra = adapter.layers[layer], adapter.config.num_experts, adapter.config.r
    stack.router[slot, :e] = w.routers[proj]
    stack.a[slot, :e, :ra] = w.experts[proj].a
    stack.b[slot, :e, :, :ra] = w.experts[proj].b


@torch.no_grad()
def fill_lora(stack: LoRAStack, slot: int, adapter: MoleAdapter | None, layer: int,
              proj: str) -> None:
    """Put `adapter`'s plain LoRA of `proj` in row `slot` (zeros if it has none)."""
    stack.a[slot].zero_()
    stack.b[slot].zero_()
    if adapter is None or proj not in adapter.layers[layer].lora:
        _set_tables(stack, slot, None)
        return
    _set_tables(stack, slot, adapter)
    ra = adapter.config.r
    stack.a[slot, :ra] = adapter.layers[layer].lora[proj].a
    stack.b[slot, :, :ra] = adapter.layers[layer].lora[proj].b
