"""Token plan: the batch's tokens sorted by adapter slot and cut into blocks of one slot.

Built once per batch (every layer and every MoLE op of the step reuses it, as vLLM's punica
metadata is), on the device with a handful of torch ops: no host sync, static shapes, so it
is CUDA-graph and `torch.compile(fullgraph=True)` safe. Base-model tokens (slot -1) form one
more group so the route kernel can write their (zero) routing rows; the other kernels skip it.

Why slot-sorted blocks and not (slot, expert)-sorted ones: a MixLoRA token mixes its k expert
intermediates *before* the one frozen `W_d` GEMM, so all k experts of a token must be summed in
one program (deterministic, no [T, k, I] buffer, no atomics). A block therefore holds tokens of
one slot, and the kernels loop over that slot's experts, skipping experts no token of the block
selected: each touched expert's weight tile is read once per block, and never for untouched
experts, which is the decode bytes floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BASE_BLOCK = -1    # block of base-model tokens (slot -1): routed to zero weights
EMPTY_BLOCK = -2   # unused block at the end of the static block list


@dataclass(frozen=True)
class TokenPlan:
    """`sorted_tokens` [num_blocks * block_m] int32: token index per row, -1 = padding.
    `block_slot` [num_blocks] int32: the block's slot, BASE_BLOCK or EMPTY_BLOCK."""

    sorted_tokens: torch.Tensor
    block_slot: torch.Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_slot.shape[0]


def max_blocks(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound on blocks: every non-empty group (slots + base) wastes < one block."""
    groups = min(num_slots + 1, num_tokens)
    return max(1, (num_tokens + groups * (block_m - 1)) // block_m)


def plan_tokens(slots: torch.Tensor, num_slots: int, block_m: int) -> TokenPlan:
    """Sort token indices by slot (stable) and pad each slot's run to whole blocks."""
    num_tokens = slots.shape[0]
    device = slots.device
    groups = num_slots + 1
    key = torch.where(slots >= 0, slots, num_slots).long()
    counts = torch.zeros(groups, dtype=torch.long, device=device).scatter_add_(
        0, key, torch.ones_like(key))
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    block_begin = block_end - blocks
    token_begin = counts.cumsum(0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank = torch.arange(num_tokens, device=device) - token_begin[sorted_key]
    dest = block_begin[sorted_key] * block_m + rank
    total = max_blocks(num_tokens, num_slots, block_m)
    sorted_tokens = torch.full((total * block_m,), -1, dtype=torch.int32, device=device)
    sorted_tokens.scatter_(0, dest, order.to(torch.int32))
    group = torch.searchsorted(block_end, torch.arange(total, device=device), right=True)
    block_slot = torch.where(group < num_slots, group,
                             torch.where(group == num_slots, BASE_BLOCK, EMPTY_BLOCK))
    return TokenPlan(sorted_tokens, block_slot.to(torch.int32), block_m)
