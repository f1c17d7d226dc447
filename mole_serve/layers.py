"""MoLE layers of the served model: per-slot adapter buffers and the deltas they add.

Each decoder layer owns buffers sized at the server's limits (`max_loras` slots, the largest
rank and expert count it accepts), laid out as `mole_serve.stack` lays them out. vLLM's LoRA
manager decides which adapter sits in which slot; our hook fills that slot's rows when it
activates an adapter and zeroes them when it leaves, so a forward step never restacks weights.

Buffers are fp32, the dtype the reference math routes and mixes in; base activations are
cast in and results cast back.

The frozen projections stay vLLM's own (LoRA-wrapped) linear layers, so plain PEFT adapters
keep working; MoLE deltas are added on top with `torch.where` on the tokens whose slot holds
a MoLE adapter, which leaves every other token's result bit-identical to stock vLLM. Two
backends compute the same deltas: `mole_serve.kernels` (Triton; the default with CUDA) and
`mole_serve.reference`'s sync-free vectorised form (the default on CPU, where Triton only
runs interpreted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter import BaseShape, MoleAdapter, MoleLayer
from .config import ATTENTION_PROJS, FFN_PROJS
from .reference import (gated_lora_delta, lora_stack_delta, mixlora_down_delta,
                        mixlora_experts, mixlora_route)
from .routing import NUM_COLUMNS, routing_row
from .stack import GatedLoRAStack, LoRAStack, MixLoRAStack

if TYPE_CHECKING:
    from .kernels import TokenPlan


@dataclass(frozen=True)
class SlotLimits:
    """What every slot can hold: the server's `--max-loras`, `--max-lora-rank` and
    `--max-mole-experts`."""

    slots: int
    rank: int
    experts: int


class TokenSlots:
    """Where layers find each token's adapter slot (-1 = none).

    Holds vLLM's persistent per-token slot buffer once the LoRA manager exists; layers slice
    it by their own token count, so its address never changes between steps.
    """

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.buffer: torch.Tensor | None = None

    def for_tokens(self, num_tokens: int) -> torch.Tensor | None:
        if self.buffer is None:
            return None
        # Rows vLLM has not written yet (profiling) may hold garbage: keep them in range.
        return self.buffer[:num_tokens].clamp(-1, self.num_slots - 1)


@dataclass(frozen=True)
class SlotBatch:
    """One step's per-token slots [T] (-1 = none) and, on the kernels, their token plan."""

    slots: torch.Tensor
    plan: "TokenPlan | None"


def _zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


class _SlotTables(nn.Module):
    """Per-slot scaling, routing-table row and enabled flag shared by all stack kinds."""

    def __init__(self, slots: int):
        super().__init__()
        self.register_buffer("scaling", _zeros(slots), persistent=False)
        self.register_buffer("routing", _zeros(slots, NUM_COLUMNS), persistent=False)
        self.register_buffer("enabled", _zeros(slots, dtype=torch.bool), persistent=False)

    def set_row(self, slot: int, adapter: MoleAdapter | None) -> None:
        self.enabled[slot] = adapter is not None
        self.scaling[slot] = 0.0 if adapter is None else adapter.config.scaling
        self.routing[slot] = 0.0 if adapter is None else routing_row(adapter.config)


class MixLoRABuffers(_SlotTables):
    """FFN-level experts of one layer (MixLoRA family), `MixLoRAStack` layout."""

    def __init__(self, limits: SlotLimits, hidden: int, intermediate: int):
        super().__init__(limits.slots)
        S, E, r, H, I = limits.slots, limits.experts, limits.rank, hidden, intermediate
        self.k_max = E
        for name, shape in (("router", (S, E, H)), ("gate_up_a", (S, E, 2 * r, H)),
                            ("gate_up_b", (S, E, 2, I, r)), ("down_a", (S, E, r, I)),
                            ("down_b", (S, E, H, r))):
            self.register_buffer(name, _zeros(*shape), persistent=False)

    def fill(self, slot: int, adapter: MoleAdapter | None, layer: MoleLayer | None) -> None:
        for buffer in (self.router, self.gate_up_a, self.gate_up_b, self.down_a, self.down_b):
            buffer[slot].zero_()
        self.set_row(slot, adapter)
        if adapter is None:
            return
        e, ra, r = adapter.config.num_experts, adapter.config.r, self.down_a.shape[2]
        self.router[slot, :e] = layer.router
        if "gate_proj" in layer.experts:
            self.gate_up_a[slot, :e, :ra] = layer.experts["gate_proj"].a
            self.gate_up_b[slot, :e, 0, :, :ra] = layer.experts["gate_proj"].b
        if "up_proj" in layer.experts:
            self.gate_up_a[slot, :e, r:r + ra] = layer.experts["up_proj"].a
            self.gate_up_b[slot, :e, 1, :, :ra] = layer.experts["up_proj"].b
        if "down_proj" in layer.experts:
            self.down_a[slot, :e, :ra] = layer.experts["down_proj"].a
            self.down_b[slot, :e, :, :ra] = layer.experts["down_proj"].b

    def stack(self) -> MixLoRAStack:
        return MixLoRAStack(self.router, self.gate_up_a, self.gate_up_b, self.down_a,
                            self.down_b, self.scaling, self.routing, self.enabled, self.k_max)


