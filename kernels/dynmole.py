"""DynMoLE's FFN in three launches: route gate/up (route.py), then these two kernels.

Per-linear routing puts a router on down_proj whose input is the intermediate itself, so
routing down needs the whole of `h = act(g + dg) * (u + du)`, a reduction over the
intermediate dim that several programs share. As two routed projections (gate/up, then
down; route + expand each) the FFN takes 4 launches; here the gate/up expand and the
reductions down's routing needs share one:

- intermediate kernel (replaces SiLU·mul on DynMoLE tokens): adds the gate and up experts'
  deltas to the frozen `g`, `u`, writes `h` over the token's row (rounded as the frozen path
  rounds: `g`, `u`, `act(g)` and `h` in the serving dtype), and reduces over its slice of the
  intermediate dim the down router's logits and the shrink `A_d,e h` of *every* down expert
  (selection needs the whole intermediate): partial sums `logits[split, t]`,
  `shrink[split, t, e]`, one per program (deterministic, no atomics). Grid: (plan blocks,
  split_i).
- down kernel (after the frozen down GEMM): sums the partials, selects as the route kernel
  does (`_select`, same table, the route's k_max cut), counts the routing metrics, and adds
  `sum_e w_e s B_d,e shrink_e` to the token's row of y, skipping experts no token of the
  block kept. Grid: (plan blocks, split_n).

Reading every down expert's A factor, not only the selected ones, costs up to E·r·I·2 B per
slot a batch touches (1 % of the 7B FFN's weights at E=8, r=16): the price of the launch.
Under tensor parallelism down's input is split over ranks: the caller sums the logits
partials, all-reduces them and passes them as one partial; the shrink stays this rank's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mole_serve import routing as table

from .configs import ExpandTiles, ExpertsTiles, padded
from .expand import _add_expert, _sum_partials, partials_per_load
from .experts import ACTIVATION_CODES, _activation
from .plan import TokenPlan
from .route import (EMPTY, NUM_COLUMNS, NUM_EXPERTS, RoutingCounts, _block_rows,
                    _count_routing, _select, dot_precision)


@dataclass(frozen=True)
class GateUpExperts:
    """The gate (member 0) and up (member 1) experts and their routing (route kernel)."""

    ids: torch.Tensor        # [2, T, K] int32
    weights: torch.Tensor    # [2, T, K] fp32
    shrink: torch.Tensor     # [2, T, K, R] fp32
    b: torch.Tensor          # [S, E, 2I, R]: gate's B on columns [0, I), up's on [I, 2I)
    scaling: torch.Tensor    # [2, S] fp32
    enabled: torch.Tensor    # [2, S] bool


@dataclass(frozen=True)
class DownShrink:
    """What the intermediate kernel reads of down's experts: the router and A factors."""

    router: torch.Tensor     # [S, E, I] fp32
    a: torch.Tensor          # [S, E, R, I]
    routing: torch.Tensor    # [S, NUM_COLUMNS] fp32 (its expert counts)
    enabled: torch.Tensor    # [S] bool


@dataclass(frozen=True)
class DownExpand:
    """What the down kernel reads of down's experts: the routing tables and B factors."""

    b: torch.Tensor          # [S, E, H, R]
    scaling: torch.Tensor    # [S] fp32
    routing: torch.Tensor    # [S, NUM_COLUMNS] fp32
    enabled: torch.Tensor    # [S] bool
    k_max: int


@dataclass(frozen=True)
class DownPartials:
    """Per-program partial sums over the intermediate dim, summed by the down kernel."""

    logits: torch.Tensor     # [P, T, E] fp32
    shrink: torch.Tensor     # [P, T, E, R] fp32


