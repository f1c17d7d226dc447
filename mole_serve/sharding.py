"""Tensor parallelism for the adapters: the slice of each projection's factors and routers
a rank holds, split as vLLM splits the frozen layers, and how its partial sums are added up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import BaseShape


@dataclass(frozen=True)
class TensorShard:
    """This tensor-parallel rank's part of the adapters, split as vLLM splits the frozen
    layers: q/k/v and gate/up are column-parallel (the rank holds rows `part(out)` of their
    outputs; k/v rows by head, `kv_part`, shared by several ranks when there are fewer KV
    heads than ranks), o and down row-parallel (columns `part(in)` of their inputs). So a
    rank keeps the slice of the B factors of column-parallel projections (MixLoRA: the
    I-slice of the gate/up B factors) and of the A factors and routers of row-parallel ones
    (the I-slice of the down A factors); factors and routers that see full-size inputs are
    replicated.
    Each rank's o/down delta is a partial sum over its slice; the base projection's
    all-reduce, deferred until the deltas are added (`model.py`), sums them up. A router on
    o/down sees only its rank's input slice, so its logits are partial sums too, added up
    by `all_reduce` (vLLM's) before any routing decision: every rank routes alike."""

    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None,
                                                                       compare=False)

    def __post_init__(self):
        if self.world > 1 and self.all_reduce is None:
            raise ValueError("a tensor-parallel shard needs the ranks' all-reduce")

    def part(self, full: int) -> slice:
        if full % self.world:
            raise ValueError(f"{full} does not split evenly over {self.world} ranks")
        size = full // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def kv_part(self, kv_heads: int, head_dim: int) -> slice:
        """This rank's rows of k/v outputs, as vLLM's `QKVParallelLinear` holds them: the
        heads split evenly, or, with fewer heads than ranks, one head on world/heads ranks."""
        if self.world <= kv_heads:
            return self.part(kv_heads * head_dim)
        if self.world % kv_heads:
            raise ValueError(f"{kv_heads} KV heads do not replicate evenly over {self.world} "
                             f"ranks")
        head = self.rank // (self.world // kv_heads)
        return slice(head * head_dim, (head + 1) * head_dim)


ROW_PARALLEL = ("o_proj", "down_proj")  # vLLM splits their inputs; the rest their outputs
KV_PROJS = ("k_proj", "v_proj")  # split by heads, replicated when heads are fewer than ranks


@dataclass(frozen=True)
class ShardDims:
    """A projection's slices on this rank (`TensorShard`): one of them is the full range."""

    in_part: slice
    out_part: slice
    local_in: int
    local_out: int
    splits_input: bool  # row-parallel over several ranks: routers see a slice of the input

    @classmethod
    def of(cls, base: BaseShape, proj: str, shard: TensorShard) -> "ShardDims":
        fan_in, fan_out = base.in_out(proj)
        if proj in ROW_PARALLEL:
            in_part, out_part = shard.part(fan_in), slice(None)
        elif proj in KV_PROJS:
            in_part, out_part = slice(None), shard.kv_part(base.num_kv_heads, base.head_dim)
        else:
            in_part, out_part = slice(None), shard.part(fan_out)
        return cls(in_part, out_part, len(range(fan_in)[in_part]),
                   len(range(fan_out)[out_part]), proj in ROW_PARALLEL and shard.world > 1)
