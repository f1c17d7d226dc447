"""The numerical truth: plain-PyTorch MoLE math, in two forms.

* literal (`*_literal`): one adapter, loops over experts exactly as MoE-PEFT / DynMoLE do
  (each expert runs the whole FFN on its tokens, `W_d` included). Slow on purpose.
* rewritten (`mole_ffn`, `mole_projection`): many adapters in one batch through slot-stacked
  weights, vectorised and free of host syncs, using DESIGN §1's exact rewrites: `W_g x` and
  `W_u x` once for all tokens, the k intermediates mixed before one `W_d`. Kernels and the
  vLLM layer are tested against this form, and this form against the literal one.

Frozen (base) matmuls run in the input dtype, as the frozen model does; routers, LoRA and
mixing run in fp32, as MoE-PEFT does. Tokens with slot -1 (base model) get exactly the
frozen model's result: no delta is added to them, not even a zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch
import torch.nn.functional as F

from .adapter import ExpertLoRAs, LoRA, MoleLayer
from .config import MoleConfig
from .routing import route, route_config
from .stack import GatedLoRAStack, LayerStack, LoRAStack, MixLoRAStack

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def model_activation(base_act: str | None, model_config: object) -> str:
    """The activation of a transformers model's MLP when the reference can compute that MLP;
    ValueError for an activation it lacks or names none, or projections with biases."""
    bias = getattr(model_config, "mlp_bias", False)
    if base_act not in ACTIVATIONS or bias:
        raise ValueError(f"the model's MLP (hidden_act {base_act!r}, mlp_bias {bias}) is not one "
                         f"the reference computes: activations {list(ACTIVATIONS)}, no biases")
    return base_act


@dataclass
class FrozenFFN:
    """A Llama MLP's frozen weights ([out, in], nn.Linear layout)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act_fn: str = "silu"

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.act_fn](x)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, self.gate)) * F.linear(x, self.up)

    # The frozen pieces `layers.FFNAdapters.around_frozen` runs, on vLLM's fused gate_up layout.
    def gate_up_gemm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, self.gate), F.linear(x, self.up)], dim=-1)

    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        g, u = gate_up.chunk(2, dim=-1)
        return self.act(g) * u

    def down_gemm(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.intermediate(x), self.down)


def lora_delta(x: torch.Tensor, lora: LoRA, scaling: float, dropout=None) -> torch.Tensor:
    """s * B A drop(x) in fp32 (`dropout`: the trainer's LoRA dropout; None at inference)."""
    x = x.float()
    if dropout is not None:
        x = dropout(x)
    return scaling * F.linear(F.linear(x, lora.a), lora.b)


def _expert(experts: ExpertLoRAs | None, e: int) -> LoRA | None:
    return None if experts is None else LoRA(experts.a[e], experts.b[e])


# -- literal forms (one adapter) --------------------------------------------------------------
def mixlora_ffn_literal(x: torch.Tensor, base: FrozenFFN, layer: MoleLayer,
                        config: MoleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE-PEFT's MixLoRA block: every selected expert runs a full SwiGLU FFN (frozen weights
    plus its LoRA deltas) on its tokens; outputs are weighted and summed.
    Returns (output [T, H], router logits [T, E])."""
    s = config.scaling
    logits = F.linear(x.float(), layer.router)
    weights, ids = route_config(logits, config)
    out = torch.zeros(x.shape[0], base.down.shape[0], dtype=torch.float32, device=x.device)
    for e in range(config.num_experts):
        token, slot = torch.where((ids == e) & (weights > 0))
        if token.numel() == 0:
            continue
        xe = x[token]
        g, u = F.linear(xe, base.gate).float(), F.linear(xe, base.up).float()
        for proj, target in (("gate_proj", "g"), ("up_proj", "u")):
            lora = _expert(layer.experts.get(proj), e)
            if lora is not None:
                delta = lora_delta(xe, lora, s)
                g, u = (g + delta, u) if target == "g" else (g, u + delta)
        h = base.act(g) * u
        y = F.linear(h.to(x.dtype), base.down).float()
        lora = _expert(layer.experts.get("down_proj"), e)
        if lora is not None:
            y = y + lora_delta(h, lora, s)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out.to(x.dtype), logits


def gated_delta_literal(x: torch.Tensor, router: torch.Tensor, experts: ExpertLoRAs,
                        config: MoleConfig, dropout=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DynMoLE's routed delta sum_e w_e s B_e A_e drop(x) (fp32), experts looped densely as
    its code does (a fresh dropout mask per expert). Returns (delta, router logits)."""
    logits = F.linear(x.float(), router)
    weights, ids = route_config(logits, config)
    dense = torch.zeros_like(logits).scatter_add(-1, ids, weights)
    delta = torch.zeros(x.shape[0], experts.b.shape[1], device=x.device)
    for e in range(config.num_experts):
        delta = delta + dense[:, e:e + 1] * lora_delta(x, _expert(experts, e), config.scaling,
                                                        dropout)
    return delta, logits


