"""Routing metrics: counters the layers keep on the device while they route (`RoutingStats`,
no host sync in the forward), brought to Prometheus between steps (`RoutingExport`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import metrics
from .metrics import ENTROPY_BUCKETS
from .routing import NUM_EXPERTS, masked_softmax, route
from .stack import GatedLoRAStack, GroupedLoRAStack, MixLoRAStack

if TYPE_CHECKING:
    from .layers import MixLoRABuffers


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
        self.register_buffer("counts", torch.zeros(len(routers), slots, columns,
                                                  dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_bounds", torch.tensor(ENTROPY_BUCKETS, dtype=torch.float32),
                             persistent=False)  # fp32 whatever the default dtype (vLLM: bf16)
        self._exported: torch.Tensor | None = None
        # Per router: slots whose adapter routes there (a one-expert LoRA may be counted, is
        # never reported: `added` reads 0 for it).
        self.routed_slots: list[set[int]] = [set() for _ in routers]

    def record(self, logits: torch.Tensor, slots: torch.Tensor,
               tables: GatedLoRAStack | MixLoRAStack | MixLoRABuffers,
               routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Count this batch's routing from its router logits [T, E] through `tables`
        (the slot buffers of this module's single router). `routed`: (weights, ids) [T, k]
        when the caller has them; else routed again here."""
        rows = member_rows(tables, None, slots)
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


def member_rows(tables: GroupedLoRAStack | GatedLoRAStack | MixLoRAStack | MixLoRABuffers,
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
