"""What the vLLM layer calls: the MoLE FFN and projections on the Triton kernels.

`mole_ffn_kernels` / `mole_projection_kernels` mirror `mole_serve.reference.mole_ffn` /
`mole_projection` (same arguments, same results within fp32 rounding; base-model tokens
bit-identical). The pieces below them let a layer that owns its own frozen GEMMs (vLLM's
merged gate_up and down linears) run the same pipeline:

    plan = plan_tokens(slots, num_slots, BLOCK_M)        # once per batch, shared by layers
    gate_up = W_gu x                                      # frozen GEMM 1
    h = act(g) * u                                        # the frozen model's own SiLU·mul
    routing = mixlora_route(x, plan, stack)               # launch 1
    partials = mixlora_experts_(h, g, u, routing, ...)    # launch 2: adapter rows of h
    y = W_d h                                             # frozen GEMM 2
    mixlora_down_delta_(y, partials, routing, ...)        # launch 3: adapter rows of y

DynMoLE's FFN (routed experts on gate, up and down) is three launches the same way, the
gate/up deltas added inside the intermediate (down's router reads h, so its routing is
reduced there and decided after the down GEMM; kernels/dynmole.py):

    routing = dynmole_gate_up_route(x, plan, gate_up)     # launch 1 (gate and up)
    h = act(g) * u                                        # the frozen SiLU·mul
    partials = dynmole_intermediate_(h, g, u, routing, ...)  # launch 2: adapter rows of h
    y = W_d h
    dynmole_down_delta_(y, partials, plan, down)          # launch 3: adapter rows of y

Any other routed (DynMoLE) or plain LoRA projection is two launches on the frozen output,
also for a group of projections that share x (q/k/v: `GroupedLoRAStack`, y their fused
output):

    y = W x;  gated_lora_(y, x, plan, stack.gated[proj])      # or as_gated(stack.lora[proj])

Base-model rows of `h` and `y` are computed by the frozen ops alone and never written by a
kernel, so they are bit-identical to the frozen model whatever its activation kernel is.
Build the plan once per step, outside the per-layer graphs (vLLM splits the compiled model
at attention, so a plan built inside each layer would be recomputed 32 times per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mole_serve.reference import FrozenFFN
from mole_serve.routing import one_expert_routing_row
from mole_serve.stack import (GatedLoRAStack, GroupedLoRAStack, LayerStack, LoRAStack,
                              MixLoRAStack)

from . import ops  # noqa: F401  (registers torch.ops.mole_serve.*)
from .configs import BLOCK_M, split_i_for
from .dynmole import DownPartials
from .plan import TokenPlan, plan_tokens
from .route import Routing, RoutingCounts

_OPS = torch.ops.mole_serve


def num_slots(stack: LayerStack) -> int | None:
    """Slot count of a layer's stacks (None when no adapter touches the layer)."""
    parts = [stack.ffn, *stack.gated.values(), *stack.lora.values()]
    return next((p.enabled.shape[0] for p in parts if p is not None), None)


def mixlora_route(x: torch.Tensor, plan: TokenPlan, stack: MixLoRAStack,
                  counts: RoutingCounts | None = None) -> Routing:
    """Launch 1: expert ids/weights [T, k_max] and the gate/up shrink of selected experts
    (and the routing metrics added to `counts`, [1, S, C])."""
    routing = _route(x, plan, stack.router[None], stack.gate_up_a[None], stack.routing[None],
                     stack.enabled[None], stack.k_max, counts)
    return Routing(routing.ids[0], routing.weights[0], routing.shrink[0])


def _route(x: torch.Tensor, plan: TokenPlan, router: torch.Tensor, shrink_a: torch.Tensor,
           table: torch.Tensor, enabled: torch.Tensor, k_max: int,
           counts: RoutingCounts | None, logits: torch.Tensor | None = None) -> Routing:
    """Routing of G projections sharing x: ids/weights [G, T, K], shrink [G, T, K, NR]."""
    ids, weights, shrink = _OPS.route(
        x, router, shrink_a, table, enabled, plan.sorted_tokens, plan.block_slot, k_max,
        None if counts is None else counts.counts, None if counts is None else counts.bounds,
        logits)
    return Routing(ids, weights, shrink)


