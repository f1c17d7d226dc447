"""Which tokens a step's adapter layers compute, and through which slots.

vLLM's LoRA manager gives each token an adapter slot; `TokenSlots` keeps them for the whole
batch (and the kernels' token plan) once per step, `SlotBatch` is one step's view that every
layer reads, and `ExpertColumns` says how many expert columns a slot buffer's tokens need and
how a compact step reads their factors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .kernels import TokenPlan


@dataclass(frozen=True)
class SlotLimits:
    """What every slot can hold: the server's `--max-loras`, `--max-mole-rank` and
    `--max-mole-experts`, and the dtype its LoRA factors are stored in (the model's)."""

    slots: int
    rank: int
    experts: int
    factor_dtype: torch.dtype = torch.float32


class TokenSlots:
    """Each step's per-token adapter slots (-1 = none) and, for the kernels, their token
    plan: built once per step by the model's forward (`prepare`), read by every layer
    (`batch`), so no layer sorts tokens again (vLLM splits the compiled model at each
    attention, so a plan built in the layers would be rebuilt twice per layer).

    Everything lives in persistent buffers sized for vLLM's largest batch and is sliced by
    the step's token count, so compiled layers and CUDA graphs see the same addresses every
    step. `set` writes the slots of the tokens whose adapter is a MoLE one (outside the
    forward, when vLLM's LoRA manager sets the step's adapter mapping); other tokens stay -1.
    `compact` (`SlotBatch`): `prepare` also reads which rows and slots the step's MoLE tokens
    use, on the host.
    """

    def __init__(self, num_slots: int, max_tokens: int, use_kernels: bool = False,
                 device: torch.device | str | None = None, compact: bool = False):
        if compact and use_kernels:
            raise ValueError("compact steps are the reference backend's: the kernels need "
                             "their token plan")
        self.num_slots = num_slots
        self.compact = compact
        self._compact_step: tuple[int, torch.Tensor, tuple[int, ...]] | None = None
        # Tokens per plan block; None: the reference backend needs no plan.
        self.plan_block_m = kernels_module().BLOCK_M if use_kernels else None
        self.slots = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        if self.plan_block_m is not None:
            blocks = kernels_module().max_blocks(max_tokens, num_slots, self.plan_block_m)
            self.sorted_tokens = torch.full((blocks * self.plan_block_m,), -1,
                                            dtype=torch.int32, device=device)
            self.block_slot = torch.zeros(blocks, dtype=torch.int32, device=device)

    def set(self, slots: torch.Tensor) -> None:
        """The next steps' per-token slots (int, -1 = none; on any device); rows past them
        (padding) get -1. From the host they go through pinned memory without waiting, as
        vLLM's own LoRA mapping tensors do, so this adds no wait for the step in flight
        (vLLM's punica metadata itself still reads the device when the mapping changes)."""
        if slots.device.type == "cpu" and self.slots.device.type == "cuda":
            slots = slots.pin_memory()
        self.slots[:slots.shape[0]].copy_(slots, non_blocking=True)
        self.slots[slots.shape[0]:].fill_(-1)
        self._compact_step = None

    def prepare(self, num_tokens: int) -> None:
        """Once per step, before the layers: this step's token plan (kernels), or its MoLE
        rows and the slots they use (compact)."""
        if self.compact:
            self._compact_step = self._read_compact_step(num_tokens)
        if self.plan_block_m is not None:
            plan = kernels_module().plan_tokens(self.slots[:num_tokens], self.num_slots,
                                          self.plan_block_m)
            self.sorted_tokens[:plan.sorted_tokens.shape[0]].copy_(plan.sorted_tokens)
            self.block_slot[:plan.num_blocks].copy_(plan.block_slot)

    def batch(self, num_tokens: int) -> "SlotBatch":
        """The slots and plan `prepare(num_tokens)` built."""
        slots = self.slots[:num_tokens]
        if self.compact and not torch.compiler.is_compiling():
            step = self._compact_step
            if step is None or step[0] != num_tokens:
                step = self._read_compact_step(num_tokens)
            return SlotBatch(slots, None, *step[1:])
        if self.plan_block_m is None:
            return SlotBatch(slots, None)
        kernels = kernels_module()
        blocks = kernels.max_blocks(num_tokens, self.num_slots, self.plan_block_m)
        return SlotBatch(slots, kernels.TokenPlan(
            self.sorted_tokens[:blocks * self.plan_block_m], self.block_slot[:blocks],
            self.plan_block_m))

    def _read_compact_step(self, num_tokens: int) -> tuple[int, torch.Tensor, tuple[int, ...]]:
        """(num_tokens, rows of MoLE tokens, the slots they use), read on the host."""
        slots = self.slots[:num_tokens]
        rows = (slots >= 0).nonzero().flatten()
        return num_tokens, rows, tuple(slots[rows].unique().tolist())


@dataclass(frozen=True)
class SlotBatch:
    """One step's per-token slots [T] (-1 = none) and, on the kernels, their token plan.

    A compact batch (reference backend on a CPU, `TokenSlots(compact=True)`: vLLM runs the
    model eagerly there and the slots are host memory) also names the rows of MoLE tokens
    and the slots they use. The reference layers then compute those rows only (a step of
    base-model or plain-LoRA tokens costs nothing extra), with only as many expert columns
    as those slots' adapters can select (`k_for`), not the server's largest count, and
    read the expert factors the cheaper way (`gathers`): data-dependent shapes, so never
    on the kernels' CUDA-graph path or while compiling."""

    slots: torch.Tensor
    plan: "TokenPlan | None"
    rows: torch.Tensor | None = None  # compact: the MoLE tokens' rows; None: every row
    used_slots: tuple[int, ...] = ()  # compact: the slots those rows use

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s rows of the tokens the layers compute (compact: the MoLE tokens')."""
        return t if self.rows is None else t[self.rows]

    def put(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`t` with the rows `take(t)` returns replaced by `rows`."""
        return rows if self.rows is None else t.index_copy(0, self.rows, rows)


class ExpertColumns:
    """How many expert columns ([T, k] routing) a slot buffer's tokens need: its k_max, or
    for a compact batch the most any of its slots' adapters selects (`slot_k`, kept by
    `fill`; 0: no adapter of those slots adapts here, nothing to compute); how a compact
    batch's expert math reads the factors (`gathers`)."""

    k_max: int
    slot_k: list[int]
    slot_experts: list[int]  # each slot's adapter's experts here (plain LoRA: 1), by `fill`

    def gathers(self, batch: SlotBatch) -> bool:
        """Whether the batch's expert math gathers each row's k experts' factors (the
        reference; every-row batches always) rather than running each used slot's experts
        as GEMMs over its factors (`grouped`): whichever reads fewer expert factor sets,
        rows x k or the used slots' experts; at a tie the gathers, a fixed number of ops
        where grouping takes a few per slot. So decode steps (a row or two per slot) gather
        and prefill steps group."""
        if batch.rows is None:
            return True
        return batch.rows.shape[0] * self.k_for(batch) <= sum(self.slot_experts[s]
                                                              for s in batch.used_slots)

    def k_for(self, batch: SlotBatch) -> int:
        if batch.rows is None:
            return self.k_max
        return max((self.slot_k[s] for s in batch.used_slots), default=0)

    def narrowed(self, batch: SlotBatch) -> SlotBatch:
        """A compact batch without the rows whose slot's adapter does not adapt here (a
        DynMoLE token in MixLoRA's FFN experts, a MixLoRA one in DynMoLE's gate/up)."""
        if batch.rows is None:
            return batch
        used = tuple(s for s in batch.used_slots if self.slot_k[s] > 0)
        if len(used) == len(batch.used_slots):
            return batch
        slots = batch.slots[batch.rows]
        keep = torch.isin(slots, torch.tensor(used, dtype=torch.long, device=slots.device))
        return replace(batch, rows=batch.rows[keep], used_slots=used)


def kernels_module():
    """`mole_serve.kernels`, imported on first use only: importing it without CUDA switches
    Triton to its interpreter for the whole process, which a CPU server must not do."""
    from . import kernels
    return kernels
