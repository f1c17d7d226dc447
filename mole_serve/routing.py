"""Reference routing for every strategy, with static shapes, plus the router losses.

Each token carries its own routing parameters (a row of a per-slot table), so one call
routes a batch that mixes adapters of different strategies. Outputs are always
`[T, k_max]`: expert ids sorted by probability and weights that are zero for slots a token
does not use, which is what CUDA graphs and the kernels need (no data-dependent shapes).
"""

from __future__ import annotations

import math
from typing import Collection

import torch
import torch.nn.functional as F

from .config import DYNMOLE, MIXLORA, MIXLORA_DYNAMIC, MIXLORA_SWITCH, MoleConfig

STRATEGY_CODE = {MIXLORA: 0, MIXLORA_DYNAMIC: 1, MIXLORA_SWITCH: 2, DYNMOLE: 3}
TOP_K_CODE, DYNAMIC_CODE, SWITCH_CODE, DYNMOLE_CODE = (
    STRATEGY_CODE[s] for s in (MIXLORA, MIXLORA_DYNAMIC, MIXLORA_SWITCH, DYNMOLE))

# Columns of a routing table row (float32 so one tensor holds them all).
STRATEGY, NUM_EXPERTS, TOP_K, TOP_P, TEMPERATURE, KEEP_TOP_K, ENTROPY_THRESHOLD, \
    ENTROPY_INDEX, ENTROPY_EPS = range(9)
NUM_COLUMNS = 9


def routing_row(config: MoleConfig) -> torch.Tensor:
    """The routing-table row [NUM_COLUMNS] that encodes one adapter's routing."""
    row = torch.zeros(NUM_COLUMNS, dtype=torch.float32)
    row[STRATEGY] = STRATEGY_CODE[config.routing_strategy]
    row[NUM_EXPERTS] = config.num_experts
    row[TOP_K] = config.top_k
    row[TOP_P] = config.top_p
    row[TEMPERATURE] = config.temperature
    row[KEEP_TOP_K] = config.keep_top_k
    # DynMoLE: a threshold >= 1 turns broadcast off (near-uniform entropy can pass 1)
    threshold = config.entropy_threshold
    row[ENTROPY_THRESHOLD] = threshold if threshold < 1.0 else math.inf
    row[ENTROPY_INDEX] = config.entropy_index
    row[ENTROPY_EPS] = config.entropy_eps
    return row


def one_expert_routing_row() -> torch.Tensor:
    """Switch routing over a single expert: weight exactly 1 for every token, so a plain
    LoRA runs as a one-expert routed stack on the same kernels."""
    row = torch.zeros(NUM_COLUMNS, dtype=torch.float32)
    row[STRATEGY] = STRATEGY_CODE[MIXLORA_SWITCH]
    row[NUM_EXPERTS] = 1
    return row


def routing_table(configs: list[MoleConfig]) -> torch.Tensor:
    return torch.stack([routing_row(c) for c in configs]) if configs else torch.zeros(
        0, NUM_COLUMNS)


def masked_softmax(logits: torch.Tensor, num_experts: torch.Tensor) -> torch.Tensor:
    """fp32 softmax over each token's first `num_experts` columns (adapters may have fewer
    experts than the padded width); padded columns get probability 0."""
    valid = torch.arange(logits.shape[-1], device=logits.device) < num_experts[:, None]
    return torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=-1)


