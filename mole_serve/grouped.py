"""The reference's expert math for a step whose slots are known on the host (a CPU server's
compact steps, `slots.SlotBatch`): rows grouped by slot, and each slot's experts applied to
its rows with GEMMs over that slot's factors, where the reference gathers every token's
expert factors (at Llama-3.2-1B's FFN size, 1.4 MB per token and expert).

Every expert of the slot's adapter is computed and the unselected ones weigh 0, so the result
is the reference's up to summation order, at (experts / selected) times its expert FLOPs:
small beside the frozen GEMMs, and far cheaper on a CPU than the gathers once a slot has
many rows (prefill); a decode step's few rows gather instead (`slots.ExpertColumns.gathers`
picks per buffer). Routers run per slot as GEMMs too, and plain LoRA held as a one-expert
stack skips the routing. A loop over the step's slots and host reads: eager CPU steps only,
never the kernels' CUDA-graph path.
"""

from __future__ import annotations

import torch

from .reference import ACTIVATIONS, by_token_chunks
from .routing import NUM_EXPERTS
from .stack import GatedLoRAStack, MixLoRAStack


def _slot_groups(slots: torch.Tensor, used_slots: tuple[int, ...], stack):
    """(slot, its rows, its adapter's expert count) for each used slot whose adapter the
    stack holds (another slot's rows keep a zero delta, as the reference's `uses` mask)."""
    for slot in used_slots:
        if bool(stack.enabled[slot]):
            rows = (slots == slot).nonzero().flatten()
            yield slot, rows, int(stack.routing[slot, NUM_EXPERTS])


def router_logits(x: torch.Tensor, slots: torch.Tensor, router: torch.Tensor,
                  members: list[int], used_slots: tuple[int, ...]) -> torch.Tensor:
    """`reference.router_logits` through routers `members` of `router` [G, S, E, in], stacked
    router by router [len(members) * T, E] fp32: per used slot one GEMM of its rows against
    its routers, where the reference gathers each token's router rows."""
    g, E = len(members), router.shape[2]
    logits = torch.zeros(g, x.shape[0], E, device=x.device)
    for slot in used_slots:
        rows = (slots == slot).nonzero().flatten()
        weights = router[members, slot].reshape(g * E, -1).float()
        logits[:, rows] = (x[rows].float() @ weights.T).view(-1, g, E).transpose(0, 1)
    return logits.flatten(0, 1)


def _dense(values: torch.Tensor, ids: torch.Tensor, experts: int) -> torch.Tensor:
    """[n, k, ...] values of the experts `ids` [n, k] -> [n, experts, ...], zero for the
    experts not selected (ids of padded experts, which the reference weighs 0, dropped)."""
    width = max(experts, int(ids.max()) + 1) if ids.numel() else experts
    index = ids.reshape(*ids.shape, *[1] * (values.dim() - 2)).expand_as(values)
    dense = values.new_zeros(ids.shape[0], width, *values.shape[2:])
    return dense.scatter(1, index, values)[:, :experts]


def mixlora_experts(g0: torch.Tensor, u0: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                    weights: torch.Tensor, ids: torch.Tensor, stack: MixLoRAStack,
                    used_slots: tuple[int, ...], act_fn: str = "silu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.mixlora_experts`: (mixed intermediate [T, I], down shrinks [T, k, r])."""
    mixed = torch.zeros(g0.shape, dtype=torch.float32, device=g0.device)
    down_shrink = torch.zeros(*ids.shape, stack.down_a.shape[2], device=g0.device)
    for slot, rows, experts in _slot_groups(slots, used_slots, stack):
        mixed[rows], down_shrink[rows] = by_token_chunks(
            _slot_experts, experts * g0.shape[1], g0[rows], u0[rows], x[rows], weights[rows],
            ids[rows], stack=stack, slot=slot, experts=experts, act_fn=act_fn)
    return mixed, down_shrink


def _slot_experts(g0, u0, x, weights, ids, *, stack: MixLoRAStack, slot: int, experts: int,
                  act_fn: str):
    r = stack.down_a.shape[2]
    scale = stack.scaling[slot]
    shrink = torch.einsum("nh,erh->ner", x.float(), stack.gate_up_a[slot, :experts].float())
    expand = stack.gate_up_b[slot, :experts].float()                   # [e, 2, I, r]
    g = g0.float()[:, None] + scale * torch.einsum("ner,eir->nei", shrink[..., :r],
                                                   expand[:, 0])
    u = u0.float()[:, None] + scale * torch.einsum("ner,eir->nei", shrink[..., r:],
                                                   expand[:, 1])
    h = ACTIVATIONS[act_fn](g) * u                                     # [n, e, I]
    mixed = torch.einsum("ne,nei->ni", _dense(weights, ids, experts), h)
    down = torch.einsum("nei,eri->ner", h, stack.down_a[slot, :experts].float())
    selected = ids.clamp(max=experts - 1)[..., None].expand(-1, -1, r)
    return mixed, torch.where(ids[..., None] < experts, down.gather(1, selected), 0.0)


def mixlora_down_delta(down_shrink: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, stack: MixLoRAStack, used_slots: tuple[int, ...]
                       ) -> torch.Tensor:
    """`reference.mixlora_down_delta`: sum_k w_k s B_d,k (A_d,k h_k) -> [T, H] fp32."""
    delta = torch.zeros(ids.shape[0], stack.down_b.shape[2], device=ids.device)
    for slot, rows, experts in _slot_groups(slots, used_slots, stack):
        coef = weights[rows] * stack.scaling[slot]
        shrink = _dense(down_shrink[rows] * coef[..., None], ids[rows], experts)
        delta[rows] = torch.einsum("ner,ehr->nh", shrink, stack.down_b[slot, :experts].float())
    return delta


def gated_lora_delta(x: torch.Tensor, slots: torch.Tensor, stack: GatedLoRAStack,
                     routed: tuple[torch.Tensor, torch.Tensor] | None,
                     used_slots: tuple[int, ...], lora_slots: set[int] | frozenset = frozenset()
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.gated_lora_delta` given the routing: (delta [T, out] fp32, uses mask).
    Slots in `lora_slots` hold a plain LoRA as a one-expert stack (weight 1: switch routing
    over one expert) and skip the routing (None when they are all the step uses)."""
    uses = (slots >= 0) & stack.enabled[slots.clamp(min=0)]
    delta = torch.zeros(x.shape[0], stack.b.shape[2], device=x.device)
    for slot, rows, experts in _slot_groups(slots, used_slots, stack):
        if slot in lora_slots:
            shrink = x[rows].float() @ stack.a[slot, 0].float().T * stack.scaling[slot]
            delta[rows] = shrink @ stack.b[slot, 0].float().T
            continue
        weights, ids = routed
        coef = _dense(weights[rows] * stack.scaling[slot], ids[rows], experts)
        shrink = torch.einsum("ni,eri->ner", x[rows].float(), stack.a[slot, :experts].float())
        delta[rows] = torch.einsum("ner,eor->no", shrink * coef[..., None],
                                   stack.b[slot, :experts].float())
    return delta, uses
