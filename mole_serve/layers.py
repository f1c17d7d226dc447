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
read on the host and computed alone, `SlotBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .adapter import BaseShape, MoleAdapter, MoleLayer
from . import grouped, metrics
from .metrics import ENTROPY_BUCKETS
from .reference import (add_where, gated_lora_delta, mixlora_down_delta, mixlora_experts,
                        mixlora_route, router_logits)
from .routing import (NUM_COLUMNS, NUM_EXPERTS, masked_softmax, one_expert_routing_row, route,
                      routing_row)
from .stack import GatedLoRAStack, GroupedLoRAStack, MixLoRAStack

if TYPE_CHECKING:
    from .kernels import DownPartials, Routing, TokenPlan


@dataclass(frozen=True)
class SlotLimits:
    """What every slot can hold: the server's `--max-loras`, `--max-mole-rank` and
    `--max-mole-experts`, and the dtype its LoRA factors are stored in (the model's)."""

    slots: int
    rank: int
    experts: int
    factor_dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class TensorShard:
    """This tensor-parallel rank's part of the adapters, split as vLLM splits the frozen
    layers: q/k/v and gate/up are column-parallel (the rank holds rows `part(out)` of their
    outputs; k/v rows by head, `kv_part`, shared by several ranks when there are fewer KV
    heads than ranks), o and down row-parallel (columns `part(in)` of their inputs). So a
    rank keeps the slice of the B factors of column-parallel projections (MixLoRA: the
    I-slice of the gate/up B factors) and of the A factors and routers of row-parallel ones
    (the I-slice of the down A factors); factors and routers that see full-size inputs are
    replicated.
    Each rank's o/down delta is a partial sum over its slice; the base projection's
    all-reduce, deferred until the deltas are added (`model.py`), sums them up. A router on
    o/down sees only its rank's input slice, so its logits are partial sums too, added up
    by `all_reduce` (vLLM's) before any routing decision: every rank routes alike."""

    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None,
                                                                       compare=False)

    def __post_init__(self):
        if self.world > 1 and self.all_reduce is None:
            raise ValueError("a tensor-parallel shard needs the ranks' all-reduce")

    def part(self, full: int) -> slice:
        if full % self.world:
            raise ValueError(f"{full} does not split evenly over {self.world} ranks")
        size = full // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def kv_part(self, kv_heads: int, head_dim: int) -> slice:
        """This rank's rows of k/v outputs, as vLLM's `QKVParallelLinear` holds them: the
        heads split evenly, or, with fewer heads than ranks, one head on world/heads ranks."""
        if self.world <= kv_heads:
            return self.part(kv_heads * head_dim)
        if self.world % kv_heads:
            raise ValueError(f"{kv_heads} KV heads do not replicate evenly over {self.world} "
                             f"ranks")
        head = self.rank // (self.world // kv_heads)
        return slice(head * head_dim, (head + 1) * head_dim)


class TokenSlots:
    """Each step's per-token adapter slots (-1 = none) and, for the kernels, their token
    plan: built once per step by the model's forward (`prepare`), read by every layer
    (`batch`), so no layer sorts tokens again (vLLM splits the compiled model at each
    attention, so a plan built in the layers would be rebuilt twice per layer).

    Everything lives in persistent buffers sized for vLLM's largest batch and is sliced by
    the step's token count, so compiled layers and CUDA graphs see the same addresses every
    step. `set` writes the slots of the tokens whose adapter is a MoLE one (outside the
    forward, when vLLM's LoRA manager sets the step's adapter mapping); other tokens stay -1.
    `compact` (`SlotBatch`): `prepare` also reads which rows and slots the step's MoLE tokens
    use, on the host.
    """

    def __init__(self, num_slots: int, max_tokens: int, use_kernels: bool = False,
                 device: torch.device | str | None = None, compact: bool = False):
        if compact and use_kernels:
            raise ValueError("compact steps are the reference backend's: the kernels need "
                             "their token plan")
        self.num_slots = num_slots
        self.compact = compact
        self._compact_step: tuple[int, torch.Tensor, tuple[int, ...]] | None = None
        # Tokens per plan block; None: the reference backend needs no plan.
        self.plan_block_m = _kernels().BLOCK_M if use_kernels else None
        self.slots = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        if self.plan_block_m is not None:
            blocks = _kernels().max_blocks(max_tokens, num_slots, self.plan_block_m)
            self.sorted_tokens = torch.full((blocks * self.plan_block_m,), -1,
                                            dtype=torch.int32, device=device)
            self.block_slot = torch.zeros(blocks, dtype=torch.int32, device=device)

    def set(self, slots: torch.Tensor) -> None:
        """The next steps' per-token slots (int, -1 = none; on any device); rows past them
        (padding) get -1. From the host they go through pinned memory without waiting, as
        vLLM's own LoRA mapping tensors do, so this adds no wait for the step in flight
        (vLLM's punica metadata itself still reads the device when the mapping changes)."""
        if slots.device.type == "cpu" and self.slots.device.type == "cuda":
            slots = slots.pin_memory()
        self.slots[:slots.shape[0]].copy_(slots, non_blocking=True)
        self.slots[slots.shape[0]:].fill_(-1)
        self._compact_step = None

    def prepare(self, num_tokens: int) -> None:
        """Once per step, before the layers: this step's token plan (kernels), or its MoLE
        rows and the slots they use (compact)."""
        if self.compact:
            self._compact_step = self._read_compact_step(num_tokens)
        if self.plan_block_m is not None:
            plan = _kernels().plan_tokens(self.slots[:num_tokens], self.num_slots,
                                          self.plan_block_m)
            self.sorted_tokens[:plan.sorted_tokens.shape[0]].copy_(plan.sorted_tokens)
            self.block_slot[:plan.num_blocks].copy_(plan.block_slot)

    def batch(self, num_tokens: int) -> "SlotBatch":
        """The slots and plan `prepare(num_tokens)` built."""
        slots = self.slots[:num_tokens]
        if self.compact and not torch.compiler.is_compiling():
            step = self._compact_step
            if step is None or step[0] != num_tokens:
                step = self._read_compact_step(num_tokens)
            return SlotBatch(slots, None, *step[1:])
        if self.plan_block_m is None:
            return SlotBatch(slots, None)
        kernels = _kernels()
        blocks = kernels.max_blocks(num_tokens, self.num_slots, self.plan_block_m)
        return SlotBatch(slots, kernels.TokenPlan(
            self.sorted_tokens[:blocks * self.plan_block_m], self.block_slot[:blocks],
            self.plan_block_m))

    def _read_compact_step(self, num_tokens: int) -> tuple[int, torch.Tensor, tuple[int, ...]]:
        """(num_tokens, rows of MoLE tokens, the slots they use), read on the host."""
        slots = self.slots[:num_tokens]
        rows = (slots >= 0).nonzero().flatten()
        return num_tokens, rows, tuple(slots[rows].unique().tolist())


@dataclass(frozen=True)
class SlotBatch:
    """One step's per-token slots [T] (-1 = none) and, on the kernels, their token plan.

    A compact batch (reference backend on a CPU, `TokenSlots(compact=True)`: vLLM runs the
    model eagerly there and the slots are host memory) also names the rows of MoLE tokens
    and the slots they use. The reference layers then compute those rows only (a step of
    base-model or plain-LoRA tokens costs nothing extra), with only as many expert columns
    as those slots' adapters can select (`k_for`), not the server's largest count, and
    read the expert factors the cheaper way (`gathers`): data-dependent shapes, so never
    on the kernels' CUDA-graph path or while compiling."""

    slots: torch.Tensor
    plan: "TokenPlan | None"
    rows: torch.Tensor | None = None  # compact: the MoLE tokens' rows; None: every row
    used_slots: tuple[int, ...] = ()  # compact: the slots those rows use

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s rows of the tokens the layers compute (compact: the MoLE tokens')."""
        return t if self.rows is None else t[self.rows]

    def put(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`t` with the rows `take(t)` returns replaced by `rows`."""
        return rows if self.rows is None else t.index_copy(0, self.rows, rows)


class ExpertColumns:
    """How many expert columns ([T, k] routing) a slot buffer's tokens need: its k_max, or
    for a compact batch the most any of its slots' adapters selects (`slot_k`, kept by
    `fill`; 0: no adapter of those slots adapts here, nothing to compute); and how a compact
    batch's expert math reads the factors (`gathers`)."""

    k_max: int
    slot_k: list[int]
    slot_experts: list[int]  # each slot's adapter's experts here (plain LoRA: 1), by `fill`

    def gathers(self, batch: SlotBatch) -> bool:
        """Whether the batch's expert math gathers each row's k experts' factors (the
        reference; every-row batches always) rather than running each used slot's experts
        as GEMMs over its factors (`grouped`): whichever reads fewer expert factor sets,
        rows x k or the used slots' experts; at a tie the gathers, a fixed number of ops
        where grouping takes a few per slot. So decode steps (a row or two per slot) gather
        and prefill steps group."""
        if batch.rows is None:
            return True
        return batch.rows.shape[0] * self.k_for(batch) <= sum(self.slot_experts[s]
                                                              for s in batch.used_slots)

    def k_for(self, batch: SlotBatch) -> int:
        if batch.rows is None:
            return self.k_max
        return max((self.slot_k[s] for s in batch.used_slots), default=0)

    def narrowed(self, batch: SlotBatch) -> SlotBatch:
        """A compact batch without the rows whose slot's adapter does not adapt here (a
        DynMoLE token in MixLoRA's FFN experts, a MixLoRA one in DynMoLE's gate/up)."""
        if batch.rows is None:
            return batch
        used = tuple(s for s in batch.used_slots if self.slot_k[s] > 0)
        if len(used) == len(batch.used_slots):
            return batch
        slots = batch.slots[batch.rows]
        keep = torch.isin(slots, torch.tensor(used, dtype=torch.long, device=slots.device))
        return replace(batch, rows=batch.rows[keep], used_slots=used)


def _zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


class RoutingStats(nn.Module):
    """Routing counters of the routers of one launch (one, or a group of projections that
    share their input), per slot, kept on the device.

    On the kernels the routing launch adds to `counts` itself (the route kernel; DynMoLE's
    down router: the down kernel; a few atomics per block, no extra launch); on the
    reference backend `record` / `record_rows` (a group's routers at once) do, ending in a
    single scatter-add into the same fixed-size buffer. Either way: no host sync, no
    data-dependent shapes (CUDA-graph and compile safe). `added` runs outside the forward
    (`RoutingExport`, at a step boundary or slot change) and returns what was added since
    its last call; the device counters only grow (until `reset_slot`), so nothing in the
    forward waits for the host. float64 holds the integer counts exactly (to 2**53) and the
    entropy sum in the same buffer.

    `counts` [routers, slots, columns]; columns of a slot's row: expert selections [E],
    tokens by experts kept [E + 1], tokens by entropy bucket [len(ENTROPY_BUCKETS) + 1, the
    last above 1 by rounding], entropy sum [1].
    """

    def __init__(self, slots: int, experts: int, layer_index: int, routers: tuple[str, ...]):
        super().__init__()
        self.layer_index = layer_index
        self.routers = routers
        self.experts = experts
        columns = 2 * experts + 1 + len(ENTROPY_BUCKETS) + 1 + 1
        self.register_buffer("counts", _zeros(len(routers), slots, columns,
                                              dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_bounds", torch.tensor(ENTROPY_BUCKETS, dtype=torch.float32),
                             persistent=False)  # fp32 whatever the default dtype (vLLM: bf16)
        self._exported: torch.Tensor | None = None
        # Per router: slots whose adapter routes there (a one-expert LoRA may be counted, is
        # never reported: `added` reads 0 for it).
        self.routed_slots: list[set[int]] = [set() for _ in routers]

    def record(self, logits: torch.Tensor, slots: torch.Tensor,
               tables: GatedLoRAStack | MixLoRAStack,
               routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Count this batch's routing from its router logits [T, E] through `tables`
        (the slot buffers of this module's single router). `routed`: (weights, ids) [T, k]
        when the caller has them; else routed again here."""
        rows = _member_rows(tables, None, slots)
        self.record_rows(logits, rows, routed if routed is not None else
                         route(logits, rows.routing, tables.k_max))

    def record_rows(self, logits: torch.Tensor, rows: "RouterRows",
                    routed: tuple[torch.Tensor, torch.Tensor]) -> None:
        """`record` for rows of several routers at once (`RouterRows`), in one scatter-add."""
        weights, ids = routed
        used = rows.used.double()
        n = rows.routing[:, NUM_EXPERTS]
        entropy = torch.special.entr(masked_softmax(logits, n.round().long())).sum(-1) \
            / n.clamp_min(2).log()
        entropy = torch.where(used > 0, entropy, 0.0)  # empty slots' rows are NaN
        chosen = (weights > 0).double() * used[:, None]
        columns = self.counts.shape[2]
        row = (rows.counter * columns)[:, None]
        E = self.experts
        index = torch.cat([row + ids.long(),
                           row + E + chosen.sum(1, keepdim=True).long(),
                           row + 2 * E + 1 + torch.bucketize(entropy, self.entropy_bounds)[:, None],
                           row + columns - 1], dim=1)
        values = torch.cat([chosen, used[:, None], used[:, None], entropy.double()[:, None]],
                           dim=1)
        self.counts.view(-1).index_add_(0, index.view(-1), values.view(-1))

    def added(self, current: torch.Tensor | None = None) -> torch.Tensor:
        """Counts added since the last call [routers, slots, columns], on the host (outside
        the forward); slots not routed through a router read 0 there. `current`: a host
        copy of `counts` made by the caller (`RoutingExport`)."""
        current = self.counts.to("cpu", copy=True) if current is None else current
        added = current - (self._exported if self._exported is not None else 0)
        self._exported = current
        for index, slots in enumerate(self.routed_slots):
            added[index, [s for s in range(added.shape[1]) if s not in slots]] = 0
        return added

    def reset_slot(self, slot: int, routed: list[bool]) -> None:
        """Forget a slot's counts (its adapter left; collect its counts first). `routed[i]`:
        whether the new adapter routes through router i."""
        self.counts[:, slot].zero_()
        if self._exported is not None:
            self._exported[:, slot].zero_()
        for slots, routes in zip(self.routed_slots, routed, strict=True):
            (slots.add if routes else slots.discard)(slot)


@dataclass(frozen=True)
class RouterRows:
    """Per routed row: its routing-table row, whether its slot's adapter routes there
    (`used`), and its counter row in `RoutingStats.counts` (router * slots + slot)."""

    routing: torch.Tensor  # [rows, NUM_COLUMNS]
    used: torch.Tensor     # [rows] bool
    counter: torch.Tensor  # [rows] long


def _member_rows(tables: GroupedLoRAStack | GatedLoRAStack | MixLoRAStack | MixLoRABuffers,
                 members: list[int] | None, slots: torch.Tensor) -> RouterRows:
    """The `RouterRows` of tokens with `slots` through router `members` of a group, rows
    stacked member by member (None: a single router's tables)."""
    slot = slots.clamp(min=0)
    if members is None:
        return RouterRows(tables.routing[slot], (slots >= 0) & tables.enabled[slot], slot)
    num_slots = tables.enabled.shape[1]
    return RouterRows(torch.cat([tables.routing[m, slot] for m in members]),
                      torch.cat([(slots >= 0) & tables.enabled[m, slot] for m in members]),
                      torch.cat([slot + m * num_slots for m in members]))


def split_counts(counts: torch.Tensor, experts: int) -> dict[str, torch.Tensor]:
    """A `RoutingStats` row block [..., columns] by kind: `selections` [..., E],
    `experts_per_token` [..., E + 1], `entropy_buckets` [..., B + 1] (integers) and
    `entropy_sum` [...]."""
    whole = counts[..., :-1].round().long()
    return {"selections": whole[..., :experts],
            "experts_per_token": whole[..., experts:2 * experts + 1],
            "entropy_buckets": whole[..., 2 * experts + 1:], "entropy_sum": counts[..., -1]}


class RoutingExport:
    """The host side of a model's routing counters. `collect` (a step boundary or a slot
    change) brings every router's counts since the last call to the host in one copy and adds
    them to their adapter's pending sums; `flush` (every `metrics_interval_s`) writes those to
    Prometheus, one pass per adapter. A slot change, which must collect the leaving adapter's
    counts first, thus costs a copy, not a Prometheus update of every layer's series."""

    def __init__(self, stats: list[RoutingStats]):
        self.stats = stats
        self.routers = [(s.layer_index, name) for s in stats for name in s.routers]
        self.pending: dict[str, torch.Tensor] = {}  # adapter -> [routers, columns]

    def collect(self, slot_names: list[str | None]) -> None:
        if not self.stats:
            return
        host = torch.cat([s.counts.reshape(-1) for s in self.stats]).cpu()  # one copy
        parts = host.split([s.counts.numel() for s in self.stats])
        added = torch.cat([s.added(part.view(s.counts.shape))
                           for s, part in zip(self.stats, parts)])
        for slot, name in enumerate(slot_names):
            if name is not None and added[:, slot].any():
                self.pending[name] = added[:, slot] + self.pending.get(name, 0)

    def flush(self) -> None:
        experts = self.stats[0].experts if self.stats else 0
        for name, counts in self.pending.items():
            metrics.routing_observed(name, self.routers, **split_counts(counts, experts))
        self.pending.clear()


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

    def stack(self, k_max: int | None = None) -> GroupedLoRAStack:
        """The buffers as a stack routing to `k_max` experts (default: all a slot holds)."""
        return GroupedLoRAStack(self.router, self.a, self.b, self.scaling, self.routing,
                                self.enabled, self.k_max if k_max is None else k_max,
                                tuple(d.local_out for d in self.dims))


_ONE_EXPERT_ROUTING = one_expert_routing_row()


def _one_expert(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of a plain LoRA held as a one-expert stack: weight 1 on expert 0."""
    return (torch.ones(rows, 1, device=device),
            torch.zeros(rows, 1, dtype=torch.long, device=device))


ROW_PARALLEL = ("o_proj", "down_proj")  # vLLM splits their inputs; the rest their outputs
KV_PROJS = ("k_proj", "v_proj")  # split by heads, replicated when heads are fewer than ranks


@dataclass(frozen=True)
class ShardDims:
    """A projection's slices on this rank (`TensorShard`): one of them is the full range."""

    in_part: slice
    out_part: slice
    local_in: int
    local_out: int
    splits_input: bool  # row-parallel over several ranks: routers see a slice of the input

    @classmethod
    def of(cls, base: BaseShape, proj: str, shard: TensorShard) -> "ShardDims":
        fan_in, fan_out = base.in_out(proj)
        if proj in ROW_PARALLEL:
            in_part, out_part = shard.part(fan_in), slice(None)
        elif proj in KV_PROJS:
            in_part, out_part = slice(None), shard.kv_part(base.num_kv_heads, base.head_dim)
        else:
            in_part, out_part = slice(None), shard.part(fan_out)
        return cls(in_part, out_part, len(range(fan_in)[in_part]),
                   len(range(fan_out)[out_part]), proj in ROW_PARALLEL and shard.world > 1)


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
            kernels = _kernels()
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
                                      buffers.routes_split_input, stats, batch, gathers)
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
                       batch: SlotBatch, gathers: bool
                       ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The routing (weights, ids) of a group's `members`, their rows stacked member by
        member: routing is row-wise, so one route, count and all-reduce serve the whole
        group (q/k/v: a third of the small ops)."""
        if not members:
            return {}
        if gathers:
            logits = torch.cat([router_logits(x, slots, stack.router[m]) for m in members])
        else:
            logits = grouped.router_logits(x, slots, stack.router, members, batch.used_slots)
        if split_input:
            logits = self.shard.all_reduce(logits)
        tables = _member_rows(stack, members, slots)
        weights, ids = route(logits, tables.routing, stack.k_max)
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
        step.gate_up_routing = _kernels().dynmole_gate_up_route(
            x, batch.plan, self.gated["gate_up"].stack(), _kernel_counts(stats))
        return gate_up, step

    def adapt_intermediate(self, h: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor,
                           batch: SlotBatch, step: "FFNStep") -> torch.Tensor:
        """After the frozen SiLU·mul (h = act(g) * u): DynMoLE tokens' rows of h get their
        gate/up deltas (kernels: launch 2, which also reduces down's routing), MixLoRA
        tokens' rows their experts' mix."""
        g, u = gate_up.chunk(2, dim=-1)
        if step.gate_up_routing is not None:
            kernels = _kernels()
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
            _kernels().dynmole_down_delta_(y, step.down_partials, batch.plan,
                                           self.gated["down"].stack().member(0),
                                           _kernel_counts(stats))
        elif "down" in self.gated:
            y = self.project(y, h, batch, "down")
        return self.add_down_delta(y, batch, step.mixlora)

    def mix_experts(self, h: torch.Tensor, g: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
                    batch: SlotBatch) -> tuple[torch.Tensor, tuple | None]:
        """MixLoRA tokens get their experts' weight-mixed intermediate in place of `h`
        (DESIGN §1 rewrites 1-2). Returns (h, routing state for `add_down_delta`)."""
        if self.mixlora is None:
            return h, None
        if self.use_kernels:
            stack = self.mixlora.stack()
            kernels = _kernels()
            routing = kernels.mixlora_route(x, batch.plan, stack,
                                            _kernel_counts(self.mixlora_stats))
            partials = kernels.mixlora_experts_(h, g, u, routing, batch.plan, stack)
            return h, (routing, partials)
        batch = self.mixlora.narrowed(batch)
        k = self.mixlora.k_for(batch)
        if k == 0:
            return h, None
        stack = self.mixlora.stack(k)
        x_rows, slots = batch.take(x), batch.take(batch.slots)
        gathers = self.mixlora.gathers(batch)
        if gathers:
            logits = router_logits(x_rows, slots, stack.router)
        else:
            logits = grouped.router_logits(x_rows, slots, stack.router[None], [0],
                                           batch.used_slots)
        weights, ids, uses = mixlora_route(x_rows, slots, stack, logits)
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
        return batch.put(h, mixed), (batch, stack, down_shrink, weights, ids, uses)

    def routing_stats(self) -> list[RoutingStats]:
        own = [] if self.mixlora_stats is None else [self.mixlora_stats]
        return super().routing_stats() + own

    def add_down_delta(self, y: torch.Tensor, batch: SlotBatch, routed: tuple | None
                       ) -> torch.Tensor:
        """y + sum_k w_k s B_d,k A_d,k h_k on MixLoRA tokens (`routed`: `mix_experts`'
        state; None: no MixLoRA experts here, or none the batch's slots use)."""
        if routed is None:
            return y
        if self.use_kernels:
            routing, partials = routed
            _kernels().mixlora_down_delta_(y, partials, routing, batch.plan,
                                           self.mixlora.stack())
            return y
        batch, stack, down_shrink, weights, ids, uses = routed  # its narrowed batch
        slots = batch.take(batch.slots)
        if self.mixlora.gathers(batch):
            delta = mixlora_down_delta(down_shrink, slots, weights, ids, stack)
        else:
            delta = grouped.mixlora_down_delta(down_shrink, slots, weights, ids, stack,
                                               batch.used_slots)
        return batch.put(y, add_where(batch.take(y), delta, uses))


@dataclass
class FFNStep:
    """What one FFN forward carries between its adapter steps (kernels: launch outputs)."""

    gate_up_routing: Routing | None = None       # DynMoLE's gate/up routing (launch 1)
    down_partials: DownPartials | None = None    # DynMoLE down's partial sums (launch 2)
    mixlora: tuple | None = None                 # MixLoRA's routing state for its down delta


def _kernels():
    """`mole_serve.kernels`, imported on first use only: importing it without CUDA switches
    Triton to its interpreter for the whole process, which a CPU server must not do."""
    from . import kernels
    return kernels


def _kernel_counts(stats: RoutingStats | None):
    """The route kernel adds the routing metrics itself (no extra launch)."""
    if stats is None:
        return None
    return _kernels().RoutingCounts(stats.counts, stats.entropy_bounds)