class GatedLoRABuffers(_SlotTables):
    """Per-linear routed experts (DynMoLE) of one projection, `GatedLoRAStack` layout."""

    def __init__(self, limits: SlotLimits, fan_in: int, fan_out: int):
        super().__init__(limits.slots)
        S, E, r = limits.slots, limits.experts, limits.rank
        self.k_max = E
        self.register_buffer("router", _zeros(S, E, fan_in), persistent=False)
        self.register_buffer("a", _zeros(S, E, r, fan_in), persistent=False)
        self.register_buffer("b", _zeros(S, E, fan_out, r), persistent=False)

    def fill(self, slot: int, adapter: MoleAdapter | None, layer: MoleLayer | None,
             proj: str) -> None:
        for buffer in (self.router, self.a, self.b):
            buffer[slot].zero_()
        uses = adapter is not None and adapter.config.is_per_linear and proj in layer.routers
        self.set_row(slot, adapter if uses else None)
        if not uses:
            return
        e, ra = adapter.config.num_experts, adapter.config.r
        self.router[slot, :e] = layer.routers[proj]
        self.a[slot, :e, :ra] = layer.experts[proj].a
        self.b[slot, :e, :, :ra] = layer.experts[proj].b

    def stack(self) -> GatedLoRAStack:
        return GatedLoRAStack(self.router, self.a, self.b, self.scaling, self.routing,
                              self.enabled, self.k_max)


class LoRABuffers(_SlotTables):
    """Plain per-slot LoRA (MixLoRA's attention adapters) of one projection."""

    def __init__(self, limits: SlotLimits, fan_in: int, fan_out: int):
        super().__init__(limits.slots)
        S, r = limits.slots, limits.rank
        self.register_buffer("a", _zeros(S, r, fan_in), persistent=False)
        self.register_buffer("b", _zeros(S, fan_out, r), persistent=False)

    def fill(self, slot: int, adapter: MoleAdapter | None, layer: MoleLayer | None,
             proj: str) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        uses = adapter is not None and proj in layer.lora
        self.set_row(slot, adapter if uses else None)
        if uses:
            ra = adapter.config.r
            self.a[slot, :ra] = layer.lora[proj].a
            self.b[slot, :, :ra] = layer.lora[proj].b

    def stack(self) -> LoRAStack:
        return LoRAStack(self.a, self.b, self.scaling, self.enabled)


def add_where(base: torch.Tensor, delta: torch.Tensor, uses: torch.Tensor) -> torch.Tensor:
    """base + delta (in fp32, cast back) on `uses` rows; other rows untouched bit for bit."""
    return torch.where(uses[:, None], (base.float() + delta).to(base.dtype), base)


