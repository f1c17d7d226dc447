"""Experts kernel (replaces SiLU·mul on adapter tokens): for each selected expert k of a
token, `h_k = act(g0 + s B_g,k sg_k) * (u0 + s B_u,k su_k)`; writes `sum_k w_k h_k` over the
token's row of the intermediate (in its dtype, for the one frozen `W_d` GEMM) and accumulates
the down shrink `A_d,k h_k` over the intermediate dim.

Grid: (plan blocks, split_i). A program owns one block of same-slot tokens and a contiguous
range of intermediate tiles; it loops over the slot's experts, skipping those no token of the
block selected. The down shrink is a reduction over the intermediate dim, so each program
keeps its own partial sum `partials[split, t, k]` (read-modify-write of rows it alone owns:
deterministic, no atomics); the expand kernel adds the `split_i` partials. Rows of base-model
and other-family tokens are not touched (their partials are zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import ExpertsTiles, padded
from .plan import TokenPlan
from .route import EMPTY, Routing, _block_rows, dot_precision

ACTIVATION_CODES = {"silu": 0, "relu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3}


@dataclass(frozen=True)
class ExpertWeights:
    gate_up_b: torch.Tensor  # [S, E, 2, I, R]
    down_a: torch.Tensor     # [S, E, R, I]
    scaling: torch.Tensor    # [S] fp32
    enabled: torch.Tensor    # [S] bool


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    elif ACT == 1:
        return tl.maximum(x, 0.0)
    elif ACT == 2:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))


@triton.jit
def _experts_kernel(
    g_ptr, u_ptr, stride_g, stride_u, h_ptr, stride_h,
    shrink_ptr, ids_ptr, weights_ptr, gate_up_b_ptr, down_a_ptr, scaling_ptr, enabled_ptr,
    sorted_tokens_ptr, block_slot_ptr, partials_ptr,
    T, I, E, R,
    K: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(block_slot_ptr + block)
    if slot == EMPTY:
        return
    tok64, row_ok = _block_rows(sorted_tokens_ptr, block, BLOCK_M)
    kk = tl.arange(0, K_PAD)
    pair_ok = row_ok[:, None] & (kk < K)[None, :]
    ids = tl.load(ids_ptr + tok64[:, None] * K + kk[None, :], mask=pair_ok, other=-1)
    weights = tl.load(weights_ptr + tok64[:, None] * K + kk[None, :], mask=pair_ok, other=0.0)
    used = pair_ok & (weights > 0.0)  # no pair of base or disabled-slot tokens is used
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    # Unused pairs get a zero partial, so every output element is defined.
    partial_off = ((split * T + tok64[:, None, None]) * K + kk[None, :, None]) * R \
        + rr[None, None, :]
    tl.store(partials_ptr + partial_off, tl.zeros([BLOCK_M, K_PAD, R_PAD], tl.float32),
             mask=(pair_ok & ~used)[:, :, None] & r_ok[None, None, :])
    s = tl.maximum(slot, 0).to(tl.int64)
    if (slot < 0) | (tl.load(enabled_ptr + s) == 0):
        return
    scale = tl.load(scaling_ptr + s)

    for t in range(TILES_PER_SPLIT):
        ii = (split * TILES_PER_SPLIT + t) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = ii < I
        io_mask = row_ok[:, None] & i_ok[None, :]
        g0 = tl.load(g_ptr + tok64[:, None] * stride_g + ii[None, :], mask=io_mask,
                     other=0.0).to(tl.float32)
        u0 = tl.load(u_ptr + tok64[:, None] * stride_u + ii[None, :], mask=io_mask,
                     other=0.0).to(tl.float32)
        mixed = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
        for e in range(E):
            hit = used & (ids == e)
            if tl.sum(hit.to(tl.int32)) > 0:
                row_hit = tl.sum(hit.to(tl.int32), axis=1) > 0
                pos = tl.sum(tl.where(hit, kk[None, :], 0), axis=1)
                w_e = tl.sum(tl.where(hit, weights, 0.0), axis=1)
                pair = tok64 * K + pos
                sr_mask = row_hit[:, None] & r_ok[None, :]
                sg = tl.load(shrink_ptr + pair[:, None] * (2 * R) + rr[None, :], mask=sr_mask,
                             other=0.0)
                su = tl.load(shrink_ptr + pair[:, None] * (2 * R) + R + rr[None, :],
                             mask=sr_mask, other=0.0)
                # The expert's three weight tiles are loaded together: one memory latency.
                b_mask = r_ok[:, None] & i_ok[None, :]
                b_g = tl.load(gate_up_b_ptr + (((s * E + e) * 2) * I + ii[None, :]) * R
                              + rr[:, None], mask=b_mask, other=0.0).to(tl.float32)
                b_u = tl.load(gate_up_b_ptr + (((s * E + e) * 2 + 1) * I + ii[None, :]) * R
                              + rr[:, None], mask=b_mask, other=0.0).to(tl.float32)
                a_d = tl.load(down_a_ptr + ((s * E + e) * R + rr[None, :]) * I + ii[:, None],
                              mask=r_ok[None, :] & i_ok[:, None], other=0.0).to(tl.float32)
                g = g0 + scale * tl.dot(sg, b_g, input_precision=PRECISION)
                u = u0 + scale * tl.dot(su, b_u, input_precision=PRECISION)
                h = tl.where(row_hit[:, None] & i_ok[None, :], _activation(g, ACT) * u, 0.0)
                mixed += w_e[:, None] * h
                part = tl.dot(h, a_d, input_precision=PRECISION)
                dst = partials_ptr + ((split * T + tok64[:, None]) * K + pos[:, None]) * R \
                    + rr[None, :]
                previous = tl.load(dst, mask=sr_mask & (t > 0), other=0.0)
                tl.store(dst, previous + part, mask=sr_mask)
        tl.store(h_ptr + tok64[:, None] * stride_h + ii[None, :],
                 mixed.to(h_ptr.dtype.element_ty), mask=io_mask)
        tl.debug_barrier()  # partial sums stored above are re-read by other threads next tile


def launch_experts(g: torch.Tensor, u: torch.Tensor, h: torch.Tensor, routing: Routing,
                   weights: ExpertWeights, plan: TokenPlan, partials: torch.Tensor,
                   tiles: ExpertsTiles, act_fn: str) -> None:
    """Overwrite adapter rows of `h` and fill `partials` [split_i, T, K, R]."""
    S, E, two, I, R = weights.gate_up_b.shape
    T, K = routing.ids.shape
    split_i = partials.shape[0]
    assert two == 2 and weights.down_a.shape == (S, E, R, I)
    assert g.shape == u.shape == h.shape == (T, I)
    assert g.stride(1) == u.stride(1) == h.stride(1) == 1
    assert partials.shape == (split_i, T, K, R) and partials.is_contiguous()
    assert routing.shrink.shape == (T, K, 2 * R)
    assert weights.gate_up_b.is_contiguous() and weights.down_a.is_contiguous()
    tiles_per_split = triton.cdiv(triton.cdiv(I, tiles.block_i), split_i)
    _experts_kernel[(plan.num_blocks, split_i)](
        g, u, g.stride(0), u.stride(0), h, h.stride(0),
        routing.shrink, routing.ids, routing.weights, weights.gate_up_b, weights.down_a,
        weights.scaling, weights.enabled, plan.sorted_tokens, plan.block_slot, partials,
        T, I, E, R,
        K=K, K_PAD=triton.next_power_of_2(K), R_PAD=padded(R), BLOCK_M=plan.block_m,
        BLOCK_I=tiles.block_i, TILES_PER_SPLIT=tiles_per_split,
        ACT=ACTIVATION_CODES[act_fn], PRECISION=dot_precision(g.dtype),
        num_warps=tiles.num_warps)
