"""Attach MoLE adapters to a transformers Llama-family model for offline inference.

Several adapters are attached at once; each batch row picks one (or the base model) with
`attachment.use([...])`, so one forward mixes adapters exactly as the server does. The math
is the reference (`mole_serve.reference`), which makes this integration the yardstick the
peers (MoE-PEFT, mixlora) and the vLLM model are compared with.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapter import BaseShape, MoleAdapter
from .checkpoint import check_fits
from .config import ATTENTION_PROJS
from .reference import FrozenFFN, model_activation, mole_ffn, mole_projection
from .stack import LayerStack, stack_layer


class MoleAttachment:
    """The adapters attached to one model and the per-row adapter choice of the next forward."""

    def __init__(self, model: nn.Module, adapters: Sequence[MoleAdapter]):
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got {names}")
        self.model = model
        self.base = BaseShape.from_hf_config(model.config)
        self.act_fn = model_activation(self.base.hidden_act, model.config)
        for adapter in adapters:
            check_fits(adapter, self.base)
        self.slot_of = {name: slot for slot, name in enumerate(names)}
        device = next(model.parameters()).device
        self.stacks = [stack_layer(list(adapters), i, self.base).to(device)
                       for i in range(self.base.num_layers)]
        self.row_slots: torch.Tensor | None = None
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        for index, layer in enumerate(_decoder_layers(model)):
            self._swap(layer, "mlp", _MoleMLP(layer.mlp, self, index))
            for proj in ATTENTION_PROJS:
                self._swap(layer.self_attn, proj,
                           _MoleLinear(getattr(layer.self_attn, proj), self, index, proj))

    def _swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self._originals.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    @contextlib.contextmanager
    def use(self, rows: str | None | Sequence[str | None]) -> Iterator[None]:
        """Run forwards inside with batch row i on adapter `rows[i]` (None = base model);
        a single name (or None) applies to every row."""
        previous = self.row_slots
        self.row_slots = self._slots(rows)
        try:
            yield
        finally:
            self.row_slots = previous

    def _slots(self, rows: str | None | Sequence[str | None]) -> torch.Tensor | None:
        if rows is None:
            return None
        if isinstance(rows, str):
            return torch.tensor([self._slot(rows)])
        return torch.tensor([-1 if r is None else self._slot(r) for r in rows])

    def _slot(self, name: str) -> int:
        if name not in self.slot_of:
            raise KeyError(f"no adapter named {name!r} is attached; attached: "
                           f"{sorted(self.slot_of)}")
        return self.slot_of[name]

    def token_slots(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Slot per token for a [B, L, H] activation, or None for a pure base forward."""
        if self.row_slots is None:
            return None
        batch, length = hidden.shape[0], hidden.shape[1]
        rows = self.row_slots.to(hidden.device)
        if rows.numel() == 1:
            rows = rows.expand(batch)
        elif rows.numel() != batch:
            raise ValueError(f"{rows.numel()} adapter choices for a batch of {batch} rows")
        return rows[:, None].expand(batch, length).reshape(-1)

    def detach(self) -> nn.Module:
        """Restore the original modules and return the model."""
        for parent, name, original in reversed(self._originals):
            setattr(parent, name, original)
        self._originals.clear()
        return self.model


def attach_adapters(model: nn.Module, adapters: Sequence[MoleAdapter]) -> MoleAttachment:
    """Wrap `model`'s MLPs and attention projections so `adapters` can be used per row."""
    return MoleAttachment(model, adapters)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} is not a Llama-family model "
                        "(no .model.layers)")
    return inner.layers


class _MoleMLP(nn.Module):
    def __init__(self, mlp: nn.Module, attachment: MoleAttachment, index: int):
        super().__init__()
        self.mlp, self.attachment, self.index = mlp, attachment, index

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slots = self.attachment.token_slots(hidden)
        if slots is None:
            return self.mlp(hidden)
        frozen = FrozenFFN(self.mlp.gate_proj.weight, self.mlp.up_proj.weight,
                           self.mlp.down_proj.weight, self.attachment.act_fn)
        flat = hidden.reshape(-1, hidden.shape[-1])
        stack: LayerStack = self.attachment.stacks[self.index]
        return mole_ffn(flat, frozen, slots, stack).reshape(hidden.shape)


class _MoleLinear(nn.Module):
    def __init__(self, linear: nn.Linear, attachment: MoleAttachment, index: int, proj: str):
        super().__init__()
        self.linear, self.attachment, self.index, self.proj = linear, attachment, index, proj
        self.weight = linear.weight  # read by transformers' attention for dtype checks

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slots = self.attachment.token_slots(hidden)
        stack = self.attachment.stacks[self.index]
        if slots is None or (self.proj not in stack.lora and self.proj not in stack.gated):
            return self.linear(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = mole_projection(flat, self.linear.weight, slots, self.proj, stack,
                             self.linear.bias)
        return out.reshape(*hidden.shape[:-1], out.shape[-1])
