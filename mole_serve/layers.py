"""MoLE layers of the served model: per-slot adapter buffers and the deltas they add.

Each decoder layer owns buffers sized at the server's limits (`max_loras` slots, the largest
rank and expert count it accepts), laid out as `mole_serve.stack` lays them out. vLLM's LoRA
manager decides which adapter sits in which slot; our hook fills that slot's rows when it
activates an adapter and zeroes them when it leaves, so a forward step never restacks weights.

LoRA factors are stored in the serving dtype (as vLLM stores LoRA weights: half the bytes a
decode step reads in bf16); routers and routing tables stay fp32, the precision routing
decisions are made in. The math upcasts after loading either way.

The frozen projections stay vLLM's own (LoRA-wrapped) linear layers, so plain PEFT adapters
keep working; MoLE deltas are added on top with `torch.where` on the tokens whose slot holds
a MoLE adapter, which leaves every other token's result bit-identical to stock vLLM. Two
backends compute the same deltas: `mole_serve.kernels` (Triton; the default with CUDA) and
`mole_serve.reference`'s sync-free vectorised form (the default on CPU, where Triton only
runs interpreted, and where vLLM runs the model eagerly: there each step's MoLE rows are
read on the host and computed alone, `slots.SlotBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from torch import nn

from .adapter import BaseShape, MoleAdapter, MoleLayer
from . import grouped
from .reference import (add_where, gated_lora_delta, mixlora_down_delta, mixlora_experts,
                        mixlora_route, router_logits)
from .routing import (DYNMOLE_CODE, NUM_COLUMNS, STRATEGY_CODE, SWITCH_CODE,
                      one_expert_routing_row, route, routing_row)
from .routing_stats import RoutingStats, member_rows
from .sharding import ShardDims, TensorShard
from .slots import ExpertColumns, SlotBatch, SlotLimits, TokenSlots, kernels_module
from .stack import GroupedLoRAStack, MixLoRAStack

if TYPE_CHECKING:
    from .kernels import DownPartials, Routing


def _zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


class _SlotTables(nn.Module):
    """Per-slot scaling, routing-table row and enabled flag (of MixLoRA's FFN experts)."""

    def __init__(self, slots: int):
        super().__init__()
        self.register_buffer("scaling", _zeros(slots), persistent=False)
        self.register_buffer("routing", _zeros(slots, NUM_COLUMNS), persistent=False)
        self.register_buffer("enabled", _zeros(slots, dtype=torch.bool), persistent=False)

    def set_row(self, slot: int, adapter: MoleAdapter | None) -> None:
        self.enabled[slot] = adapter is not None
        self.scaling[slot] = 0.0 if adapter is None else adapter.config.scaling
        self.routing[slot] = 0.0 if adapter is None else routing_row(adapter.config)


class MixLoRABuffers(_SlotTables, ExpertColumns):
    """FFN-level experts of one layer (MixLoRA family), `MixLoRAStack` layout."""

    def __init__(self, limits: SlotLimits, hidden: int, intermediate: int,
                 shard: TensorShard = TensorShard()):
        super().__init__(limits.slots)
        self.part = shard.part(intermediate)
        S, E, r, H = limits.slots, limits.experts, limits.rank, hidden
        I = intermediate // shard.world
        self.k_max, self.slot_k, self.slot_experts = E, [0] * S, [0] * S
        # each slot's routing strategy (`routing.STRATEGY_CODE`; None: empty), by `fill`
        self.slot_strategy: list[int | None] = [None] * S
        self.register_buffer("router", _zeros(S, E, H), persistent=False)
        for name, shape in (("gate_up_a", (S, E, 2 * r, H)), ("gate_up_b", (S, E, 2, I, r)),
                            ("down_a", (S, E, r, I)), ("down_b", (S, E, H, r))):
            self.register_buffer(name, _zeros(*shape, dtype=limits.factor_dtype),
                                 persistent=False)

    def fill(self, slot: int, adapter: MoleAdapter | None, layer: MoleLayer | None) -> None:
        for buffer in (self.router, self.gate_up_a, self.gate_up_b, self.down_a, self.down_b):
            buffer[slot].zero_()
        self.set_row(slot, adapter)
        self.slot_k[slot] = 0 if adapter is None else adapter.config.max_experts_per_token
        self.slot_experts[slot] = 0 if adapter is None else adapter.config.num_experts
        self.slot_strategy[slot] = None if adapter is None else \
            STRATEGY_CODE[adapter.config.routing_strategy]
        if adapter is None:
            return
        e, ra, r = adapter.config.num_experts, adapter.config.r, self.down_a.shape[2]
        self.router[slot, :e] = layer.router
        if "gate_proj" in layer.experts:
            self.gate_up_a[slot, :e, :ra] = layer.experts["gate_proj"].a
            self.gate_up_b[slot, :e, 0, :, :ra] = layer.experts["gate_proj"].b[:, self.part]
        if "up_proj" in layer.experts:
            self.gate_up_a[slot, :e, r:r + ra] = layer.experts["up_proj"].a
            self.gate_up_b[slot, :e, 1, :, :ra] = layer.experts["up_proj"].b[:, self.part]
        if "down_proj" in layer.experts:
            self.down_a[slot, :e, :ra] = layer.experts["down_proj"].a[:, :, self.part]
            self.down_b[slot, :e, :, :ra] = layer.experts["down_proj"].b

    def strategies(self, batch: SlotBatch) -> frozenset[int] | None:
        """The routing strategies of a compact batch's slots, so that it routes with those
        alone (`routing.selection_mask`); None (any) for an every-row batch."""
        if batch.rows is None:
            return None
        return frozenset(self.slot_strategy[s] for s in batch.used_slots
                         if self.slot_strategy[s] is not None)

    def stack(self, k_max: int | None = None) -> MixLoRAStack:
        """The buffers as a stack routing to `k_max` experts (default: all a slot holds)."""
        return MixLoRAStack(self.router, self.gate_up_a, self.gate_up_b, self.down_a,
                            self.down_b, self.scaling, self.routing, self.enabled,
                            self.k_max if k_max is None else k_max)


class GroupedLoRABuffers(nn.Module, ExpertColumns):
    """The adapters of a group of projections that read the same input (q/k/v, gate/up, or
    one projection alone), `GroupedLoRAStack` layout: per projection, a DynMoLE adapter's
    routed experts, or a MixLoRA adapter's plain LoRA (attention) as a one-expert stack (zero
    router; switch routing over one expert gives weight exactly 1). One route and one expand
    launch per group, whatever each slot holds (the FFN's gate/up and down groups: DynMoLE's
    three launches, `FFNAdapters.adapt_*`)."""

    def __init__(self, limits: SlotLimits, dims: list["ShardDims"], projs: tuple[str, ...]):
        super().__init__()
        if len({d.local_in for d in dims}) != 1:
            raise ValueError(f"grouped projections {projs} must share their input")
        G, S, E, r, fan_in = len(projs), limits.slots, limits.experts, limits.rank, \
            dims[0].local_in
        self.projs, self.dims, self.k_max, self.slot_k, self.slot_experts = \
            projs, dims, E, [0] * S, [0] * S
        # Per projection, the slots whose adapter routes there and those holding a plain LoRA
        # there (host-side, kept by `fill`): a compact step computes no more than its slots
        # need (no routing for plain LoRA, nothing where they adapt nothing).
        self.routed_slots: list[set[int]] = [set() for _ in projs]
        self.lora_slots: list[set[int]] = [set() for _ in projs]
        self.register_buffer("router", _zeros(G, S, E, fan_in), persistent=False)
        self.register_buffer("a", _zeros(G, S, E, r, fan_in, dtype=limits.factor_dtype),
                             persistent=False)
        self.register_buffer("b", _zeros(S, E, sum(d.local_out for d in dims), r,
                                         dtype=limits.factor_dtype), persistent=False)
        self.register_buffer("scaling", _zeros(G, S), persistent=False)
        self.register_buffer("routing", _zeros(G, S, NUM_COLUMNS), persistent=False)
        self.register_buffer("enabled", _zeros(G, S, dtype=torch.bool), persistent=False)

    @property
    def routes_split_input(self) -> bool:
        """Whether its routers see only this rank's input slice (tensor parallelism, o/down),
        so their logits must be summed over ranks. One expert gets weight 1 whatever its
        logits: nothing to sum."""
        return self.k_max > 1 and any(d.splits_input for d in self.dims)

    def fill(self, slot: int, adapter: MoleAdapter | None, layer: MoleLayer | None
             ) -> list[bool]:
        """Load `adapter` into `slot`; returns, per projection, whether it routes there (a
        one-expert LoRA does not)."""
        routed, plain = [False] * len(self.projs), [False] * len(self.projs)
        for buffer in (self.router[:, slot], self.a[:, slot], self.b[slot],
                       self.scaling[:, slot], self.routing[:, slot], self.enabled[:, slot]):
            buffer.zero_()
        per_linear = adapter is not None and adapter.config.is_per_linear
        self.slot_k[slot] = self.slot_experts[slot] = 0
        first = 0
        for index, (proj, dims) in enumerate(zip(self.projs, self.dims)):
            columns = slice(first, first + dims.local_out)
            first += dims.local_out
            if per_linear and proj in layer.routers:
                routed[index] = True
                self.slot_k[slot] = adapter.config.max_experts_per_token
                self.slot_experts[slot] = adapter.config.num_experts
                self.routing[index, slot] = routing_row(adapter.config)
                self.router[index, slot, :adapter.config.num_experts] = \
                    layer.routers[proj][:, dims.in_part]
                experts = layer.experts[proj].a, layer.experts[proj].b
            elif adapter is not None and not per_linear and proj in layer.lora:
                plain[index] = True
                self.routing[index, slot] = _ONE_EXPERT_ROUTING
                self.slot_k[slot] = max(self.slot_k[slot], 1)
                self.slot_experts[slot] = max(self.slot_experts[slot], 1)
                experts = layer.lora[proj].a[None], layer.lora[proj].b[None]
            else:
                continue
            self.enabled[index, slot] = True
            self.scaling[index, slot] = adapter.config.scaling
            a, b = experts  # [e, r, in], [e, out, r] at full size: this rank's slices
            e, ra = a.shape[0], a.shape[1]
            self.a[index, slot, :e, :ra] = a[..., dims.in_part]
            self.b[slot, :e, columns, :ra] = b[:, dims.out_part]
        for kind, slots in ((routed, self.routed_slots), (plain, self.lora_slots)):
            for holds, holders in zip(kind, slots):
                (holders.add if holds else holders.discard)(slot)
        return routed

    def strategies(self, batch: SlotBatch, members: list[int]) -> frozenset[int] | None:
        """The routing strategies a compact batch's rows use through `members`, so that it
        routes with those alone (`routing.selection_mask`): DynMoLE where a used slot routes
        (per-linear routers are DynMoLE's only), switch where it holds a plain LoRA (its
        one-expert table row); None (any) for an every-row batch."""
        if batch.rows is None:
            return None
        used = set(batch.used_slots)
        return frozenset(code for m in members for code, holders in (
            (DYNMOLE_CODE, self.routed_slots[m]), (SWITCH_CODE, self.lora_slots[m]))
            if holders & used)

    def stack(self, k_max: int | None = None) -> GroupedLoRAStack:
        """The buffers as a stack routing to `k_max` experts (default: all a slot holds)."""
        return GroupedLoRAStack(self.router, self.a, self.b, self.scaling, self.routing,
                                self.enabled, self.k_max if k_max is None else k_max,
                                tuple(d.local_out for d in self.dims))


_ONE_EXPERT_ROUTING = one_expert_routing_row()


def _members_logits(x: torch.Tensor, slots: torch.Tensor, routers: torch.Tensor,
                    members: list[int], batch: SlotBatch, gathers: bool) -> torch.Tensor:
    """Router logits of `members` of `routers` [G, S, E, in], rows stacked member by member,
    read the way the buffer's expert math reads its factors (`ExpertColumns.gathers`)."""
    if not gathers:
        return grouped.router_logits(x, slots, routers, members, batch.used_slots)
    logits = [router_logits(x, slots, routers[m]) for m in members]
    return logits[0] if len(logits) == 1 else torch.cat(logits)


def _one_expert(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of a plain LoRA held as a one-expert stack: weight 1 on expert 0."""
    return (torch.ones(rows, 1, device=device),
            torch.zeros(rows, 1, dtype=torch.long, device=device))


# Projections grouped by the input they read, keyed as `ProjectionAdapters.project` takes them
# (not "o_proj" etc.: a submodule named like a projection would match vLLM's
# --lora-target-modules filter and be offered for LoRA wrapping). A group's outputs are one
# fused tensor, as vLLM's merged linears produce them.
ATTENTION_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}
FFN_GROUPS = {"gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


class ProjectionAdapters(nn.Module):
    """Slot buffers of one decoder layer's projection `groups`, and the deltas they add:
    DynMoLE's routed experts on every projection, MixLoRA's plain LoRA on attention ones."""

    def __init__(self, limits: SlotLimits, base: BaseShape, layer_index: int,
                 token_slots: TokenSlots, groups: dict[str, tuple[str, ...]],
                 use_kernels: bool, routing_stats: bool = True,
                 shard: TensorShard = TensorShard()):
        super().__init__()
        self.layer_index = layer_index
        self.token_slots = token_slots
        self.use_kernels = use_kernels
        self.shard = shard
        self.gated = nn.ModuleDict({
            key: GroupedLoRABuffers(limits, [ShardDims.of(base, p, shard) for p in projs], projs)
            for key, projs in groups.items()})
        self.gated_stats = nn.ModuleDict(
            {key: RoutingStats(limits.slots, limits.experts, layer_index, projs)
             for key, projs in groups.items()} if routing_stats else {})

    def fill(self, slot: int, adapter: MoleAdapter | None) -> None:
        """Load `adapter`'s weights for this layer into `slot` (None empties the slot)."""
        layer = None if adapter is None else adapter.layers[self.layer_index]
        for key, buffers in self.gated.items():
            routed = buffers.fill(slot, adapter, layer)
            if key in self.gated_stats:
                self.gated_stats[key].reset_slot(slot, routed)

    def slot_batch(self, num_tokens: int) -> SlotBatch:
        """This step's per-token slots (and, for the kernels, the slot-sorted token plan)."""
        return self.token_slots.batch(num_tokens)

    def project(self, y: torch.Tensor, x: torch.Tensor, batch: SlotBatch,
                group: str) -> torch.Tensor:
        """Add the per-slot LoRA / routed-expert deltas of the projections of `group` (input
        x) to their fused output y."""
        if group not in self.gated:  # no adapter family served adapts these projections
            return y
        stats = self.gated_stats[group] if group in self.gated_stats else None
        buffers = self.gated[group]
        if self.use_kernels:
            stack = buffers.stack()
            kernels = kernels_module()
            logits = None
            if buffers.routes_split_input:  # one more launch and a [T, E] all-reduce
                logits = self.shard.all_reduce(kernels.router_logits(x, batch.plan, stack))
            y = y.contiguous()  # the kernels add into rows in place
            kernels.gated_lora_(y, x, batch.plan, stack, _kernel_counts(stats), logits)
            return y
        batch = buffers.narrowed(batch)
        k = buffers.k_for(batch)
        if k == 0:
            return y
        stack = buffers.stack(k)
        x_rows, slots = batch.take(x), batch.take(batch.slots)
        used, gathers = set(batch.used_slots), buffers.gathers(batch)
        routes = [index for index, routed in enumerate(buffers.routed_slots)
                  if batch.rows is None or routed & used]
        routing = self._route_members(stack, routes, x_rows, slots,
                                      buffers.routes_split_input, stats, batch, gathers,
                                      buffers.strategies(batch, routes))
        outputs = []
        for index, part in enumerate(batch.take(y).split(stack.out_sizes, dim=-1)):
            member = stack.member(index)
            lora_slots = buffers.lora_slots[index]
            if index not in routing and not lora_slots & used:  # compact: nothing to add
                outputs.append(part)
                continue
            routed = routing.get(index)  # None: compact, plain LoRA only (weight 1)
            if gathers:
                if routed is None:
                    routed = _one_expert(x_rows.shape[0], x.device)
                delta = gated_lora_delta(x_rows, slots, member, routed=routed)
            else:
                delta = grouped.gated_lora_delta(x_rows, slots, member, routed,
                                                 batch.used_slots, lora_slots)
            outputs.append(add_where(part, *delta))
        return batch.put(y, torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0])

    def _route_members(self, stack: GroupedLoRAStack, members: list[int], x: torch.Tensor,
                       slots: torch.Tensor, split_input: bool, stats: RoutingStats | None,
                       batch: SlotBatch, gathers: bool, strategies: frozenset[int] | None
                       ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The routing (weights, ids) of a group's `members`, their rows stacked member by
        member: routing is row-wise, so one route, count and all-reduce serve the whole
        group (q/k/v: a third of the small ops)."""
        if not members:
            return {}
        logits = _members_logits(x, slots, stack.router, members, batch, gathers)
        if split_input:
            logits = self.shard.all_reduce(logits)
        tables = member_rows(stack, members, slots)
        weights, ids = route(logits, tables.routing, stack.k_max, strategies)
        if stats is not None:
            stats.record_rows(logits, tables, (weights, ids))
        n = x.shape[0]
        return {m: (weights[j * n:(j + 1) * n], ids[j * n:(j + 1) * n])
                for j, m in enumerate(members)}

    def routing_stats(self) -> list[RoutingStats]:
        return list(self.gated_stats.values())


class FFNAdapters(ProjectionAdapters):
    """The FFN's slot buffers: DynMoLE on gate/up/down (`per_linear`) and MixLoRA's FFN-level
    experts (`ffn_experts`), each only when the server serves that family."""

    def __init__(self, limits: SlotLimits, base: BaseShape, layer_index: int,
                 token_slots: TokenSlots, use_kernels: bool, routing_stats: bool = True,
                 shard: TensorShard = TensorShard(), per_linear: bool = True,
                 ffn_experts: bool = True):
        super().__init__(limits, base, layer_index, token_slots,
                         FFN_GROUPS if per_linear else {}, use_kernels, routing_stats, shard)
        self.mixlora = (MixLoRABuffers(limits, base.hidden, base.intermediate, shard)
                        if ffn_experts else None)
        self.mixlora_stats = (RoutingStats(limits.slots, limits.experts, layer_index, ("ffn",))
                              if routing_stats and ffn_experts else None)

    def fill(self, slot: int, adapter: MoleAdapter | None) -> None:
        super().fill(slot, adapter)
        if self.mixlora is None:
            return
        uses = adapter is not None and not adapter.config.is_per_linear
        self.mixlora.fill(slot, adapter if uses else None,
                          adapter.layers[self.layer_index] if uses else None)
        if self.mixlora_stats is not None:
            self.mixlora_stats.reset_slot(slot, [uses])

    def around_frozen(self, x: torch.Tensor,
                      frozen_gate_up: Callable[[torch.Tensor], torch.Tensor],
                      frozen_act_and_mul: Callable[[torch.Tensor], torch.Tensor],
                      frozen_down: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The MoLE FFN: the adapter steps around the frozen fused gate_up GEMM, SiLU·mul and
        down GEMM, given as callables (vLLM's linears in `model.MoleLlamaMLP`, plain weights
        in the tests and benchmarks, which so run the model's sequence)."""
        batch = self.slot_batch(x.shape[0])
        gate_up, step = self.adapt_gate_up(frozen_gate_up(x), x, batch)
        h = self.adapt_intermediate(frozen_act_and_mul(gate_up), gate_up, x, batch, step)
        return self.adapt_output(frozen_down(h), h, batch, step)

    # The steps `around_frozen` runs. On the kernels DynMoLE takes three launches: its
    # gate/up deltas join the intermediate (where down's router reads them), not gate_up.
    def adapt_gate_up(self, gate_up: torch.Tensor, x: torch.Tensor, batch: SlotBatch
                      ) -> tuple[torch.Tensor, "FFNStep"]:
        """Before the frozen SiLU·mul: the reference adds DynMoLE's gate/up deltas to the
        fused gate_up output; the kernels only route gate and up (launch 1)."""
        step = FFNStep()
        if "gate_up" not in self.gated:
            return gate_up, step
        if not self.use_kernels:
            return self.project(gate_up, x, batch, "gate_up"), step
        stats = self.gated_stats["gate_up"] if "gate_up" in self.gated_stats else None
        step.gate_up_routing = kernels_module().dynmole_gate_up_route(
            x, batch.plan, self.gated["gate_up"].stack(), _kernel_counts(stats))
        return gate_up, step

    def adapt_intermediate(self, h: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor,
                           batch: SlotBatch, step: "FFNStep") -> torch.Tensor:
        """After the frozen SiLU·mul (h = act(g) * u): DynMoLE tokens' rows of h get their
        gate/up deltas (kernels: launch 2, which also reduces down's routing), MixLoRA
        tokens' rows their experts' mix."""
        g, u = gate_up.chunk(2, dim=-1)
        if step.gate_up_routing is not None:
            kernels = kernels_module()
            down = self.gated["down"]
            partials = kernels.dynmole_intermediate_(h, g, u, step.gate_up_routing, batch.plan,
                                                     self.gated["gate_up"].stack(),
                                                     down.stack().member(0))
            if down.routes_split_input:  # the ranks' logits of their slices, summed
                logits = self.shard.all_reduce(partials.logits.sum(0, keepdim=True))
                partials = kernels.DownPartials(logits, partials.shrink)
            step.down_partials = partials
        h, step.mixlora = self.mix_experts(h, g, u, x, batch)
        return h

    def adapt_output(self, y: torch.Tensor, h: torch.Tensor, batch: SlotBatch,
                     step: "FFNStep") -> torch.Tensor:
        """After the frozen down GEMM: DynMoLE's down delta (kernels: launch 3), MixLoRA's."""
        if step.down_partials is not None:
            stats = self.gated_stats["down"] if "down" in self.gated_stats else None
            y = y.contiguous()  # the kernels add into rows in place
            kernels_module().dynmole_down_delta_(y, step.down_partials, batch.plan,
                                                 self.gated["down"].stack().member(0),
                                                 _kernel_counts(stats))
        elif "down" in self.gated:
            y = self.project(y, h, batch, "down")
        return self.add_down_delta(y, batch, step.mixlora)

    def mix_experts(self, h: torch.Tensor, g: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
                    batch: SlotBatch) -> tuple[torch.Tensor, LaunchedMix | ComputedMix | None]:
        """MixLoRA tokens get their experts' weight-mixed intermediate in place of `h`
        (DESIGN §1 rewrites 1-2). Returns (h, routing state for `add_down_delta`)."""
        if self.mixlora is None:
            return h, None
        if self.use_kernels:
            stack = self.mixlora.stack()
            kernels = kernels_module()
            routing = kernels.mixlora_route(x, batch.plan, stack,
                                            _kernel_counts(self.mixlora_stats))
            partials = kernels.mixlora_experts_(h, g, u, routing, batch.plan, stack)
            return h, LaunchedMix(routing, partials)
        batch = self.mixlora.narrowed(batch)
        k = self.mixlora.k_for(batch)
        if k == 0:
            return h, None
        stack = self.mixlora.stack(k)
        x_rows, slots = batch.take(x), batch.take(batch.slots)
        gathers = self.mixlora.gathers(batch)
        logits = _members_logits(x_rows, slots, stack.router[None], [0], batch, gathers)
        weights, ids, uses = mixlora_route(x_rows, slots, stack, logits,
                                           self.mixlora.strategies(batch))
        if self.mixlora_stats is not None:
            self.mixlora_stats.record(logits, slots, self.mixlora, (weights, ids))
        if gathers:
            mixed, down_shrink = mixlora_experts(batch.take(g), batch.take(u), x_rows, slots,
                                                 weights, ids, stack)
        else:
            mixed, down_shrink = grouped.mixlora_experts(batch.take(g), batch.take(u), x_rows,
                                                         slots, weights, ids, stack,
                                                         batch.used_slots)
        mixed = torch.where(uses[:, None], mixed.to(h.dtype), batch.take(h))
        return batch.put(h, mixed), ComputedMix(batch, gathers, stack, down_shrink, weights,
                                                ids, uses)

    def routing_stats(self) -> list[RoutingStats]:
        own = [] if self.mixlora_stats is None else [self.mixlora_stats]
        return super().routing_stats() + own

    def add_down_delta(self, y: torch.Tensor, batch: SlotBatch,
                       mix: LaunchedMix | ComputedMix | None) -> torch.Tensor:
        """y + sum_k w_k s B_d,k A_d,k h_k on MixLoRA tokens (`mix`: `mix_experts`' state,
        whose own narrowed batch the reference uses; None: no MixLoRA experts here, or none
        the batch's slots use)."""
        if mix is None:
            return y
        if isinstance(mix, LaunchedMix):
            kernels_module().mixlora_down_delta_(y, mix.partials, mix.routing, batch.plan,
                                                 self.mixlora.stack())
            return y
        rows = mix.batch
        slots = rows.take(rows.slots)
        args = (mix.down_shrink, slots, mix.weights, mix.ids, mix.stack)
        delta = (mixlora_down_delta(*args) if mix.gathers
                 else grouped.mixlora_down_delta(*args, rows.used_slots))
        return rows.put(y, add_where(rows.take(y), delta, mix.uses))


@dataclass
class FFNStep:
    """What one FFN forward carries between its adapter steps (kernels: launch outputs)."""

    gate_up_routing: Routing | None = None       # DynMoLE's gate/up routing (launch 1)
    down_partials: DownPartials | None = None    # DynMoLE down's partial sums (launch 2)
    mixlora: LaunchedMix | ComputedMix | None = None  # MixLoRA's state for its down delta


class LaunchedMix(NamedTuple):
    """MixLoRA's experts as launched on the kernels, for the down delta (launch 3)."""

    routing: Routing
    partials: torch.Tensor  # down-shrink partial sums [split_i, T, k_max, r]


class ComputedMix(NamedTuple):
    """MixLoRA's experts as the reference computed them, for the down delta."""

    batch: SlotBatch           # narrowed to the MixLoRA tokens
    gathers: bool              # per-token gathered factors (else grouped by slot)
    stack: MixLoRAStack        # narrowed to the step's k
    down_shrink: torch.Tensor  # A_d,k h_k per row and selected expert
    weights: torch.Tensor      # routing weights per row and selection
    ids: torch.Tensor          # selected experts
    uses: torch.Tensor         # rows whose slot routes (others keep y)


def _kernel_counts(stats: RoutingStats | None):
    """The route kernel adds the routing metrics itself (no extra launch)."""
    if stats is None:
        return None
    return kernels_module().RoutingCounts(stats.counts, stats.entropy_bounds)