def tsallis_entropy(probs: torch.Tensor, num_experts: torch.Tensor, q: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
    """Normalised Tsallis entropy S_q(p) / S_q(uniform) in [0, ~1], per token (DESIGN §1).

    S_q(p) = (1 - sum (p + eps)^q) / (q - 1) over the token's real experts; q = 1 is Shannon,
    -sum (p + eps) log(p + eps) (DynMoLE shifts both). A single-expert router has no
    uncertainty: 0.
    """
    valid = torch.arange(probs.shape[-1], device=probs.device) < num_experts[:, None]
    q, eps, n = q[:, None], eps[:, None], num_experts.float()
    shifted = probs + eps
    is_shannon = (q - 1.0).abs() < 1e-6
    safe_q = torch.where(is_shannon, torch.full_like(q, 2.0), q)
    terms = torch.where(is_shannon, -shifted * torch.log(shifted), shifted.pow(safe_q))
    total = torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)
    q1 = q[:, 0]
    entropy = torch.where(is_shannon[:, 0], total, (1.0 - total) / (safe_q[:, 0] - 1.0))
    max_entropy = torch.where(is_shannon[:, 0], torch.log(n),
                              (1.0 - n.pow(1.0 - q1)) / (safe_q[:, 0] - 1.0))
    return torch.where(n > 1, entropy / max_entropy.clamp_min(1e-12), torch.zeros_like(entropy))


def selection_mask(probs: torch.Tensor, params: torch.Tensor,
                   strategies: Collection[int] | None = None) -> tuple[torch.Tensor, ...]:
    """Sort each token's probabilities and decide which sorted positions it keeps.

    `strategies`: the strategy codes the rows use, when the caller knows them on the host (a
    compact step's slots), so only those selections are computed (DynMoLE's entropy only
    for DynMoLE rows); the rows' results equal those of None (any strategy) bit for bit.
    Rows of other strategies get meaningless weights: only rows whose slot holds no adapter
    there, which every caller masks.
    Returns (sorted probabilities, sorted expert ids, keep mask, weights in sorted order).
    """
    codes = sorted(STRATEGY_CODE.values() if strategies is None else set(strategies))
    if not codes:
        raise ValueError("selection_mask: an empty set of routing strategies")
    strategy = params[:, STRATEGY].round().long()
    num_experts = params[:, NUM_EXPERTS].round().long()
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    scaled = probs
    if DYNAMIC_CODE in codes:  # mixlora-dynamic divides the probabilities by the temperature
        temperature = params[:, TEMPERATURE:TEMPERATURE + 1]
        scaled = torch.where((strategy[:, None] == DYNAMIC_CODE) & (temperature > 0),
                             probs / temperature.clamp_min(1e-30), probs)
    sorted_p, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)
    cumulative = sorted_p.cumsum(-1)
    top_p = params[:, TOP_P:TOP_P + 1]
    keep = None
    for code in codes:
        if code == TOP_K_CODE:
            kept = rank < params[:, TOP_K:TOP_K + 1].round()
        elif code == DYNAMIC_CODE:
            # Up to and including the expert whose cumulative prob crosses top_p. The sum
            # before each position is the previous running sum, as MoE-PEFT compares it; the
            # difference cumulative - p rounds differently and moves the cut-off when a
            # running sum meets top_p exactly.
            kept = F.pad(cumulative[:, :-1], (1, 0)) <= top_p
        elif code == SWITCH_CODE:
            kept = rank < 1
        elif code == DYNMOLE_CODE:
            # dynmole keeps while the cumulative prob stays <= top_p (crossing expert
            # excluded), at least keep_top_k, and every expert when the normalised entropy
            # is above the threshold.
            entropy = tsallis_entropy(probs, num_experts, params[:, ENTROPY_INDEX],
                                      params[:, ENTROPY_EPS])
            broadcast = (entropy > params[:, ENTROPY_THRESHOLD])[:, None]
            kept = (cumulative <= top_p) | (rank < params[:, KEEP_TOP_K:KEEP_TOP_K + 1].round()) \
                | broadcast
        else:
            raise ValueError(f"unknown routing strategy code {code}")
        kept = kept.expand_as(sorted_p)
        keep = kept if len(codes) == 1 else torch.where(
            (strategy == code)[:, None], kept, False if keep is None else keep)
    keep = keep & (rank < num_experts[:, None])
    weights = sorted_p * keep
    if codes == [TOP_K_CODE]:
        weights = weights / weights.sum(-1, keepdim=True)
    elif TOP_K_CODE in codes:  # top-k renormalises over the kept experts
        weights = torch.where((strategy == TOP_K_CODE)[:, None],
                              weights / weights.sum(-1, keepdim=True), weights)
    return sorted_p, sorted_ids, keep, weights