class ProjectionAdapters(nn.Module):
    """Slot buffers of one decoder layer's projections `projs`, and the deltas they add:
    DynMoLE's routed experts on every projection, MixLoRA's plain LoRA on attention ones."""

    def __init__(self, limits: SlotLimits, base: BaseShape, layer_index: int,
                 token_slots: TokenSlots, projs: tuple[str, ...], use_kernels: bool):
        super().__init__()
        self.layer_index = layer_index
        self.token_slots = token_slots
        self.num_slots = limits.slots
        self.use_kernels = use_kernels
        # Keyed "q", "o", "down"...: a submodule named like a projection ("o_proj") would
        # match vLLM's --lora-target-modules filter and be offered for LoRA wrapping.
        self.gated = nn.ModuleDict({_key(p): GatedLoRABuffers(limits, *base.in_out(p))
                                    for p in projs})
        self.lora = nn.ModuleDict({_key(p): LoRABuffers(limits, *base.in_out(p))
                                   for p in projs if p in ATTENTION_PROJS})

    def fill(self, slot: int, adapter: MoleAdapter | None) -> None:
        """Load `adapter`'s weights for this layer into `slot` (None empties the slot)."""
        layer = None if adapter is None else adapter.layers[self.layer_index]
        for key, buffers in self.gated.items():
            buffers.fill(slot, adapter, layer, f"{key}_proj")
        mixlora = None if adapter is None or adapter.config.is_per_linear else adapter
        for key, buffers in self.lora.items():
            buffers.fill(slot, mixlora, layer, f"{key}_proj")

    def slot_batch(self, num_tokens: int) -> SlotBatch | None:
        """This step's per-token slots (and, for the kernels, the slot-sorted token plan)."""
        slots = self.token_slots.for_tokens(num_tokens)
        if slots is None:
            return None
        if not self.use_kernels:
            return SlotBatch(slots, None)
        kernels = _kernels()
        return SlotBatch(slots, kernels.plan_tokens(slots, self.num_slots, kernels.BLOCK_M))

    def project(self, y: torch.Tensor, x: torch.Tensor, batch: SlotBatch,
                proj: str) -> torch.Tensor:
        """Add the per-slot LoRA / routed-expert delta of `proj` (input x, output y)."""
        key = _key(proj)
        if self.use_kernels:
            kernels = _kernels()
            y = y.contiguous()  # the kernels add in place into rows; q/k/v are column views
            if key in self.lora:
                # As a one-expert routed stack: the form the kernels run (a pure function,
                # so nothing is cached in the module and the forward stays trace-friendly).
                kernels.gated_lora_(y, x, batch.plan, kernels.as_gated(self.lora[key].stack()))
            kernels.gated_lora_(y, x, batch.plan, self.gated[key].stack())
            return y
        if key in self.lora:
            y = add_where(y, *lora_stack_delta(x, batch.slots, self.lora[key].stack()))
        return add_where(y, *gated_lora_delta(x, batch.slots, self.gated[key].stack()))


class FFNAdapters(ProjectionAdapters):
    """The FFN's slot buffers: DynMoLE on gate/up/down plus MixLoRA's FFN-level experts."""

    def __init__(self, limits: SlotLimits, base: BaseShape, layer_index: int,
                 token_slots: TokenSlots, use_kernels: bool):
        super().__init__(limits, base, layer_index, token_slots, FFN_PROJS, use_kernels)
        self.mixlora = MixLoRABuffers(limits, base.hidden, base.intermediate)

    def fill(self, slot: int, adapter: MoleAdapter | None) -> None:
        super().fill(slot, adapter)
        uses = adapter is not None and not adapter.config.is_per_linear
        self.mixlora.fill(slot, adapter if uses else None,
                          adapter.layers[self.layer_index] if uses else None)

    def mix_experts(self, h: torch.Tensor, g: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
                    batch: SlotBatch) -> tuple[torch.Tensor, tuple]:
        """MixLoRA tokens get their experts' weight-mixed intermediate in place of `h`
        (DESIGN §1 rewrites 1-2). Returns (h, routing state for `add_down_delta`)."""
        stack = self.mixlora.stack()
        if self.use_kernels:
            kernels = _kernels()
            routing = kernels.mixlora_route(x, batch.plan, stack)
            partials = kernels.mixlora_experts_(h, g, u, routing, batch.plan, stack)
            return h, (routing, partials)
        weights, ids, uses = mixlora_route(x, batch.slots, stack)
        mixed, down_shrink = mixlora_experts(g, u, x, batch.slots, weights, ids, stack)
        return torch.where(uses[:, None], mixed.to(h.dtype), h), (down_shrink, weights, ids, uses)

    def add_down_delta(self, y: torch.Tensor, batch: SlotBatch, routed: tuple) -> torch.Tensor:
        """y + sum_k w_k s B_d,k A_d,k h_k on MixLoRA tokens."""
        stack = self.mixlora.stack()
        if self.use_kernels:
            kernels = _kernels()
            routing, partials = routed
            kernels.mixlora_down_delta_(y, partials, routing, batch.plan, stack)
            return y
        down_shrink, weights, ids, uses = routed
        delta = mixlora_down_delta(down_shrink, batch.slots, weights, ids, stack)
        return add_where(y, delta, uses)


def _kernels():
    """`mole_serve.kernels`, imported on first use only: importing it without CUDA switches
    Triton to its interpreter for the whole process, which a CPU server must not do."""
    from . import kernels
    return kernels


def _key(proj: str) -> str:
    return proj.removesuffix("_proj")