def gated_linear_literal(x: torch.Tensor, weight: torch.Tensor, router: torch.Tensor,
                         experts: ExpertLoRAs, config: MoleConfig
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """DynMoLE's routed linear W x + routed delta. Returns (output, router logits)."""
    delta, logits = gated_delta_literal(x, router, experts, config)
    return (F.linear(x, weight).float() + delta).to(x.dtype), logits


def projection_literal(x: torch.Tensor, weight: torch.Tensor, proj: str, layer: MoleLayer,
                       config: MoleConfig) -> torch.Tensor:
    """One adapted linear of one adapter: routed (DynMoLE), plain LoRA, or frozen."""
    if proj in layer.routers:
        return gated_linear_literal(x, weight, layer.routers[proj], layer.experts[proj],
                                    config)[0]
    if proj in layer.lora:
        return (F.linear(x, weight).float() + lora_delta(x, layer.lora[proj], config.scaling)
                ).to(x.dtype)
    return F.linear(x, weight)


def ffn_literal(x: torch.Tensor, base: FrozenFFN, layer: MoleLayer,
                config: MoleConfig) -> torch.Tensor:
    """The FFN of one adapter: MixLoRA experts, or a Llama MLP whose linears are adapted."""
    if config.has_ffn_experts:
        return mixlora_ffn_literal(x, base, layer, config)[0]

    def linear(h: torch.Tensor, proj: str, weight: torch.Tensor) -> torch.Tensor:
        return projection_literal(h, weight, proj, layer, config)

    h = base.act(linear(x, "gate_proj", base.gate)) * linear(x, "up_proj", base.up)
    return linear(h, "down_proj", base.down)


# -- rewritten forms (slot-stacked, many adapters) --------------------------------------------
# Gathering each token's expert factors makes memory grow with tokens x k_max x factor size
# (a 1B model's FFN: 2 MiB per token and selected expert); tokens are taken in chunks that
# gather at most this many elements from one factor table. 16 MiB in fp32: on the CPU box
# a 1B FFN ran 1.2-2.3x faster than with 64 MiB chunks (benchmarks/RESULTS.md).
GATHER_BUDGET = 1 << 22


def _gather(table: torch.Tensor, slot: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[slot[t], ids[t, j]] -> [T, k, ...] in fp32 (stacks may be stored in bf16)."""
    return table[slot[:, None], ids].float()


def _slot_rows(table: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """table[slot[t]] -> [T, ...] in fp32."""
    return table[slot].float()


def by_token_chunks(fn, per_token: int, *rows: torch.Tensor, **fixed):
    """fn(*rows, **fixed), its token rows taken in chunks whose gathers hold at most
    GATHER_BUDGET elements (`per_token`: the largest gather's elements per token); every
    row is computed alone, so chunking changes no result. Not while torch.compile traces:
    a loop over the token count would fix that count (vLLM marks it dynamic)."""
    step = max(1, GATHER_BUDGET // max(1, per_token))
    if torch.compiler.is_compiling() or rows[0].shape[0] <= step:
        return fn(*rows, **fixed)
    parts = [fn(*(row[start:start + step] for row in rows), **fixed)
             for start in range(0, rows[0].shape[0], step)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(part) for part in zip(*parts))
    return torch.cat(parts)


def router_logits(x: torch.Tensor, slots: torch.Tensor, router: torch.Tensor
                  ) -> torch.Tensor:
    """Each token's logits [T, E] (fp32) through its own slot's router [S, E, in]. Linear in
    x: with x split over tensor-parallel ranks, the ranks' results sum to the whole's."""
    return by_token_chunks(_router_logits, router[0].numel(), x, slots.clamp(min=0),
                           router=router)


def _router_logits(x: torch.Tensor, slot: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ti,tei->te", x.float(), _slot_rows(router, slot))


def mixlora_route(x: torch.Tensor, slots: torch.Tensor, stack: MixLoRAStack,
                  logits: torch.Tensor | None = None,
                  strategies: Collection[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token routing through each token's slot router (`logits`: `router_logits`, when
    the caller has them; `strategies`: `routing.selection_mask`'s). Returns (weights
    [T, k_max] zero for non-MixLoRA tokens, expert ids, uses-MixLoRA mask)."""
    slot = slots.clamp(min=0)
    uses = (slots >= 0) & stack.enabled[slot]
    if logits is None:
        logits = router_logits(x, slots, stack.router)
    weights, ids = route(logits, stack.routing[slot], stack.k_max, strategies)
    # where, not a product: tokens of empty slots (or base tokens) may have NaN weights
    return torch.where(uses[:, None], weights, 0.0), ids, uses


def mixlora_experts(g0: torch.Tensor, u0: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                    weights: torch.Tensor, ids: torch.Tensor, stack: MixLoRAStack,
                    act_fn: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """Each selected expert's intermediate h_k = act(g0 + dg_k) * (u0 + du_k); returns the
    weight-mixed intermediate [T, I] (fp32) and the down shrinks A_d h_k [T, k, r] (fp32)."""
    per_token = ids.shape[1] * max(table[0, 0].numel() for table in (
        stack.gate_up_a, stack.gate_up_b, stack.down_a))
    return by_token_chunks(_mixlora_experts, per_token, g0, u0, x, slots, weights, ids,
                           stack=stack, act_fn=act_fn)


def _mixlora_experts(g0: torch.Tensor, u0: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                     weights: torch.Tensor, ids: torch.Tensor, stack: MixLoRAStack,
                     act_fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    slot = slots.clamp(min=0)
    r = stack.down_a.shape[2]
    scale = stack.scaling[slot][:, None, None]
    shrink = torch.einsum("th,tkrh->tkr", x.float(), _gather(stack.gate_up_a, slot, ids))
    expand = _gather(stack.gate_up_b, slot, ids)                       # [T, k, 2, I, r]
    g_delta = torch.einsum("tkr,tkir->tki", shrink[..., :r], expand[:, :, 0])
    u_delta = torch.einsum("tkr,tkir->tki", shrink[..., r:], expand[:, :, 1])
    g = g0.float()[:, None] + scale * g_delta
    u = u0.float()[:, None] + scale * u_delta
    h = ACTIVATIONS[act_fn](g) * u
    mixed = (weights[..., None] * h).sum(1)
    down_shrink = torch.einsum("tki,tkri->tkr", h, _gather(stack.down_a, slot, ids))
    return mixed, down_shrink


def mixlora_down_delta(down_shrink: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, stack: MixLoRAStack) -> torch.Tensor:
    """sum_k w_k s B_d,k (A_d,k h_k) -> [T, H] fp32."""
    return by_token_chunks(_mixlora_down_delta, ids.shape[1] * stack.down_b[0, 0].numel(),
                           down_shrink, slots, weights, ids, stack=stack)


def _mixlora_down_delta(down_shrink: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor, stack: MixLoRAStack) -> torch.Tensor:
    slot = slots.clamp(min=0)
    coef = weights * stack.scaling[slot][:, None]
    return torch.einsum("tkr,tkhr->th", down_shrink * coef[..., None],
                        _gather(stack.down_b, slot, ids))


def gated_lora_delta(x: torch.Tensor, slots: torch.Tensor, stack: GatedLoRAStack,
                     logits: torch.Tensor | None = None,
                     routed: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-linear routed LoRA delta [T, out] fp32 and the mask of tokens it applies to.
    `logits`: the tokens' `router_logits` when the caller has them (tensor parallelism: the
    sum over ranks; x and the A factors are then this rank's slices, the delta its part);
    `routed`: their routing (weights, ids) when the caller has it (the metrics count it;
    `gated_route`'s, or a plain LoRA's one expert of weight 1)."""
    slot = slots.clamp(min=0)
    uses = (slots >= 0) & stack.enabled[slot]
    if routed is None:
        if logits is None:
            logits = router_logits(x, slots, stack.router)
        routed = gated_route(logits, slots, stack)
    weights, ids = routed
    coef = torch.where(uses[:, None], weights * stack.scaling[slot][:, None], 0.0)
    per_token = ids.shape[1] * max(stack.a[0, 0].numel(), stack.b[0, 0].numel())
    return by_token_chunks(_gated_delta, per_token, x, slot, coef, ids, stack=stack), uses


def _gated_delta(x: torch.Tensor, slot: torch.Tensor, coef: torch.Tensor, ids: torch.Tensor,
                 stack: GatedLoRAStack) -> torch.Tensor:
    shrink = torch.einsum("ti,tkri->tkr", x.float(), _gather(stack.a, slot, ids))
    return torch.einsum("tkr,tkor->to", shrink * coef[..., None], _gather(stack.b, slot, ids))


def gated_route(logits: torch.Tensor, slots: torch.Tensor, stack: GatedLoRAStack
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's routing (weights, ids) [T, k_max] through its slot's row of `stack`."""
    return route(logits, stack.routing[slots.clamp(min=0)], stack.k_max)


def lora_stack_delta(x: torch.Tensor, slots: torch.Tensor, stack: LoRAStack
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-slot LoRA delta [T, out] fp32 and the mask of tokens it applies to."""
    slot = slots.clamp(min=0)
    uses = (slots >= 0) & stack.enabled[slot]
    per_token = max(stack.a[0].numel(), stack.b[0].numel())
    return by_token_chunks(_lora_stack_delta, per_token, x, slot, stack=stack), uses


def _lora_stack_delta(x: torch.Tensor, slot: torch.Tensor, stack: LoRAStack) -> torch.Tensor:
    shrink = torch.einsum("ti,tri->tr", x.float(), _slot_rows(stack.a, slot))
    return torch.einsum("tr,tor->to", shrink * stack.scaling[slot][:, None],
                        _slot_rows(stack.b, slot))


def add_where(base: torch.Tensor, delta: torch.Tensor, uses: torch.Tensor) -> torch.Tensor:
    """base + delta on `uses` rows (in fp32, cast back); other rows untouched bit for bit."""
    return torch.where(uses[:, None], (base.float() + delta).to(base.dtype), base)


def mole_projection(x: torch.Tensor, weight: torch.Tensor, slots: torch.Tensor, proj: str,
                    stack: LayerStack, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A projection of the frozen model plus whatever adapter each token's slot holds."""
    y = F.linear(x, weight, bias)
    if proj in stack.lora:
        y = add_where(y, *lora_stack_delta(x, slots, stack.lora[proj]))
    if proj in stack.gated:
        y = add_where(y, *gated_lora_delta(x, slots, stack.gated[proj]))
    return y


def mole_ffn(x: torch.Tensor, base: FrozenFFN, slots: torch.Tensor,
             stack: LayerStack) -> torch.Tensor:
    """The MoLE FFN for a mixed batch: [T, H] in, [T, H] out, one frozen FFN per token."""
    g = mole_projection(x, base.gate, slots, "gate_proj", stack)
    u = mole_projection(x, base.up, slots, "up_proj", stack)
    h = base.act(g) * u
    ffn = stack.ffn
    if ffn is None:
        return mole_projection(h, base.down, slots, "down_proj", stack)
    weights, ids, uses = mixlora_route(x, slots, ffn)
    mixed, down_shrink = mixlora_experts(g, u, x, slots, weights, ids, ffn, base.act_fn)
    h = torch.where(uses[:, None], mixed.to(h.dtype), h)
    y = mole_projection(h, base.down, slots, "down_proj", stack)
    return add_where(y, mixlora_down_delta(down_shrink, slots, weights, ids, ffn), uses)