def router_logits(x: torch.Tensor, plan: TokenPlan, stack: GroupedLoRAStack) -> torch.Tensor:
    """One launch: each token's router logits [G, T, E] fp32 through its slot's routers.
    Under tensor parallelism, with x this rank's slice of a row-parallel projection's input:
    this rank's partial logits; all-reduce them and pass them to `gated_lora_`."""
    return _OPS.router_logits(x, stack.router, stack.a, stack.routing, stack.enabled,
                              plan.sorted_tokens, plan.block_slot)


def mixlora_experts_(h: torch.Tensor, g: torch.Tensor, u: torch.Tensor, routing: Routing,
                     plan: TokenPlan, stack: MixLoRAStack, act_fn: str = "silu"
                     ) -> torch.Tensor:
    """Launch 2: overwrite MixLoRA tokens' rows of `h` with `sum_k w_k h_k`; returns the
    down-shrink partial sums [split_i, T, k_max, r] for `mixlora_down_delta_`."""
    return _OPS.mixlora_experts(h, g, u, routing.shrink, routing.ids, routing.weights,
                                stack.gate_up_b, stack.down_a, stack.scaling, stack.enabled,
                                plan.sorted_tokens, plan.block_slot, act_fn,
                                split_i_for(g.shape[1]))


def mixlora_down_delta_(y: torch.Tensor, partials: torch.Tensor, routing: Routing,
                        plan: TokenPlan, stack: MixLoRAStack) -> None:
    """Launch 3: y += sum_k w_k s B_d,k (A_d,k h_k) on MixLoRA tokens' rows."""
    _OPS.routed_expand(y, partials[:, None], routing.ids[None], routing.weights[None],
                       stack.down_b, stack.scaling[None], stack.enabled[None],
                       plan.sorted_tokens, plan.block_slot, [stack.down_b.shape[2]])


def dynmole_gate_up_route(x: torch.Tensor, plan: TokenPlan, gate_up: GroupedLoRAStack,
                          counts: RoutingCounts | None = None) -> Routing:
    """DynMoLE FFN launch 1: gate's and up's routing and shrink of x ([2, T, ...]; counts
    [2, S, C]). Their deltas are added by `dynmole_intermediate_`, not into gate_up."""
    assert len(gate_up.out_sizes) == 2 and gate_up.out_sizes[0] == gate_up.out_sizes[1]
    return _route(x, plan, gate_up.router, gate_up.a, gate_up.routing, gate_up.enabled,
                  gate_up.k_max, counts)


def dynmole_intermediate_(h: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                          routing: Routing, plan: TokenPlan, gate_up: GroupedLoRAStack,
                          down: GatedLoRAStack, act_fn: str = "silu") -> DownPartials:
    """DynMoLE FFN launch 2: overwrite the rows of `h` of tokens with gate/up experts with
    `act(g + dg) * (u + du)` (g, u: the frozen outputs); returns down's router logits and
    every down expert's shrink as partial sums for `dynmole_down_delta_` (under tensor
    parallelism: sum and all-reduce the logits first)."""
    logits, shrink = _OPS.dynmole_intermediate(
        h, g, u, routing.ids, routing.weights, routing.shrink, gate_up.b, gate_up.scaling,
        gate_up.enabled, down.router, down.a, down.routing, down.enabled, plan.sorted_tokens,
        plan.block_slot, act_fn, split_i_for(g.shape[1]))
    return DownPartials(logits, shrink)


def dynmole_down_delta_(y: torch.Tensor, partials: DownPartials, plan: TokenPlan,
                        down: GatedLoRAStack, counts: RoutingCounts | None = None) -> None:
    """DynMoLE FFN launch 3: route down from the summed logits and add the selected experts'
    delta into the rows of `y = W_d h` of tokens with down experts (counts [S, C])."""
    _OPS.dynmole_down(y, partials.logits, partials.shrink, down.b, down.scaling, down.routing,
                      down.enabled, plan.sorted_tokens, plan.block_slot, down.k_max,
                      None if counts is None else counts.counts,
                      None if counts is None else counts.bounds)