def route(router_logits: torch.Tensor, params: torch.Tensor, k_max: int,
          strategies: Collection[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: `router_logits` [T, E_max], `params` [T, NUM_COLUMNS] (each token's
    adapter row; `strategies`: see `selection_mask`). Returns fp32 weights [T, k_max] (0 for
    unused slots) and int64 expert ids [T, k_max] (by descending probability)."""
    probs = masked_softmax(router_logits, params[:, NUM_EXPERTS].round().long())
    _, sorted_ids, _, weights = selection_mask(probs, params, strategies)
    return weights[:, :k_max].contiguous(), sorted_ids[:, :k_max].contiguous()


def route_config(router_logits: torch.Tensor, config: MoleConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-adapter convenience: every token routed with `config`."""
    params = routing_row(config).to(router_logits.device).expand(router_logits.shape[0], -1)
    return route(router_logits, params, config.max_experts_per_token,
                 [STRATEGY_CODE[config.routing_strategy]])


# -- losses ----------------------------------------------------------------------------------
def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return values.mean(0)
    w = token_mask.reshape(-1, 1).to(values.dtype)
    return (values * w).sum(0) / w.sum().clamp_min(1.0)


def load_balance_loss(router_logits: torch.Tensor, config: MoleConfig,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance `E * sum_e f_e P_e` (no coefficient) over [N, E] router logits
    (all layers concatenated). f_e: share of tokens that selected e (MixLoRA; sums to k),
    or the mean kept routing weight (DynMoLE's soft load). P_e: mean router probability."""
    params = routing_row(config).to(router_logits.device).expand(router_logits.shape[0], -1)
    probs = masked_softmax(router_logits, params[:, NUM_EXPERTS].long())
    _, sorted_ids, keep, weights = selection_mask(
        probs, params, [STRATEGY_CODE[config.routing_strategy]])
    if config.routing_strategy == DYNMOLE:
        load = torch.zeros_like(probs).scatter(-1, sorted_ids, weights)
    else:
        load = torch.zeros_like(probs).scatter(-1, sorted_ids, keep.to(probs.dtype))
    f = _masked_mean(load, token_mask)
    p = _masked_mean(probs, token_mask)
    return config.num_experts * (f * p).sum()


def entropy_loss(router_logits: torch.Tensor, config: MoleConfig,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised Tsallis entropy of the router distributions (DynMoLE's term)."""
    params = routing_row(config).to(router_logits.device).expand(router_logits.shape[0], -1)
    probs = masked_softmax(router_logits, params[:, NUM_EXPERTS].long())
    entropy = tsallis_entropy(probs, params[:, NUM_EXPERTS].long(), params[:, ENTROPY_INDEX],
                              params[:, ENTROPY_EPS])
    return _masked_mean(entropy[:, None], token_mask)[0]


def z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch router z-loss: mean squared logsumexp of the logits."""
    return _masked_mean(torch.logsumexp(router_logits.float(), -1).pow(2)[:, None], token_mask)[0]


def router_loss(router_logits: torch.Tensor, config: MoleConfig,
                token_mask: torch.Tensor | None = None, *, balance_coef: float = 0.001,
                entropy_coef: float = 0.01, z_coef: float = 0.001) -> torch.Tensor:
    """The auxiliary loss MoE-PEFT / DynMoLE add for one adapter (defaults of their code).
    Over the tokens of `token_mask` only: the peers' dynamic, switch and entropy terms also
    average over padding, which would pull the router towards what padding routes to."""
    loss = balance_coef * load_balance_loss(router_logits, config, token_mask)
    if config.routing_strategy == DYNMOLE:
        loss = loss + entropy_coef * entropy_loss(router_logits, config, token_mask)
    if config.routing_strategy == MIXLORA_SWITCH:
        loss = loss + z_coef * z_loss(router_logits, token_mask)
    return loss

