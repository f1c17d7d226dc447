"""Trainable MoLE adapters on a frozen transformers Llama, several adapters per batch.

Each adapter's routers and LoRA factors are fp32 `nn.Parameter`s; batch rows are assigned to
adapters (MoE-PEFT's multi-adapter "BatchFusion"), the frozen model runs once for the whole
batch, and each adapter's delta is computed on its rows only. The MixLoRA FFN uses the exact
rewrites of DESIGN §1 grouped by expert (gate/up once, experts mixed before one `W_d`), so
training costs one dense FFN plus LoRA work per token, not k FFNs as in MoE-PEFT's loop.
The math is the reference's; tests hold the two equal.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mole_serve.adapter import BaseShape, ExpertLoRAs, LoRA, MoleAdapter, MoleLayer
from mole_serve.config import ATTENTION_PROJS
from mole_serve.reference import (ACTIVATIONS, gated_delta_literal, lora_delta,
                                   model_activation)
from mole_serve.routing import route_config


class AdapterParameters(nn.Module):
    """One adapter's trainable tensors, laid out like `MoleAdapter` (fp32 Parameters).

    LoRA dropout masks are a pure function of (adapter seed, step, site, call): they do not
    depend on which adapters share the batch, and gradient checkpointing's recomputation
    draws exactly the masks the first forward drew.
    """

    def __init__(self, adapter: MoleAdapter, dropout_seed: int = 0):
        super().__init__()
        self.name, self.config = adapter.name, adapter.config
        self.params = nn.ParameterDict()
        for index, layer in enumerate(adapter.layers):
            for key, tensor in _layer_tensors(index, layer):
                self.params[key] = nn.Parameter(tensor.detach().clone().float())
        self.dropout_seed = dropout_seed
        self.step = 0  # set by the trainer before each training forward

    def dropout(self, *site) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The LoRA input dropout for one call site (None at inference or p = 0); each
        call of the returned function draws a fresh, reproducible mask."""
        p = self.config.lora_dropout
        if not self.training or p <= 0:
            return None
        calls = itertools.count()

        def drop(x: torch.Tensor) -> torch.Tensor:
            seed = zlib.crc32(repr((self.dropout_seed, self.step, *site, next(calls))).encode())
            generator = torch.Generator(device=x.device).manual_seed(seed)
            keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
            return x * keep / (1.0 - p)
        return drop

    @torch.no_grad()
    def copy_from(self, adapter: MoleAdapter) -> None:
        """Overwrite the parameters with a saved adapter's tensors (resuming)."""
        for index, layer in enumerate(adapter.layers):
            for key, tensor in _layer_tensors(index, layer):
                self.params[key].copy_(tensor)

    def layer(self, index: int) -> MoleLayer:
        """A MoleLayer view whose tensors are this module's Parameters (autograd flows)."""
        p, prefix = self.params, f"l{index}_"
        get = lambda key: p[prefix + key] if prefix + key in p else None  # noqa: E731
        experts = {proj: ExpertLoRAs(p[f"{prefix}{proj}_ea"], p[f"{prefix}{proj}_eb"])
                   for proj in _PROJS if f"{prefix}{proj}_ea" in p}
        routers = {proj: p[f"{prefix}{proj}_router"] for proj in _PROJS
                   if f"{prefix}{proj}_router" in p}
        lora = {proj: LoRA(p[f"{prefix}{proj}_a"], p[f"{prefix}{proj}_b"]) for proj in _PROJS
                if f"{prefix}{proj}_a" in p}
        return MoleLayer(router=get("router"), experts=experts, routers=routers, lora=lora)

    def to_adapter(self, num_layers: int) -> MoleAdapter:
        """Detached copy for saving or serving."""
        layers = []
        for i in range(num_layers):
            view = self.layer(i)
            layers.append(MoleLayer(
                router=None if view.router is None else view.router.detach().clone(),
                experts={k: ExpertLoRAs(v.a.detach().clone(), v.b.detach().clone())
                         for k, v in view.experts.items()},
                routers={k: v.detach().clone() for k, v in view.routers.items()},
                lora={k: LoRA(v.a.detach().clone(), v.b.detach().clone())
                      for k, v in view.lora.items()}))
        return MoleAdapter(self.name, self.config, layers)


