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
# so that no kernel spills registers on sm_90 with the venv's triton or the GPU host's 3.6.0
# (ptxas resource usage; a test checks both: 3.6 spilled DynMoLE's intermediate kernel at
# 4 warps on the experts tiles).
TILE_TABLE: tuple[tuple[int, Tiles], ...] = (
    (64, Tiles(RouteTiles(32, 1, 4), ExpertsTiles(32, 8), ExpandTiles(32, 16, 4))),
    (1024, Tiles(RouteTiles(32, 1, 4), ExpertsTiles(32, 8), ExpandTiles(32, 8, 4))),
    (1 << 62, Tiles(RouteTiles(32, 1, 4), ExpertsTiles(32, 8), ExpandTiles(32, 4, 4))),
)
# The interpreter's cost grows with programs x ops: few, large tiles.
INTERPRETER_TILES = Tiles(RouteTiles(128, 1, 4), ExpertsTiles(256, 4), ExpandTiles(128, 1, 4))

# Tokens per plan block (rows of every tl.dot). Static so plans can be built inside graphs.
BLOCK_M = 64 if INTERPRET else 16
# Target intermediate-dim width per experts program; split_i = cdiv(I, this).
I_PER_PROGRAM = 1 << 30 if INTERPRET else 256


def pick_tiles(num_tokens: int, kernel: str, experts: int, width: int):
    """`kernel`'s tiles ("route", "experts" or "expand": a `Tiles` field) for an op on
    `num_tokens` tokens, `experts` experts and a rank-dim `width` (the route's shrink width,
    else the rank). A tuned table serves sizes up to those it was tuned at (wider ones could
    overflow shared memory with its tiles); others get the default table."""
    if INTERPRET:
        return getattr(INTERPRETER_TILES, kernel)
    tuned = tuned_tiles(_device_name())
    if tuned is not None and tuned.covers(kernel, experts, width):
        return getattr(tuned.pick(num_tokens), kernel)
    return getattr(table_tiles(num_tokens), kernel)


def table_tiles(num_tokens: int) -> Tiles:
    """The untuned default."""
    return next(tiles for limit, tiles in TILE_TABLE if num_tokens <= limit)


@dataclass(frozen=True)
class TunedTable:
    """A device's tuned tiles per token count, and the expert count and rank they were
    tuned at (MixLoRA's route shrinks 2 x rank columns)."""

    experts: int
    rank: int
    rows: tuple[tuple[int, Tiles], ...]  # by ascending token count

    def covers(self, kernel: str, experts: int, width: int) -> bool:
        """Whether an op is no wider than this table's tuning run: MixLoRA's route shrinks
        2 x rank columns, the other kernels rank columns."""
        tuned_width = 2 * self.rank if kernel == "route" else self.rank
        return padded(experts) <= padded(self.experts) and padded(width) <= padded(tuned_width)

    def pick(self, num_tokens: int) -> Tiles:
        """The row of the smallest tuned token count >= num_tokens, else the largest."""
        return next((tiles for count, tiles in self.rows if count >= num_tokens),
                    self.rows[-1][1])

    def to_json(self) -> dict:
        return {"experts": self.experts, "rank": self.rank,
                "tiles": {str(count): tiles.to_json() for count, tiles in self.rows}}

    @classmethod
    def parse(cls, text: str, source: object) -> "TunedTable":
        """Checked: a table that could not launch fails here, naming `source`."""
        try:
            data = json.loads(text)
            table = cls(int(data["experts"]), int(data["rank"]), tuple(sorted(
                ((int(count), Tiles.from_json(tiles)) for count, tiles in data["tiles"].items()),
                key=lambda row: row[0])))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{source}: not a tuned tile table ({error!r})") from None
        if not table.rows or min(table.experts, table.rank) < 1:
            raise ValueError(f"{source}: a tuned tile table needs rows, experts and rank")
        for count, tiles in table.rows:
            for part in (tiles.route, tiles.experts, tiles.expand):
                for name, value in asdict(part).items():
                    ok, rule = _tile_rule(name, value)
                    if not ok:
                        raise ValueError(f"{source}: {count} tokens: {name}={value!r} must be "
                                         f"{rule}")
        return table


def _tile_rule(name: str, value: int) -> tuple[bool, str]:
    if name in ("lanes", "split_n"):
        return value >= 1, ">= 1"
    power_of_two = value >= 1 and value & (value - 1) == 0
    if name == "num_warps":
        return power_of_two, "a power of two"
    return power_of_two and value >= 16, "a power of two >= 16"  # tl.dot's minimum


def tuned_file_name(device_name: str) -> str:
    """`<device name>.json`, spaces and slashes as underscores."""
    return device_name.replace(" ", "_").replace("/", "_") + ".json"


def tuned_folders() -> list[pathlib.Path]:
    """Where tuned tables are looked up, first match wins."""
    folder = os.environ.get("MOLE_SERVE_TUNED_CONFIG_FOLDER")
    return ([pathlib.Path(folder)] if folder else []) + [TUNED_DIR]


@functools.cache
def tuned_tiles(device_name: str) -> TunedTable | None:
    """This device's tuned table: $MOLE_SERVE_TUNED_CONFIG_FOLDER first, then `tuned/`."""
    for folder in tuned_folders():
        path = folder / tuned_file_name(device_name)
        if path.is_file():
            return TunedTable.parse(path.read_text(), path)
    return None


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