@triton.jit
def _intermediate_kernel(
    g_ptr, u_ptr, stride_g, stride_u, h_ptr, stride_h,
    ids_ptr, weights_ptr, shrink_ptr, b_ptr, scaling_ptr, enabled_ptr,
    router_ptr, down_a_ptr, down_table_ptr, down_enabled_ptr,
    sorted_tokens_ptr, block_slot_ptr, logits_ptr, partials_ptr,
    T, S, I, E, R, ED, RD,
    K: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr, ED_PAD: tl.constexpr,
    RD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(block_slot_ptr + block)
    if slot == EMPTY:
        return
    tok64, row_ok = _block_rows(sorted_tokens_ptr, block, BLOCK_M)
    s = tl.maximum(slot, 0).to(tl.int64)
    has_slot = slot >= 0
    gate_on = has_slot & (tl.load(enabled_ptr + s) != 0)
    up_on = has_slot & (tl.load(enabled_ptr + S + s) != 0)
    down_on = has_slot & (tl.load(down_enabled_ptr + s) != 0)
    first = split * TILES_PER_SPLIT * BLOCK_I
    ee = tl.arange(0, ED_PAD)
    rd = tl.arange(0, RD_PAD)
    out_row = split * T + tok64
    logits_at = logits_ptr + out_row[:, None] * ED + ee[None, :]
    logits_mask = row_ok[:, None] & (ee < ED)[None, :]
    rd_mask = row_ok[:, None] & (rd < RD)[None, :]

    if gate_on | up_on:
        kk = tl.arange(0, K_PAD)
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        pair_ok = row_ok[:, None] & (kk < K)[None, :]
        pair = tok64[:, None] * K + kk[None, :]  # gate's rows; up's are T * K further
        ids_g = tl.load(ids_ptr + pair, mask=pair_ok, other=-1)
        ids_u = tl.load(ids_ptr + T * K + pair, mask=pair_ok, other=-1)
        # A member without experts in this slot (an adapter on up alone) adds nothing.
        w_g = tl.where(gate_on, tl.load(weights_ptr + pair, mask=pair_ok, other=0.0), 0.0)
        w_u = tl.where(up_on, tl.load(weights_ptr + T * K + pair, mask=pair_ok, other=0.0), 0.0)
        used_g = pair_ok & (w_g > 0.0)
        used_u = pair_ok & (w_u > 0.0)
        z_at = shrink_ptr + pair[:, :, None] * R + rr[None, None, :]
        z_mask = r_ok[None, None, :]
        z_g = tl.load(z_at, mask=used_g[:, :, None] & z_mask, other=0.0) \
            * (w_g * tl.load(scaling_ptr + s))[:, :, None]
        z_u = tl.load(z_at + T * K * R, mask=used_u[:, :, None] & z_mask, other=0.0) \
            * (w_u * tl.load(scaling_ptr + S + s))[:, :, None]
        for t in range(TILES_PER_SPLIT):
            ii = first + t * BLOCK_I + tl.arange(0, BLOCK_I)
            i_ok = ii < I
            io_mask = row_ok[:, None] & i_ok[None, :]
            g = tl.load(g_ptr + tok64[:, None] * stride_g + ii[None, :], mask=io_mask,
                        other=0.0).to(tl.float32)
            u = tl.load(u_ptr + tok64[:, None] * stride_u + ii[None, :], mask=io_mask,
                        other=0.0).to(tl.float32)
            for e in range(E):
                expert_b = b_ptr + (s * E + e) * (2 * I) * R
                g = _add_expert(g, z_g, used_g & (ids_g == e), expert_b, ii, i_ok, rr, r_ok,
                                R, PRECISION)
                u = _add_expert(u, z_u, used_u & (ids_u == e), expert_b + I * R, ii, i_ok,
                                rr, r_ok, R, PRECISION)
            # Rounded where the frozen path rounds: g + dg and u + du (stored), act(g) (vLLM's
            # SiLU·mul and torch round it before the product), then h.
            dtype = h_ptr.dtype.element_ty
            g = g.to(g_ptr.dtype.element_ty).to(tl.float32)
            u = u.to(u_ptr.dtype.element_ty).to(tl.float32)
            h = (_activation(g, ACT).to(dtype).to(tl.float32) * u).to(dtype)
            tl.store(h_ptr + tok64[:, None] * stride_h + ii[None, :], h, mask=io_mask)
        tl.debug_barrier()  # the rows stored above are re-read by other threads below

    if not down_on:  # every output element is defined: zero partials
        tl.store(logits_at, tl.zeros([BLOCK_M, ED_PAD], tl.float32), mask=logits_mask)
        for e in range(ED):
            tl.store(partials_ptr + (out_row[:, None] * ED + e) * RD + rd[None, :],
                     tl.zeros([BLOCK_M, RD_PAD], tl.float32), mask=rd_mask)
        return
    logits = tl.zeros([BLOCK_M, ED_PAD], tl.float32)
    for t in range(TILES_PER_SPLIT):
        ii = first + t * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = ii < I
        h = tl.load(h_ptr + tok64[:, None] * stride_h + ii[None, :],
                    mask=row_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(router_ptr + (s * ED + ee[None, :]) * I + ii[:, None],
                    mask=(ee < ED)[None, :] & i_ok[:, None], other=0.0).to(tl.float32)
        logits += tl.dot(h, w, input_precision="ieee")  # routing decisions in fp32
    tl.store(logits_at, logits, mask=logits_mask)
    n_exp = tl.floor(tl.load(down_table_ptr + s * NUM_COLUMNS + NUM_EXPERTS) + 0.5)
    for e in range(ED):
        acc = tl.zeros([BLOCK_M, RD_PAD], tl.float32)
        if e < n_exp:  # padded experts: probability 0, never selected
            for t in range(TILES_PER_SPLIT):
                ii = first + t * BLOCK_I + tl.arange(0, BLOCK_I)
                i_ok = ii < I
                h = tl.load(h_ptr + tok64[:, None] * stride_h + ii[None, :],
                            mask=row_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
                a = tl.load(down_a_ptr + ((s * ED + e) * RD + rd[None, :]) * I + ii[:, None],
                            mask=(rd < RD)[None, :] & i_ok[:, None], other=0.0
                            ).to(tl.float32)
                acc += tl.dot(h, a, input_precision=PRECISION)
        tl.store(partials_ptr + (out_row[:, None] * ED + e) * RD + rd[None, :], acc,
                 mask=rd_mask)


@triton.jit
def _down_kernel(
    y_ptr, stride_y, logits_ptr, partials_ptr, b_ptr, scaling_ptr, table_ptr, enabled_ptr,
    sorted_tokens_ptr, block_slot_ptr, counts_ptr, bounds_ptr,
    T, N, E, R, PL, P,
    K: tl.constexpr, E_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, L_CHUNK: tl.constexpr,
    P_CHUNK: tl.constexpr, PRECISION: tl.constexpr, COUNT: tl.constexpr, NB: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(block_slot_ptr + block)
    if slot < 0:
        return
    s = slot.to(tl.int64)
    if tl.load(enabled_ptr + s) == 0:
        return
    tok64, row_ok = _block_rows(sorted_tokens_ptr, block, BLOCK_M)
    ee = tl.arange(0, E_PAD)
    rr = tl.arange(0, R_PAD)
    logits_mask = row_ok[:, None] & (ee < E)[None, :]
    logits = _sum_partials(logits_ptr + tok64[:, None] * E + ee[None, :], T * E, logits_mask,
                           PL, L_CHUNK)
    rank, weight, probs = _select(logits, table_ptr + s * NUM_COLUMNS, E_PAD)
    weight = tl.where(row_ok[:, None] & (rank < K), weight, 0.0)  # the route's k_max cut
    if COUNT:
        if split == 0:
            n_exp = tl.floor(tl.load(table_ptr + s * NUM_COLUMNS + NUM_EXPERTS) + 0.5)
            _count_routing(counts_ptr + s * (2 * E + NB + 3), bounds_ptr, probs, weight,
                           row_ok, n_exp, E, E_PAD, NB, NB_PAD)
    kept = weight > 0.0
    z_off = (tok64[:, None, None] * E + ee[None, :, None]) * R + rr[None, None, :]
    z_mask = kept[:, :, None] & (rr < R)[None, None, :]
    z = _sum_partials(partials_ptr + z_off, T * E * R, z_mask, P, P_CHUNK)
    z = z * (weight * tl.load(scaling_ptr + s))[:, :, None]

    for t in range(TILES_PER_SPLIT):
        nn = (split * TILES_PER_SPLIT + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for e in range(E):  # the "pairs" of a token are its experts: hits are kept ones
            acc = _add_expert(acc, z, kept & (ee == e)[None, :], b_ptr + (s * E + e) * N * R,
                              nn, n_ok, rr, rr < R, R, PRECISION)
        y_at = y_ptr + tok64[:, None] * stride_y + nn[None, :]
        y_mask = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_at, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def launch_intermediate(g: torch.Tensor, u: torch.Tensor, h: torch.Tensor,
                        gate_up: GateUpExperts, down: DownShrink, plan: TokenPlan,
                        partials: DownPartials, tiles: ExpertsTiles, act_fn: str) -> None:
    """Overwrite the rows of `h` [T, I] of tokens whose slot has gate or up experts; fill
    `partials` (zeros for tokens without down experts)."""
    T, I = h.shape
    S, E, two_i, R = gate_up.b.shape
    _, ED, RD, _ = down.a.shape
    K = gate_up.ids.shape[2]
    split_i = partials.logits.shape[0]
    assert g.shape == u.shape == (T, I) and two_i == 2 * I
    assert g.stride(1) == u.stride(1) == h.stride(1) == 1
    assert gate_up.ids.shape == gate_up.weights.shape == (2, T, K)
    assert gate_up.shrink.shape == (2, T, K, R)
    assert gate_up.scaling.shape == gate_up.enabled.shape == (2, S)
    assert down.router.shape == (S, ED, I) and down.a.shape == (S, ED, RD, I)
    assert down.routing.shape == (S, table.NUM_COLUMNS) and down.enabled.shape == (S,)
    assert partials.logits.shape == (split_i, T, ED)
    assert partials.shrink.shape == (split_i, T, ED, RD)
    for t in (gate_up.ids, gate_up.weights, gate_up.shrink, gate_up.b, down.router, down.a,
              down.routing, partials.logits, partials.shrink):
        assert t.is_contiguous()
    _intermediate_kernel[(plan.num_blocks, split_i)](
        g, u, g.stride(0), u.stride(0), h, h.stride(0),
        gate_up.ids, gate_up.weights, gate_up.shrink, gate_up.b, gate_up.scaling,
        gate_up.enabled, down.router, down.a, down.routing, down.enabled,
        plan.sorted_tokens, plan.block_slot, partials.logits, partials.shrink,
        T, S, I, E, R, ED, RD,
        K=K, K_PAD=triton.next_power_of_2(K), R_PAD=padded(R), ED_PAD=padded(ED),
        RD_PAD=padded(RD), BLOCK_M=plan.block_m, BLOCK_I=tiles.block_i,
        TILES_PER_SPLIT=triton.cdiv(triton.cdiv(I, tiles.block_i), split_i),
        ACT=ACTIVATION_CODES[act_fn], PRECISION=dot_precision(h.dtype),
        num_warps=tiles.num_warps)


def launch_down(y: torch.Tensor, partials: DownPartials, down: DownExpand, plan: TokenPlan,
                tiles: ExpandTiles, counts: RoutingCounts | None = None) -> None:
    """Add the selected down experts' delta into the rows of `y` [T, H] of tokens whose slot
    has down experts; with `counts`, add their routing to the metrics counters."""
    S, E, N, R = down.b.shape
    T = y.shape[0]
    PL, P = partials.logits.shape[0], partials.shrink.shape[0]
    NB = 0 if counts is None else counts.bounds.shape[0]
    assert y.shape == (T, N) and y.stride(1) == 1
    assert partials.logits.shape == (PL, T, E) and partials.shrink.shape == (P, T, E, R)
    assert partials.logits.is_contiguous() and partials.shrink.is_contiguous()
    assert down.b.is_contiguous() and down.routing.is_contiguous()
    if counts is not None:  # [S, C], or a group's [1, S, C]
        assert counts.counts.shape[-2:] == (S, 2 * E + NB + 3) and counts.counts.is_contiguous()
        assert counts.counts.numel() == S * (2 * E + NB + 3)
    n_tiles = triton.cdiv(N, tiles.block_n)
    split_n = min(tiles.split_n, n_tiles)
    unused = y  # a pointer for arguments this launch never touches
    _down_kernel[(plan.num_blocks, split_n)](
        y, y.stride(0), partials.logits, partials.shrink, down.b, down.scaling, down.routing,
        down.enabled, plan.sorted_tokens, plan.block_slot,
        unused if counts is None else counts.counts, unused if counts is None else counts.bounds,
        T, N, E, R, PL, P,
        # No dot runs over the experts here: E_PAD need not reach tl.dot's 16.
        K=down.k_max, E_PAD=triton.next_power_of_2(E), R_PAD=padded(R), BLOCK_M=plan.block_m,
        BLOCK_N=tiles.block_n, TILES_PER_SPLIT=triton.cdiv(n_tiles, split_n),
        L_CHUNK=partials_per_load(plan.block_m, 1, E, PL),
        P_CHUNK=partials_per_load(plan.block_m, E, R, P), PRECISION=dot_precision(y.dtype),
        COUNT=counts is not None, NB=NB, NB_PAD=triton.next_power_of_2(max(NB, 1)),
        num_warps=tiles.num_warps)