def gated_lora_(y: torch.Tensor, x: torch.Tensor, plan: TokenPlan,
                stack: GatedLoRAStack | GroupedLoRAStack,
                counts: RoutingCounts | None = None,
                logits: torch.Tensor | None = None) -> Routing:
    """Per-linear routed LoRA (DynMoLE family), two launches: route + shrink, gated expand,
    for one projection or a group sharing x (`y` their fused output, e.g. vLLM's qkv).
    Adds into the adapter tokens' rows of `y = W x`; returns the routing (with a leading [G]
    dim for a group). With `logits` [G, T, E] (all-reduced `router_logits`) it routes from
    them, and x, the A factors and the added delta are this rank's parts."""
    grouped = isinstance(stack, GroupedLoRAStack)
    group = stack if grouped else GroupedLoRAStack.of([stack])
    routing = _route(x, plan, group.router, group.a, group.routing, group.enabled,
                     group.k_max, counts, logits)
    _OPS.routed_expand(y, routing.shrink[None], routing.ids, routing.weights, group.b,
                       group.scaling, group.enabled, plan.sorted_tokens, plan.block_slot,
                       list(group.out_sizes))
    return routing if grouped else Routing(routing.ids[0], routing.weights[0], routing.shrink[0])


def as_gated(stack: LoRAStack) -> GatedLoRAStack:
    """A plain LoRA stack as a one-expert gated stack (switch routing over one expert gives
    weight exactly 1), so plain LoRA runs on the same two kernels. Build once per layer."""
    S, _, fan_in = stack.a.shape
    router = torch.zeros(S, 1, fan_in, dtype=torch.float32, device=stack.a.device)
    table = one_expert_routing_row().to(stack.a.device).expand(S, -1).contiguous()
    return GatedLoRAStack(router, stack.a.unsqueeze(1), stack.b.unsqueeze(1), stack.scaling,
                          table, stack.enabled, k_max=1)


def mole_projection_kernels(x: torch.Tensor, weight: torch.Tensor, slots: torch.Tensor,
                            proj: str, stack: LayerStack, plan: TokenPlan | None = None
                            ) -> torch.Tensor:
    """`reference.mole_projection` on the kernels."""
    y = F.linear(x, weight)
    if proj not in stack.lora and proj not in stack.gated:
        return y
    plan = plan if plan is not None else plan_tokens(slots, num_slots(stack), BLOCK_M)
    if proj in stack.lora:
        gated_lora_(y, x, plan, as_gated(stack.lora[proj]))
    if proj in stack.gated:
        gated_lora_(y, x, plan, stack.gated[proj])
    return y


def dynmole_gate_up(stack: LayerStack) -> GroupedLoRAStack | None:
    """The layer's gate and up experts as one group when its FFN can take DynMoLE's three
    launches: gate, up and down all routed, gate and up alike in shape."""
    gated = stack.gated
    if not all(p in gated for p in ("gate_proj", "up_proj", "down_proj")):
        return None
    gate, up = gated["gate_proj"], gated["up_proj"]
    if gate.a.shape != up.a.shape or gate.k_max != up.k_max:
        return None
    return GroupedLoRAStack.of([gate, up])


def mole_ffn_kernels(x: torch.Tensor, base: FrozenFFN, slots: torch.Tensor,
                     stack: LayerStack, plan: TokenPlan | None = None) -> torch.Tensor:
    """`reference.mole_ffn` on the kernels: [T, H] in, [T, H] out."""
    count = num_slots(stack)
    if count is None:
        return base(x)
    plan = plan if plan is not None else plan_tokens(slots, count, BLOCK_M)
    g, u = F.linear(x, base.gate), F.linear(x, base.up)
    gate_up = dynmole_gate_up(stack)
    for proj, out in (("gate_proj", g), ("up_proj", u)):
        if proj in stack.lora:
            gated_lora_(out, x, plan, as_gated(stack.lora[proj]))
        if proj in stack.gated and gate_up is None:
            gated_lora_(out, x, plan, stack.gated[proj])
    h = base.act(g) * u
    down = stack.gated.get("down_proj")
    if gate_up is not None:
        routing = dynmole_gate_up_route(x, plan, gate_up)
        down_partials = dynmole_intermediate_(h, g, u, routing, plan, gate_up, down,
                                              base.act_fn)
    ffn = stack.ffn
    if ffn is not None:
        ffn_routing = mixlora_route(x, plan, ffn)
        ffn_partials = mixlora_experts_(h, g, u, ffn_routing, plan, ffn, base.act_fn)
    y = F.linear(h, base.down)
    if "down_proj" in stack.lora:
        gated_lora_(y, h, plan, as_gated(stack.lora["down_proj"]))
    if gate_up is not None:
        dynmole_down_delta_(y, down_partials, plan, down)
    elif down is not None:
        gated_lora_(y, h, plan, down)
    if ffn is not None:
        mixlora_down_delta_(y, ffn_partials, ffn_routing, plan, ffn)
    return y
