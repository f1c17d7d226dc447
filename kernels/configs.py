"""Tile sizes as data, per kernel and per token count (no autotuning at serving time: it needs
the driver and makes CUDA-graph capture slower). As vLLM keeps tuned fused-MoE configs, tuned
tiles live in JSON files named after the device (`<device name>.json`, written by
`benchmarks/tune_tiles.py` on that device), looked up in $MOLE_SERVE_TUNED_CONFIG_FOLDER, then
in `tuned/` beside this file; without one, `TILE_TABLE` applies.

`split_i` and `block_m` shape the ops' outputs or the token plan, so they depend only on
static sizes (never on the token count, which is symbolic under torch.compile). Everything
in `Tiles` is picked inside an op from the concrete token count.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from dataclasses import asdict, dataclass

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TUNED_DIR = pathlib.Path(__file__).parent / "tuned"


@dataclass(frozen=True)
class RouteTiles:
    block_h: int      # chunk of the reduction over the input dim (logits and shrink)
    lanes: int        # programs a block's experts are spread over (each recomputes logits)
    num_warps: int


@dataclass(frozen=True)
class ExpertsTiles:
    block_i: int      # intermediate-dim tile
    num_warps: int


@dataclass(frozen=True)
class ExpandTiles:
    block_n: int      # output-dim tile
    split_n: int      # programs per block along the output dim
    num_warps: int


@dataclass(frozen=True)
class Tiles:
    route: RouteTiles
    experts: ExpertsTiles
    expand: ExpandTiles

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Tiles":
        return cls(RouteTiles(**data["route"]), ExpertsTiles(**data["experts"]),
                   ExpandTiles(**data["expand"]))


# (max tokens, tiles), first matching row wins: untuned starting points for an H100, chosen
# so that no kernel spills registers on sm_90 (ptxas resource usage; a test checks it).
TILE_TABLE: tuple[tuple[int, Tiles], ...] = (
    (64, Tiles(RouteTiles(32, 1, 4), ExpertsTiles(32, 4), ExpandTiles(32, 16, 4))),
    (1024, Tiles(RouteTiles(32, 1, 4), ExpertsTiles(32, 4), ExpandTiles(32, 8, 4))),
    (1 << 62, Tiles(RouteTiles(32, 1, 4), ExpertsTiles(32, 4), ExpandTiles(32, 4, 4))),
)
# The interpreter's cost grows with programs x ops: few, large tiles.
INTERPRETER_TILES = Tiles(RouteTiles(128, 1, 4), ExpertsTiles(256, 4), ExpandTiles(128, 1, 4))

# Tokens per plan block (rows of every tl.dot). Static so plans can be built inside graphs.
BLOCK_M = 64 if INTERPRET else 16
# Target intermediate-dim width per experts program; split_i = cdiv(I, this).
I_PER_PROGRAM = 1 << 30 if INTERPRET else 256


def pick_tiles(num_tokens: int) -> Tiles:
    if INTERPRET:
        return INTERPRETER_TILES
    tuned = tuned_tiles(_device_name())
    if tuned:  # the smallest tuned token count >= num_tokens, else the largest
        counts = sorted(tuned)
        return tuned[next((c for c in counts if c >= num_tokens), counts[-1])]
    return table_tiles(num_tokens)


def table_tiles(num_tokens: int) -> Tiles:
    """The untuned default."""
    return next(tiles for limit, tiles in TILE_TABLE if num_tokens <= limit)


def tuned_file_name(device_name: str) -> str:
    return device_name.replace(" ", "_").replace("/", "_") + ".json"


@functools.cache
def tuned_tiles(device_name: str) -> dict[int, Tiles]:
    """{token count: tiles} tuned on this device, {} without a file."""
    folders = [os.environ.get("MOLE_SERVE_TUNED_CONFIG_FOLDER"), TUNED_DIR]
    for folder in filter(None, folders):
        path = pathlib.Path(folder) / tuned_file_name(device_name)
        if path.is_file():
            return {int(count): Tiles.from_json(tiles)
                    for count, tiles in json.loads(path.read_text())["tiles"].items()}
    return {}


@functools.cache
def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name()


def split_i_for(intermediate: int) -> int:
    """How many programs share one block's intermediate dim (= down-shrink partial sums)."""
    return triton.cdiv(intermediate, I_PER_PROGRAM)


def padded(n: int, minimum: int = 16) -> int:
    """Power-of-two tile width >= n (tl.dot needs >= 16)."""
    return max(minimum, triton.next_power_of_2(n))
