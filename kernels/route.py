"""Route kernel: per-token routing through the token's own slot, plus the selected experts'
LoRA shrink `A x` (the only reduction over the hidden dim, done once per token and expert).

Grid: (plan blocks, projections of a group, lanes). Every program of a block computes the
router logits with the slot's router (fp32, IEEE), the fp32 softmax over the adapter's real
experts and the selection of every strategy of `mole_serve.routing` (0 top-k renormalised,
1 top-p incl. the crossing expert with temperature-divided probabilities, 2 switch top-1,
3 DynMoLE: cumsum <= top-p, keep_top_k floor, all experts above the Tsallis entropy
threshold); lane 0 writes `ids`/`weights` [T, K] sorted by probability (weight 0 = unused).
Then the experts some token of the block selected are dealt out to the lanes in turn, and for
each of its experts a lane computes `shrink[t, k] = A[slot, e] x_t` with tl.dot. Reductions
over the input dim are serial within a program, so at decode sizes (one block or a few)
lanes spread a block's selected experts over several SMs; the selection they all repeat is
identical (same inputs, same code). Every output element is written once: base-model and
disabled-slot tokens get id 0, weight 0 and a zero shrink, as do unused pairs. When the
server keeps routing metrics, lane 0 adds the block's routing to the slot's counters (a few
atomics per block): metrics cost no extra launch and no second pass over the router.

Under tensor parallelism a row-parallel projection's input (o_proj, down_proj) is split over
ranks, and so is the router's reduction: the kernel then runs twice, first storing only each
rank's partial logits (`ROUTER_LOGITS`), which the caller all-reduces, then routing from the
summed logits (`GIVEN_LOGITS`) and shrinking this rank's slice of x, a partial shrink the
expand and the base all-reduce sum up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mole_serve import routing as table
from mole_serve.config import DYNMOLE, MIXLORA, MIXLORA_DYNAMIC, MIXLORA_SWITCH

from .configs import RouteTiles, padded
from .plan import EMPTY_BLOCK, TokenPlan

# The routing table's layout and strategy codes, as compile-time constants of the kernels.
NUM_COLUMNS = tl.constexpr(table.NUM_COLUMNS)
STRATEGY = tl.constexpr(table.STRATEGY)
NUM_EXPERTS = tl.constexpr(table.NUM_EXPERTS)
TOP_K = tl.constexpr(table.TOP_K)
TOP_P = tl.constexpr(table.TOP_P)
TEMPERATURE = tl.constexpr(table.TEMPERATURE)
KEEP_TOP_K = tl.constexpr(table.KEEP_TOP_K)
ENTROPY_THRESHOLD = tl.constexpr(table.ENTROPY_THRESHOLD)
ENTROPY_INDEX = tl.constexpr(table.ENTROPY_INDEX)
ENTROPY_EPS = tl.constexpr(table.ENTROPY_EPS)
TOP_K_CODE = tl.constexpr(float(table.STRATEGY_CODE[MIXLORA]))
TOP_P_CODE = tl.constexpr(float(table.STRATEGY_CODE[MIXLORA_DYNAMIC]))
SWITCH_CODE = tl.constexpr(float(table.STRATEGY_CODE[MIXLORA_SWITCH]))
DYNMOLE_CODE = tl.constexpr(float(table.STRATEGY_CODE[DYNMOLE]))
EMPTY = tl.constexpr(EMPTY_BLOCK)
# Where the route kernel's logits come from (its LOGITS argument).
COMPUTED_LOGITS = tl.constexpr(0)  # from x and the router, then route
ROUTER_LOGITS = tl.constexpr(1)    # from x and the router, stored to `logits`, nothing else
GIVEN_LOGITS = tl.constexpr(2)     # loaded from `logits`, then route


@dataclass(frozen=True)
class RouterWeights:
    """What routing needs from a slot-stacked layer (MixLoRAStack or GatedLoRAStack), for G
    projections that share the input x (G = 1: no leading dim)."""

    router: torch.Tensor     # [G, S, E, H] fp32
    shrink_a: torch.Tensor   # [G, S, E, NR, H]: the LoRA A factors applied to x (gate+up fused)
    routing: torch.Tensor    # [G, S, NUM_COLUMNS] fp32
    enabled: torch.Tensor    # [G, S] bool
    k_max: int


@dataclass(frozen=True)
class Routing:
    """One layer's routing of a batch, as the experts and expand kernels read it (with a
    leading [G] dim for a group of projections)."""

    ids: torch.Tensor        # [T, K] int32, by descending probability
    weights: torch.Tensor    # [T, K] fp32, 0 = unused
    shrink: torch.Tensor     # [T, K, NR] fp32, 0 where weights == 0


@dataclass(frozen=True)
class RoutingCounts:
    """Metrics counters a route launch adds to (`mole_serve.routing_stats.RoutingStats` layout):
    `counts` [G, S, 2E + NB + 3] float64, `bounds` [NB] fp32 entropy bucket bounds."""

    counts: torch.Tensor
    bounds: torch.Tensor


@triton.jit
def _block_rows(sorted_tokens_ptr, block, BLOCK_M: tl.constexpr):
    """A plan block's tokens (int64; 0 on padding rows) and which rows hold one."""
    tok = tl.load(sorted_tokens_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = tok >= 0
    return tl.where(row_ok, tok, 0).to(tl.int64), row_ok


@triton.jit
def _normalised_tsallis(p, valid, n_exp, q, eps):
    """S_q(p) / S_q(uniform) per row; Shannon (of p + eps) when q == 1; 0 for a single
    expert."""
    shannon = tl.abs(q - 1.0) < 1e-6
    safe_q = tl.where(shannon, 2.0, q)
    shifted = p + eps
    log_shifted = tl.log(tl.maximum(shifted, 1e-30))
    terms = tl.where(shannon, -shifted * log_shifted, tl.exp(safe_q * log_shifted))
    total = tl.sum(tl.where(valid, terms, 0.0), axis=1)
    entropy = tl.where(shannon, total, (1.0 - total) / (safe_q - 1.0))
    max_entropy = tl.where(shannon, tl.log(n_exp),
                           (1.0 - tl.exp((1.0 - safe_q) * tl.log(n_exp))) / (safe_q - 1.0))
    return tl.where(n_exp > 1.0, entropy / tl.maximum(max_entropy, 1e-12), 0.0)


@triton.jit
def _select(logits, table_row, E_PAD: tl.constexpr):
    """Selection for one slot's routing-table row: returns (rank, weight, softmax
    probability) per expert column."""
    strategy = tl.load(table_row + STRATEGY)
    n_exp = tl.floor(tl.load(table_row + NUM_EXPERTS) + 0.5)
    top_k = tl.floor(tl.load(table_row + TOP_K) + 0.5)
    top_p = tl.load(table_row + TOP_P)
    temperature = tl.load(table_row + TEMPERATURE)
    keep_top_k = tl.floor(tl.load(table_row + KEEP_TOP_K) + 0.5)
    threshold = tl.load(table_row + ENTROPY_THRESHOLD)
    q = tl.load(table_row + ENTROPY_INDEX)
    eps = tl.load(table_row + ENTROPY_EPS)

    cols = tl.arange(0, E_PAD)
    valid = (cols.to(tl.float32) < n_exp)[None, :]
    masked = tl.where(valid, logits, float("-inf"))
    exps = tl.exp(masked - tl.max(masked, axis=1)[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]

    use_temperature = (strategy == TOP_P_CODE) & (temperature > 0.0)
    scaled = tl.where(use_temperature, probs / tl.maximum(temperature, 1e-30), probs)
    # rank = position in a stable descending sort; cumulative / exclusive = the sums up to
    # and including / before it in that order, each summed directly (a difference of the
    # two would round once more and move the top-p cut-off).
    mine, other = scaled[:, :, None], scaled[:, None, :]
    ahead = (other > mine) | ((other == mine) & (cols[None, None, :] < cols[None, :, None]))
    rank = tl.sum(ahead.to(tl.int32), axis=2)
    rank_f = rank.to(tl.float32)
    exclusive = tl.sum(tl.where(rank[:, None, :] < rank[:, :, None], other, 0.0), axis=2)
    cumulative = tl.sum(tl.where(rank[:, None, :] <= rank[:, :, None], other, 0.0), axis=2)

    broadcast = _normalised_tsallis(probs, valid, n_exp, q, eps) > threshold
    keep = rank_f < top_k
    keep = tl.where(strategy == TOP_P_CODE, exclusive <= top_p, keep)  # crossing one kept
    keep = tl.where(strategy == SWITCH_CODE, rank < 1, keep)
    dynmole = (cumulative <= top_p) | (rank_f < keep_top_k) | broadcast[:, None]
    keep = tl.where(strategy == DYNMOLE_CODE, dynmole, keep)           # crossing one dropped
    weight = tl.where(keep, scaled, 0.0)
    total = tl.sum(weight, axis=1)[:, None]
    weight = tl.where(strategy == TOP_K_CODE, weight / total, weight)  # renormalised
    return rank, weight, probs


@triton.jit
def _count_routing(counts_row, bounds_ptr, probs, weight, row_ok, n_exp, E,
                   E_PAD: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr):
    """Add this block's routing to its slot's row of the metrics counters (the layout of
    `mole_serve.routing_stats.RoutingStats`): per expert selections, tokens by experts kept,
    tokens by normalised-entropy bucket, entropy sum. Sums per block, then fp64 atomics."""
    cols = tl.arange(0, E_PAD)
    chosen = (weight > 0.0) & row_ok[:, None]
    tl.atomic_add(counts_row + cols, tl.sum(chosen.to(tl.float32), axis=0).to(tl.float64),
                  mask=cols < E)
    ones = tl.full(row_ok.shape, 1.0, tl.float64)
    kept = tl.sum(chosen.to(tl.int32), axis=1)
    tl.atomic_add(counts_row + E + kept, ones, mask=row_ok)
    terms = tl.where(probs > 0.0, -probs * tl.log(tl.maximum(probs, 1e-30)), 0.0)
    entropy = tl.sum(terms, axis=1) / tl.log(tl.maximum(n_exp, 2.0))
    bb = tl.arange(0, NB_PAD)
    bounds = tl.load(bounds_ptr + bb, mask=bb < NB, other=float("inf"))
    bucket = tl.sum((bounds[None, :] < entropy[:, None]).to(tl.int32), axis=1)
    tl.atomic_add(counts_row + 2 * E + 1 + bucket, ones, mask=row_ok)
    tl.atomic_add(counts_row + 2 * E + 1 + NB + 1,
                  tl.sum(tl.where(row_ok, entropy, 0.0), axis=0).to(tl.float64))


@triton.jit
def _route_kernel(
    x_ptr, stride_x, router_ptr, shrink_a_ptr, table_ptr, enabled_ptr,
    sorted_tokens_ptr, block_slot_ptr, ids_ptr, weights_ptr, shrink_ptr,
    counts_ptr, bounds_ptr, logits_ptr,
    T, S, H, E, NR,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NR_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr, COUNT: tl.constexpr, NB: tl.constexpr, NB_PAD: tl.constexpr,
    LOGITS: tl.constexpr,
):
    block = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)  # projection of a group sharing the input x
    lane = tl.program_id(2)
    slot = tl.load(block_slot_ptr + block)
    if slot == EMPTY:
        return
    tok64, row_ok = _block_rows(sorted_tokens_ptr, block, BLOCK_M)
    # Per-(projection, slot) weights are [G * S, ...] and outputs [G * T, ...] row-major.
    s = group * S + tl.maximum(slot, 0).to(tl.int64)
    out_row = group * T + tok64
    kk = tl.arange(0, K_PAD)
    out_mask = row_ok[:, None] & (kk < K)[None, :]
    out_off = out_row[:, None] * K + kk[None, :]
    nn = tl.arange(0, NR_PAD)
    shrink_off = out_off[:, :, None] * NR + nn[None, None, :]
    shrink_mask = out_mask[:, :, None] & (nn < NR)[None, None, :]
    active = (slot >= 0) & (tl.load(enabled_ptr + s) != 0)
    cols = tl.arange(0, E_PAD)
    logits_off = out_row[:, None] * E + cols[None, :]
    logits_mask = row_ok[:, None] & (cols < E)[None, :]
    if not active:
        if lane != 0:
            return
        if LOGITS == ROUTER_LOGITS:
            tl.store(logits_ptr + logits_off, tl.zeros([BLOCK_M, E_PAD], tl.float32),
                     mask=logits_mask)
            return
        tl.store(ids_ptr + out_off, tl.zeros([BLOCK_M, K_PAD], tl.int32), mask=out_mask)
        tl.store(weights_ptr + out_off, tl.zeros([BLOCK_M, K_PAD], tl.float32), mask=out_mask)
        tl.store(shrink_ptr + shrink_off, tl.zeros([BLOCK_M, K_PAD, NR_PAD], tl.float32),
                 mask=shrink_mask)
        return

    if LOGITS == GIVEN_LOGITS:
        logits = tl.load(logits_ptr + logits_off, mask=logits_mask, other=0.0)
    else:
        logits = tl.zeros([BLOCK_M, E_PAD], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(x_ptr + tok64[:, None] * stride_x + hh[None, :],
                        mask=row_ok[:, None] & (hh < H)[None, :], other=0.0).to(tl.float32)
            w = tl.load(router_ptr + (s * E + cols[None, :]) * H + hh[:, None],
                        mask=(cols < E)[None, :] & (hh < H)[:, None], other=0.0
                        ).to(tl.float32)
            logits += tl.dot(x, w, input_precision="ieee")
        if LOGITS == ROUTER_LOGITS:
            tl.store(logits_ptr + logits_off, logits, mask=logits_mask)
            return

    rank, weight, probs = _select(logits, table_ptr + s * NUM_COLUMNS, E_PAD)
    picked = rank[:, None, :] == kk[None, :, None]                     # [M, K, E]
    ids = tl.sum(tl.where(picked, cols[None, None, :], 0), axis=2)
    weights = tl.sum(tl.where(picked, weight[:, None, :], 0.0), axis=2)
    used = out_mask & (weights > 0.0)
    if lane == 0:
        if COUNT:
            n_exp = tl.floor(tl.load(table_ptr + s * NUM_COLUMNS + NUM_EXPERTS) + 0.5)
            _count_routing(counts_ptr + s * (2 * E + NB + 3), bounds_ptr, probs, weight,
                           row_ok, n_exp, E, E_PAD, NB, NB_PAD)
        tl.store(ids_ptr + out_off, ids, mask=out_mask)
        tl.store(weights_ptr + out_off, weights, mask=out_mask)
        tl.store(shrink_ptr + shrink_off, tl.zeros([BLOCK_M, K_PAD, NR_PAD], tl.float32),
                 mask=shrink_mask & ~used[:, :, None])
    # The experts the block selected, numbered in id order: the j-th is lane j % lanes's.
    picks = (used[:, :, None] & (ids[:, :, None] == cols[None, None, :])).to(tl.int32)
    chosen = tl.sum(tl.sum(picks, axis=1), axis=0) > 0
    order = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    mine = chosen & (order % tl.num_programs(2) == lane)
    for e in range(E):
        if tl.sum((mine & (cols == e)).to(tl.int32)) > 0:
            hit = used & (ids == e)
            row_hit = tl.sum(hit.to(tl.int32), axis=1) > 0
            pos = tl.sum(tl.where(hit, kk[None, :], 0), axis=1)
            acc = tl.zeros([BLOCK_M, NR_PAD], tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + tl.arange(0, BLOCK_H)
                x = tl.load(x_ptr + tok64[:, None] * stride_x + hh[None, :],
                            mask=row_hit[:, None] & (hh < H)[None, :], other=0.0
                            ).to(tl.float32)
                a = tl.load(shrink_a_ptr + ((s * E + e) * NR + nn[None, :]) * H + hh[:, None],
                            mask=(nn < NR)[None, :] & (hh < H)[:, None], other=0.0
                            ).to(tl.float32)
                acc += tl.dot(x, a, input_precision=PRECISION)
            dst = (out_row[:, None] * K + pos[:, None]) * NR + nn[None, :]
            tl.store(shrink_ptr + dst, acc, mask=row_hit[:, None] & (nn < NR)[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 for fp32 inputs (exact tests); TF32 otherwise: bf16/fp16 values are exact in
    TF32, and rounding the fp32 shrink to TF32 is below bf16's own resolution."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_route(x: torch.Tensor, weights: RouterWeights, plan: TokenPlan, out: Routing,
                 tiles: RouteTiles, counts: RoutingCounts | None = None,
                 logits: torch.Tensor | None = None) -> None:
    """Fill `out`: ids and weights of every token, the shrink of every used pair (0 else);
    with `counts`, also add the batch's routing to the metrics counters; with `logits`
    [G, T, E] fp32, route from them instead of x (see the module doc). Programs: per plan
    block and projection of the group, `tiles.lanes` (at most one per expert)."""
    _launch(x, weights, plan, tiles, GIVEN_LOGITS if logits is not None else COMPUTED_LOGITS,
            out, counts, logits)


def launch_router_logits(x: torch.Tensor, weights: RouterWeights, plan: TokenPlan,
                         logits: torch.Tensor, tiles: RouteTiles) -> None:
    """Fill `logits` [G, T, E] fp32 with each token's router logits through its slot's
    router (0 for tokens without an enabled slot), and nothing else."""
    _launch(x, weights, plan, tiles, ROUTER_LOGITS, None, None, logits)


def _launch(x: torch.Tensor, weights: RouterWeights, plan: TokenPlan, tiles: RouteTiles,
            mode: tl.constexpr, out: Routing | None, counts: RoutingCounts | None,
            logits: torch.Tensor | None) -> None:
    G, S, E, NR, H = weights.shrink_a.shape
    T, K = x.shape[0], weights.k_max
    NB = 0 if counts is None else counts.bounds.shape[0]
    if logits is not None:
        assert logits.shape == (G, T, E) and logits.dtype == torch.float32
        assert logits.is_contiguous()
    if counts is not None:
        assert counts.counts.shape == (G, S, 2 * E + NB + 3) and counts.counts.is_contiguous()
        assert counts.counts.dtype == torch.float64 and counts.bounds.dtype == torch.float32
    assert x.shape[1] == H and x.stride(1) == 1
    assert weights.router.shape == (G, S, E, H)
    assert weights.routing.shape == (G, S, table.NUM_COLUMNS)
    assert weights.enabled.shape == (G, S)
    for t in (weights.router, weights.shrink_a, weights.routing, weights.enabled):
        assert t.is_contiguous()
    if out is not None:
        assert all(t.is_contiguous() for t in (out.ids, out.weights, out.shrink))
        assert out.ids.shape == out.weights.shape == (G, T, K)
        assert out.shrink.shape == (G, T, K, NR)
    unused = x  # a pointer for arguments this mode never touches
    lanes = 1 if mode.value == ROUTER_LOGITS.value else max(1, min(tiles.lanes, E))
    _route_kernel[(plan.num_blocks, G, lanes)](
        x, x.stride(0), weights.router, weights.shrink_a, weights.routing, weights.enabled,
        plan.sorted_tokens, plan.block_slot, *((unused,) * 3 if out is None else
                                               (out.ids, out.weights, out.shrink)),
        unused if counts is None else counts.counts, unused if counts is None else counts.bounds,
        unused if logits is None else logits,
        T, S, H, E, NR,
        K=K, K_PAD=triton.next_power_of_2(K), E_PAD=padded(E), NR_PAD=padded(NR),
        BLOCK_M=plan.block_m, BLOCK_H=tiles.block_h,
        PRECISION=dot_precision(x.dtype), COUNT=counts is not None, NB=NB,
        NB_PAD=triton.next_power_of_2(max(NB, 1)), LOGITS=mode.value, num_warps=tiles.num_warps)
