"""Expand kernel: `y[t] += sum_k w_k s B[slot, e_k] z_k` on adapter tokens' rows of y.

Used twice: MixLoRA's down delta (z = the experts kernel's down shrink, given as `split_i`
partial sums that are added here) and the per-linear gated LoRA's expand (z = the route
kernel's shrink, one partial), also for a group of up to 3 projections that share their input
and write adjacent column ranges of one fused output (vLLM's qkv and gate_up). Grid: (plan
blocks, split_n, projections); a program reduces its block's partials once, then loops over
its output tiles and the slot's selected experts. Each output element is written by exactly
one program: deterministic, other rows untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import ExpandTiles, padded
from .plan import TokenPlan
from .route import _block_rows, dot_precision

PARTIAL_ELEMENTS = 4096  # register budget of one partial-sum load (elements)


MAX_GROUP = 3  # projections per launch (q, k, v)


@dataclass(frozen=True)
class ExpandWeights:
    """B factors of G projections, concatenated along the output dim as their outputs are."""

    b: torch.Tensor                # [S, E, sum(out_sizes), R]
    scaling: torch.Tensor          # [G, S] fp32
    enabled: torch.Tensor          # [G, S] bool
    out_sizes: tuple[int, ...]     # G output widths


@triton.jit
def _sum_partials(at, stride, mask, P, CHUNK: tl.constexpr):
    """Sum of the P partial sums `at + p * stride` (fp32, `mask`ed), CHUNK loads in flight at
    a time (unrolled, independent): few dependent memory round trips. Offsets in int64: P
    partials of a long prefill pass 2**31 elements."""
    total = tl.zeros(mask.shape, tl.float32)
    for p0 in range(0, P, CHUNK):
        for c in tl.static_range(CHUNK):
            p = tl.full(mask.shape, p0 + c, tl.int64)  # as a tensor, for the interpreter
            total += tl.load(at + p * stride, mask=mask & (p < P), other=0.0)
    return total


@triton.jit
def _add_expert(acc, z, hit, b_at, cols, col_ok, rr, r_ok, R, PRECISION: tl.constexpr):
    """acc += (z summed over the block's pairs that hit the expert) @ B^T, when any did;
    `b_at` points at the expert's B [columns, R], `cols` the columns of this tile."""
    if tl.sum(hit.to(tl.int32)) > 0:
        z_e = tl.sum(tl.where(hit[:, :, None], z, 0.0), axis=1)
        b = tl.load(b_at + cols[None, :] * R + rr[:, None],
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(z_e, b, input_precision=PRECISION)
    return acc


@triton.jit
def _expand_kernel(
    y_ptr, stride_y, partials_ptr, ids_ptr, weights_ptr, b_ptr, scaling_ptr, enabled_ptr,
    sorted_tokens_ptr, block_slot_ptr,
    T, S, N, N0, N1, N2, E, R, P,
    K: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, P_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    slot = tl.load(block_slot_ptr + block)
    if slot < 0:
        return
    s = slot.to(tl.int64)
    sg = group.to(tl.int64) * S + s  # this projection's per-slot scalars
    if tl.load(enabled_ptr + sg) == 0:
        return
    # The projection's columns of the fused output (and of the concatenated B factors).
    width = tl.where(group == 0, N0, tl.where(group == 1, N1, N2))
    first = tl.where(group == 0, 0, tl.where(group == 1, N0, N0 + N1))
    G = tl.num_programs(2)
    tok64, row_ok = _block_rows(sorted_tokens_ptr, block, BLOCK_M)
    in_row = group.to(tl.int64) * T + tok64  # rows of the [G, T, ...] routing and partials
    kk = tl.arange(0, K_PAD)
    pair_ok = row_ok[:, None] & (kk < K)[None, :]
    ids = tl.load(ids_ptr + in_row[:, None] * K + kk[None, :], mask=pair_ok, other=-1)
    weights = tl.load(weights_ptr + in_row[:, None] * K + kk[None, :], mask=pair_ok, other=0.0)
    used = pair_ok & (weights > 0.0)
    rr = tl.arange(0, R_PAD)
    z_off = (in_row[:, None, None] * K + kk[None, :, None]) * R + rr[None, None, :]
    z_mask = used[:, :, None] & (rr < R)[None, None, :]
    z = _sum_partials(partials_ptr + z_off, G * T * K * R, z_mask, P, P_CHUNK)
    z = z * (weights * tl.load(scaling_ptr + sg))[:, :, None]

    for t in range(TILES_PER_SPLIT):
        nn = (split * TILES_PER_SPLIT + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = nn < width
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for e in range(E):
            acc = _add_expert(acc, z, used & (ids == e), b_ptr + ((s * E + e) * N + first) * R,
                              nn, n_ok, rr, rr < R, R, PRECISION)
        y_at = y_ptr + tok64[:, None] * stride_y + first + nn[None, :]
        y_mask = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_at, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_at, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def partials_per_load(block_m: int, k: int, r: int, partials: int) -> int:
    """How many partial sums one load covers (a power of two within PARTIAL_ELEMENTS)."""
    fits = max(1, PARTIAL_ELEMENTS // (block_m * triton.next_power_of_2(k) * padded(r)))
    return min(triton.next_power_of_2(partials), 1 << (fits.bit_length() - 1))


def launch_expand(y: torch.Tensor, partials: torch.Tensor, routing_ids: torch.Tensor,
                  routing_weights: torch.Tensor, weights: ExpandWeights, plan: TokenPlan,
                  tiles: ExpandTiles) -> None:
    """Add the routed LoRA expand of G projections into adapter rows of their columns of `y`
    [T, N]: partials [P, G, T, K, R] (summed), routing ids/weights [G, T, K]."""
    S, E, N, R = weights.b.shape
    P, G, T, K, R_in = partials.shape
    sizes = weights.out_sizes
    assert 1 <= G == len(sizes) <= MAX_GROUP and sum(sizes) == N
    assert R_in == R and y.shape == (T, N) and y.stride(1) == 1
    assert partials.is_contiguous() and weights.b.is_contiguous()
    assert routing_ids.shape == routing_weights.shape == (G, T, K)
    assert weights.scaling.shape == weights.enabled.shape == (G, S)
    n_tiles = triton.cdiv(max(sizes), tiles.block_n)
    split_n = min(tiles.split_n, n_tiles)
    widths = list(sizes) + [0] * (MAX_GROUP - G)
    _expand_kernel[(plan.num_blocks, split_n, G)](
        y, y.stride(0), partials, routing_ids, routing_weights, weights.b, weights.scaling,
        weights.enabled, plan.sorted_tokens, plan.block_slot,
        T, S, N, *widths, E, R, P,
        K=K, K_PAD=triton.next_power_of_2(K), R_PAD=padded(R), BLOCK_M=plan.block_m,
        BLOCK_N=tiles.block_n, TILES_PER_SPLIT=triton.cdiv(n_tiles, split_n),
        P_CHUNK=partials_per_load(plan.block_m, K, R, P),
        PRECISION=dot_precision(y.dtype), num_warps=tiles.num_warps)
