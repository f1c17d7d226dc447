"""The kernels as `torch.library` custom ops (namespace `mole_serve`), with fake impls so
`torch.compile(fullgraph=True)` traces through them and vLLM can capture them in CUDA graphs.

Ops take plain tensors (a custom-op schema cannot hold dataclasses); each impl rebuilds the
launcher's small dataclasses. Tile sizes that do not change output shapes are picked inside
the impl from the concrete token count. An empty batch launches nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .configs import pick_tiles
from .dynmole import (DownExpand, DownPartials, DownShrink, GateUpExperts, launch_down,
                      launch_intermediate)
from .expand import ExpandWeights, launch_expand
from .experts import ExpertWeights, launch_experts
from .plan import TokenPlan
from .route import (RouterWeights, Routing, RoutingCounts, launch_route,
                    launch_router_logits)


def _plan(sorted_tokens: Tensor, block_slot: Tensor) -> TokenPlan:
    return TokenPlan(sorted_tokens, block_slot, sorted_tokens.numel() // block_slot.numel())


@torch.library.custom_op("mole_serve::route", mutates_args=("counts",))
def route(x: Tensor, router: Tensor, shrink_a: Tensor, routing_table: Tensor,
          enabled: Tensor, sorted_tokens: Tensor, block_slot: Tensor, k_max: int,
          counts: Tensor | None = None, entropy_bounds: Tensor | None = None,
          logits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """For G projections sharing x (router [G, S, E, H], shrink_a [G, S, E, NR, H]):
    -> (ids [G, T, k_max] int32, weights [G, T, k_max] fp32, shrink [G, T, k_max, NR] fp32);
    adds the routing to `counts` (metrics, `RoutingCounts`) when given; routes from
    `logits` [G, T, E] (the sum of the ranks' `router_logits`) when given."""
    G, T, NR = shrink_a.shape[0], x.shape[0], shrink_a.shape[3]
    out = Routing(x.new_empty((G, T, k_max), dtype=torch.int32),
                  x.new_empty((G, T, k_max), dtype=torch.float32),
                  x.new_empty((G, T, k_max, NR), dtype=torch.float32))
    if T > 0:
        launch_route(x, RouterWeights(router, shrink_a, routing_table, enabled, k_max),
                     _plan(sorted_tokens, block_slot), out,
                     pick_tiles(T, "route", router.shape[2], NR),
                     None if counts is None else RoutingCounts(counts, entropy_bounds), logits)
    return out.ids, out.weights, out.shrink


@route.register_fake
def _route_fake(x, router, shrink_a, routing_table, enabled, sorted_tokens, block_slot, k_max,
                counts=None, entropy_bounds=None, logits=None):
    G, T, NR = shrink_a.shape[0], x.shape[0], shrink_a.shape[3]
    return (x.new_empty((G, T, k_max), dtype=torch.int32),
            x.new_empty((G, T, k_max), dtype=torch.float32),
            x.new_empty((G, T, k_max, NR), dtype=torch.float32))


@torch.library.custom_op("mole_serve::router_logits", mutates_args=())
def router_logits(x: Tensor, router: Tensor, shrink_a: Tensor, routing_table: Tensor,
                  enabled: Tensor, sorted_tokens: Tensor, block_slot: Tensor) -> Tensor:
    """Each token's router logits through its slot's router, [G, T, E] fp32 (0 for tokens
    without an enabled slot): under tensor parallelism, this rank's partial sums."""
    G, S, E = router.shape[:3]
    logits = x.new_empty((G, x.shape[0], E), dtype=torch.float32)
    if x.shape[0] > 0:
        launch_router_logits(x, RouterWeights(router, shrink_a, routing_table, enabled, E),
                             _plan(sorted_tokens, block_slot), logits,
                             pick_tiles(x.shape[0], "route", E, shrink_a.shape[3]))
    return logits


@router_logits.register_fake
def _router_logits_fake(x, router, shrink_a, routing_table, enabled, sorted_tokens,
                        block_slot):
    return x.new_empty((router.shape[0], x.shape[0], router.shape[2]), dtype=torch.float32)


@torch.library.custom_op("mole_serve::mixlora_experts", mutates_args=("h",))
def mixlora_experts(h: Tensor, g: Tensor, u: Tensor, shrink: Tensor, ids: Tensor,
                    weights: Tensor, gate_up_b: Tensor, down_a: Tensor, scaling: Tensor,
                    enabled: Tensor, sorted_tokens: Tensor, block_slot: Tensor, act_fn: str,
                    split_i: int) -> Tensor:
    """Overwrites MixLoRA tokens' rows of h; -> down-shrink partials [split_i, T, K, R]."""
    T, K = ids.shape
    partials = h.new_empty((split_i, T, K, down_a.shape[2]), dtype=torch.float32)
    if T > 0:
        launch_experts(g, u, h, Routing(ids, weights, shrink),
                       ExpertWeights(gate_up_b, down_a, scaling, enabled),
                       _plan(sorted_tokens, block_slot), partials,
                       pick_tiles(T, "experts", down_a.shape[1], down_a.shape[2]), act_fn)
    return partials


@mixlora_experts.register_fake
def _experts_fake(h, g, u, shrink, ids, weights, gate_up_b, down_a, scaling, enabled,
                  sorted_tokens, block_slot, act_fn, split_i):
    T, K = ids.shape
    return h.new_empty((split_i, T, K, down_a.shape[2]), dtype=torch.float32)


@torch.library.custom_op("mole_serve::routed_expand", mutates_args=("y",))
def routed_expand(y: Tensor, partials: Tensor, ids: Tensor, weights: Tensor, b: Tensor,
                  scaling: Tensor, enabled: Tensor, sorted_tokens: Tensor,
                  block_slot: Tensor, out_sizes: list[int]) -> None:
    """y[t, cols of g] += sum_k w_gk s_g B[slot, e_gk] (sum of partials)_gk on adapter tokens'
    rows, for G projections (ids/weights [G, T, K], partials [P, G, T, K, R], scaling and
    enabled [G, S]) whose outputs are adjacent column ranges of y, `out_sizes` wide."""
    if y.shape[0] > 0:
        launch_expand(y, partials, ids, weights,
                      ExpandWeights(b, scaling, enabled, tuple(out_sizes)),
                      _plan(sorted_tokens, block_slot),
                      pick_tiles(y.shape[0], "expand", b.shape[1], b.shape[3]))


@routed_expand.register_fake
def _expand_fake(y, partials, ids, weights, b, scaling, enabled, sorted_tokens, block_slot,
                 out_sizes):
    return None


@torch.library.custom_op("mole_serve::dynmole_intermediate", mutates_args=("h",))
def dynmole_intermediate(h: Tensor, g: Tensor, u: Tensor, ids: Tensor, weights: Tensor,
                         shrink: Tensor, gate_up_b: Tensor, gate_up_scaling: Tensor,
                         gate_up_enabled: Tensor, down_router: Tensor, down_a: Tensor,
                         down_routing: Tensor, down_enabled: Tensor, sorted_tokens: Tensor,
                         block_slot: Tensor, act_fn: str, split_i: int
                         ) -> tuple[Tensor, Tensor]:
    """Overwrites the rows of h of tokens with gate/up experts (routing ids/weights/shrink
    [2, T, K(, R)] of gate and up); -> the down router's logits [split_i, T, E] and every
    down expert's shrink [split_i, T, E, R], partial sums over the intermediate dim."""
    T, E, R = h.shape[0], down_a.shape[1], down_a.shape[2]
    partials = DownPartials(h.new_empty((split_i, T, E), dtype=torch.float32),
                            h.new_empty((split_i, T, E, R), dtype=torch.float32))
    if T > 0:
        launch_intermediate(
            g, u, h, GateUpExperts(ids, weights, shrink, gate_up_b, gate_up_scaling,
                                   gate_up_enabled),
            DownShrink(down_router, down_a, down_routing, down_enabled),
            _plan(sorted_tokens, block_slot), partials,
            pick_tiles(T, "experts", max(E, gate_up_b.shape[1]), max(R, gate_up_b.shape[3])),
            act_fn)
    return partials.logits, partials.shrink


@dynmole_intermediate.register_fake
def _intermediate_fake(h, g, u, ids, weights, shrink, gate_up_b, gate_up_scaling,
                       gate_up_enabled, down_router, down_a, down_routing, down_enabled,
                       sorted_tokens, block_slot, act_fn, split_i):
    T, E, R = h.shape[0], down_a.shape[1], down_a.shape[2]
    return (h.new_empty((split_i, T, E), dtype=torch.float32),
            h.new_empty((split_i, T, E, R), dtype=torch.float32))


@torch.library.custom_op("mole_serve::dynmole_down", mutates_args=("y", "counts"))
def dynmole_down(y: Tensor, logits: Tensor, shrink: Tensor, b: Tensor, scaling: Tensor,
                 routing_table: Tensor, enabled: Tensor, sorted_tokens: Tensor,
                 block_slot: Tensor, k_max: int, counts: Tensor | None = None,
                 entropy_bounds: Tensor | None = None) -> None:
    """y += the selected down experts' delta on the rows of tokens with down experts, routed
    from the summed `logits` [PL, T, E] partials, expanded from the summed `shrink`
    [P, T, E, R] ones; adds the routing to `counts` [S, C] (metrics) when given."""
    if y.shape[0] > 0:
        launch_down(y, DownPartials(logits, shrink),
                    DownExpand(b, scaling, routing_table, enabled, k_max),
                    _plan(sorted_tokens, block_slot),
                    pick_tiles(y.shape[0], "expand", b.shape[1], b.shape[3]),
                    None if counts is None else RoutingCounts(counts, entropy_bounds))


@dynmole_down.register_fake
def _down_fake(y, logits, shrink, b, scaling, routing_table, enabled, sorted_tokens,
               block_slot, k_max, counts=None, entropy_bounds=None):
    return None
