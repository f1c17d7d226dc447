"""Tile sizes as data, picked by a small heuristic (no autotuning: it needs a driver and makes
CUDA-graph capture slower; tuned tables go in `TILE_TABLE`, keyed by the largest token count
a row serves, as vLLM keeps tuned MoE configs as data files).

`split_i` and `block_m` shape the ops' outputs or the token plan, so they depend only on
static sizes (never on the token count, which is symbolic under torch.compile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Tiles:
    block_h: int      # hidden-dim chunk: route reduction over H, expand output tile
    block_i: int      # intermediate-dim tile of the experts kernel
    split_n: int      # programs per block along the expand's output dim
    num_warps: int


# (max tokens, tiles), first matching row wins. Untuned starting points for an H100, chosen
# so that no kernel spills registers on sm_90 (ptxas resource usage; a test checks it).
TILE_TABLE: tuple[tuple[int, Tiles], ...] = (
    (64, Tiles(block_h=32, block_i=32, split_n=16, num_warps=4)),
    (1024, Tiles(block_h=32, block_i=32, split_n=8, num_warps=4)),
    (1 << 62, Tiles(block_h=32, block_i=32, split_n=4, num_warps=4)),
)
# The interpreter's cost grows with programs x ops: few, large tiles.
INTERPRETER_TILES = Tiles(block_h=128, block_i=256, split_n=1, num_warps=4)

# Tokens per plan block (rows of every tl.dot). Static so plans can be built inside graphs.
BLOCK_M = 64 if INTERPRET else 16
# Target intermediate-dim width per experts program; split_i = cdiv(I, this).
I_PER_PROGRAM = 1 << 30 if INTERPRET else 256


def pick_tiles(num_tokens: int) -> Tiles:
    if INTERPRET:
        return INTERPRETER_TILES
    return next(tiles for limit, tiles in TILE_TABLE if num_tokens <= limit)


def split_i_for(intermediate: int) -> int:
    """How many programs share one block's intermediate dim (= down-shrink partial sums)."""
    return triton.cdiv(intermediate, I_PER_PROGRAM)


def padded(n: int, minimum: int = 16) -> int:
    """Power-of-two tile width >= n (tl.dot needs >= 16)."""
    return max(minimum, triton.next_power_of_2(n))