_PROJS = ATTENTION_PROJS + ("gate_proj", "up_proj", "down_proj")


def _layer_tensors(index: int, layer: MoleLayer):
    prefix = f"l{index}_"
    if layer.router is not None:
        yield prefix + "router", layer.router
    for proj, experts in layer.experts.items():
        yield f"{prefix}{proj}_ea", experts.a
        yield f"{prefix}{proj}_eb", experts.b
    for proj, router in layer.routers.items():
        yield f"{prefix}{proj}_router", router
    for proj, lora in layer.lora.items():
        yield f"{prefix}{proj}_a", lora.a
        yield f"{prefix}{proj}_b", lora.b


class RouterLog:
    """Router logits of the current forward per adapter (all layers and routers, real
    tokens only)."""

    def __init__(self) -> None:
        self.logits: dict[str, list[torch.Tensor]] = {}

    def add(self, adapter: str, logits: torch.Tensor) -> None:
        self.logits.setdefault(adapter, []).append(logits)

    def of(self, adapter: str) -> torch.Tensor | None:
        return torch.cat(self.logits[adapter]) if adapter in self.logits else None


class MoleTrainingModel(nn.Module):
    """A frozen causal LM plus trainable adapters; `rows(...)` assigns batch rows."""

    def __init__(self, model: nn.Module, adapters: Sequence[MoleAdapter],
                 dropout_seeds: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.base = BaseShape.from_hf_config(model.config)
        seeds = dropout_seeds or [0] * len(adapters)
        self.adapters = nn.ModuleDict({a.name: AdapterParameters(a, seed)
                                       for a, seed in zip(adapters, seeds)})
        self.act_fn = model_activation(self.base.hidden_act, model.config)
        self.row_groups: list[tuple[str, torch.Tensor]] = []
        self.token_mask: torch.Tensor | None = None
        self.router_log: RouterLog | None = None
        layers = model.model.layers
        for index, layer in enumerate(layers):
            layer.mlp = _TrainMLP(layer.mlp, self, index)
            for proj in ATTENTION_PROJS:
                setattr(layer.self_attn, proj,
                        _TrainLinear(getattr(layer.self_attn, proj), self, index, proj))

    @contextlib.contextmanager
    def rows(self, names: Sequence[str | None], attention_mask: torch.Tensor | None = None
             ) -> Iterator[RouterLog]:
        """Row i of the next forwards uses adapter names[i] (None: base model). Yields the
        log the forward fills with router logits; `attention_mask` marks padding, which
        keeps the base model's output."""
        groups = []
        for name in dict.fromkeys(n for n in names if n is not None):
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r}")
            groups.append((name, torch.tensor([i for i, n in enumerate(names) if n == name])))
        self.row_groups, self.token_mask = groups, attention_mask
        self.router_log = RouterLog()
        try:
            yield self.router_log
        finally:
            self.row_groups, self.token_mask, self.router_log = [], None, None

    def groups(self, hidden: torch.Tensor):
        """(adapter params, flat token indices) per adapter for a [B, L, H] activation.

        Only real tokens are adapted: padding keeps the base model's output (its loss is
        ignored anyway), and an adapter's work and dropout draws then do not depend on how
        far other adapters' rows pad the batch.
        """
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device)
        for name, rows in self.row_groups:
            rows = rows.to(hidden.device)
            tokens = (rows[:, None] * length + positions).reshape(-1)
            if self.token_mask is not None:
                tokens = tokens[self.token_mask[rows].reshape(-1).bool()]
            yield self.adapters[name], tokens

    def record(self, adapter: str, logits: torch.Tensor) -> None:
        if self.router_log is not None:
            self.router_log.add(adapter, logits)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class _TrainLinear(nn.Module):
    def __init__(self, linear: nn.Linear, owner: MoleTrainingModel, index: int, proj: str):
        super().__init__()
        self.linear, self.index, self.proj = linear, index, proj
        self.__dict__["owner"] = owner  # not a submodule: avoid a parameter cycle
        self.weight = linear.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.linear(hidden)
        flat, result = hidden.reshape(-1, hidden.shape[-1]), out.reshape(-1, out.shape[-1])
        for params, tokens in self.owner.groups(hidden):
            delta = linear_delta(flat[tokens], self.proj, params, self.index, self.owner)
            if delta is not None:
                result = result.index_add(0, tokens, delta.to(result.dtype))
        return result.reshape(out.shape)


def linear_delta(x: torch.Tensor, proj: str, params: AdapterParameters, index: int,
                 owner: MoleTrainingModel) -> torch.Tensor | None:
    """The adapter's additive delta on one linear for its tokens, or None."""
    layer, config = params.layer(index), params.config
    if proj in layer.routers:
        delta, logits = gated_delta_literal(x, layer.routers[proj], layer.experts[proj], config,
                                            params.dropout(index, proj))
        owner.record(params.name, logits)
        return delta
    if proj in layer.lora:
        return lora_delta(x, layer.lora[proj], config.scaling, params.dropout(index, proj))
    return None


class _TrainMLP(nn.Module):
    def __init__(self, mlp: nn.Module, owner: MoleTrainingModel, index: int):
        super().__init__()
        self.mlp, self.index = mlp, index
        self.__dict__["owner"] = owner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        owner, mlp = self.owner, self.mlp
        act = ACTIVATIONS[owner.act_fn]
        flat = hidden.reshape(-1, hidden.shape[-1])
        g, u = mlp.gate_proj(flat), mlp.up_proj(flat)
        groups = list(owner.groups(hidden))
        for params, tokens in groups:
            for proj in ("gate_proj", "up_proj"):
                delta = linear_delta(flat[tokens], proj, params, self.index, owner)
                if delta is not None:
                    if proj == "gate_proj":
                        g = g.index_add(0, tokens, delta.to(g.dtype))
                    else:
                        u = u.index_add(0, tokens, delta.to(u.dtype))
        h = act(g) * u
        down_deltas = []
        for params, tokens in groups:
            if params.config.has_ffn_experts:
                mixed, delta = grouped_mixlora(flat[tokens], g[tokens], u[tokens], params,
                                               self.index, act, owner)
                h = h.index_copy(0, tokens, mixed.to(h.dtype))
                down_deltas.append((tokens, delta))
        y = mlp.down_proj(h)
        for params, tokens in groups:
            delta = linear_delta(h[tokens], "down_proj", params, self.index, owner)
            if delta is not None:
                y = y.index_add(0, tokens, delta.to(y.dtype))
        for tokens, delta in down_deltas:
            y = y.index_add(0, tokens, delta.to(y.dtype))
        return y.reshape(hidden.shape)


def grouped_mixlora(x: torch.Tensor, g0: torch.Tensor, u0: torch.Tensor,
                    params: AdapterParameters, index: int, act, owner: MoleTrainingModel
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """MixLoRA experts for one adapter's tokens, grouped by expert. Returns the mixed
    intermediate (for the one shared W_d) and the summed weighted down-LoRA delta."""
    layer, config, drop = params.layer(index), params.config, params.dropout(index, "experts")
    s = config.scaling
    logits = F.linear(x.float(), layer.router)
    owner.record(params.name, logits)
    weights, ids = route_config(logits, config)
    mixed = torch.zeros(x.shape[0], g0.shape[-1], device=x.device)
    down = torch.zeros(x.shape[0], layer.router.shape[-1], device=x.device)
    gate, up, down_lora = (layer.experts.get(p) for p in ("gate_proj", "up_proj", "down_proj"))
    for e in range(config.num_experts):
        token, slot = torch.where((ids == e) & (weights > 0))
        if token.numel() == 0:
            continue
        xe, w = x[token], weights[token, slot, None]
        g, u = g0[token].float(), u0[token].float()
        if gate is not None:
            g = g + lora_delta(xe, LoRA(gate.a[e], gate.b[e]), s, drop)
        if up is not None:
            u = u + lora_delta(xe, LoRA(up.a[e], up.b[e]), s, drop)
        h = act(g) * u
        mixed = mixed.index_add(0, token, w * h)
        if down_lora is not None:
            down = down.index_add(0, token, w * lora_delta(h, LoRA(down_lora.a[e],
                                                                   down_lora.b[e]), s, drop))
    return mixed, down
