"""Routing on hand-checked cases: each strategy's selection rule and weights, DynMoLE's
entropy broadcast, its keep_top_k floor and its crossing-expert rule (opposite to
mixlora-dynamic), padded experts, and the auxiliary losses."""

import itertools
import math

import pytest
import torch

from mole_serve.config import MoleConfig
from mole_serve.routing import (NUM_EXPERTS, STRATEGY_CODE, TOP_P, entropy_loss,
                                load_balance_loss, route, route_config, routing_row, router_loss,
                                tsallis_entropy)

FFN = ("gate_proj", "up_proj", "down_proj")


def cfg(strategy: str, experts: int, **kw) -> MoleConfig:
    return MoleConfig(strategy, num_experts=experts, r=4, lora_alpha=8, target_modules=FFN, **kw)


def logits_of(*probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def dense(weights: torch.Tensor, ids: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(weights.shape[0], experts).scatter_add(-1, ids, weights)


def check(config: MoleConfig, probs: list[float], expected: list[float]):
    weights, ids = route_config(logits_of(probs), config)
    assert weights.shape == (1, config.max_experts_per_token)
    torch.testing.assert_close(dense(weights, ids, len(probs))[0], torch.tensor(expected),
                               atol=1e-6, rtol=1e-5)


def test_top_k_renormalises_the_selected_probabilities():
    check(cfg("mixlora", 3, top_k=2), [0.1, 0.6, 0.3], [0.0, 0.6 / 0.9, 0.3 / 0.9])
    check(cfg("mixlora", 3, top_k=1), [0.1, 0.6, 0.3], [0.0, 1.0, 0.0])
    check(cfg("mixlora", 3, top_k=3), [0.1, 0.6, 0.3], [0.1, 0.6, 0.3])


def test_switch_keeps_the_argmax_with_its_raw_probability():
    check(cfg("mixlora-switch", 3), [0.2, 0.7, 0.1], [0.0, 0.7, 0.0])


def test_dynamic_top_p_includes_the_crossing_expert_with_raw_weights():
    # cumulative 0.5, 0.75, 0.9 (crosses 0.8: kept), 1.0 (dropped)
    check(cfg("mixlora-dynamic", 4, top_p=0.8), [0.25, 0.5, 0.1, 0.15], [0.25, 0.5, 0.0, 0.15])
    # the top expert alone already crosses top_p: exactly one expert
    check(cfg("mixlora-dynamic", 3, top_p=0.8), [0.05, 0.9, 0.05], [0.0, 0.9, 0.0])


def moe_peft_dynamic_count(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Experts MoE-PEFT's `_dynamic_top_p` keeps, computed its way: drop those whose running
    sum exceeds top_p, except the first of them."""
    over = probs.sort(-1, descending=True).values.cumsum(-1) > top_p[:, None]
    first = torch.nn.functional.one_hot(over.long().argmax(-1), probs.shape[-1]).bool()
    return (~(over & ~first)).sum(-1)


def test_dynamic_top_p_cut_off_is_moe_peft_s_where_a_running_sum_meets_top_p():
    """top_p set to a token's own running sums (and the floats either side): the boundary a
    re-derived sum (cumulative - p) rounds across."""
    torch.manual_seed(0)
    logits = torch.randn(4000, 8) * 2
    probs = torch.softmax(logits, -1)
    running = probs.sort(-1, descending=True).values.cumsum(-1)
    params = routing_row(cfg("mixlora-dynamic", 8, top_p=0.5)).expand(len(logits), -1).clone()
    for position in range(7):
        exact = running[:, position]
        for top_p in (exact, exact.nextafter(torch.zeros(())), exact.nextafter(torch.ones(()))):
            params[:, TOP_P] = top_p.clamp(max=1.0)
            weights, _ = route(logits, params, 8)
            assert torch.equal((weights > 0).sum(-1), moe_peft_dynamic_count(probs, top_p))


def test_dynamic_temperature_divides_probabilities_not_logits():
    # p / 2 sums to 0.5 < top_p: every expert stays, with weight p / 2 (MoE-PEFT's rule)
    check(cfg("mixlora-dynamic", 4, top_p=0.8, temperature=2.0), [0.25, 0.5, 0.1, 0.15],
          [0.125, 0.25, 0.05, 0.075])


def test_dynmole_excludes_the_crossing_expert():
    # cumulative 0.4, 0.7, 0.9: the third crosses 0.75 and is dropped (mixlora-dynamic keeps it)
    probs = [0.4, 0.3, 0.2, 0.05, 0.03, 0.02]
    config = cfg("dynmole", 6, top_p=0.75, keep_top_k=1)
    assert normalised_entropy(probs, 1.1, 1e-5) < 0.9
    check(config, probs, [0.4, 0.3, 0.0, 0.0, 0.0, 0.0])


def test_dynmole_keeps_at_least_keep_top_k():
    probs = [0.9, 0.06, 0.04]
    check(cfg("dynmole", 3, top_p=0.75, keep_top_k=2), probs, [0.9, 0.06, 0.0])
    # a floor above num_experts (DynMoLE accepts it) keeps every expert
    check(cfg("dynmole", 3, top_p=0.75, keep_top_k=5), probs, probs)


def test_dynmole_broadcasts_all_experts_above_the_entropy_threshold():
    uniform = [0.2] * 5
    assert normalised_entropy(uniform, 1.1, 1e-5) > 0.9
    check(cfg("dynmole", 5, top_p=0.75, keep_top_k=2), uniform, uniform)
    # a threshold of 1 switches the broadcast off: top-p then keeps 0.2+0.2+0.2 <= 0.75
    check(cfg("dynmole", 5, top_p=0.75, keep_top_k=2, entropy_threshold=1.0), uniform,
          [0.2, 0.2, 0.2, 0.0, 0.0])


def test_dynmole_threshold_of_one_switches_broadcast_off_even_above_one():
    """With q < 1 the eps-shifted entropy of a uniform router exceeds 1; DynMoLE still does
    not broadcast at threshold 1 (its bypass), so neither do we."""
    uniform = [0.2] * 5
    assert normalised_entropy(uniform, 0.5, 1e-5) > 1.0
    check(cfg("dynmole", 5, top_p=0.75, keep_top_k=2, entropy_threshold=1.0, entropy_index=0.5),
          uniform, [0.2, 0.2, 0.2, 0.0, 0.0])


def normalised_entropy(probs: list[float], q: float, eps: float) -> float:
    """DESIGN §1 by hand: S_q(p + eps) / S_q_max."""
    n = len(probs)
    s = (1 - sum((p + eps) ** q for p in probs)) / (q - 1)
    return s / ((1 - n ** (1 - q)) / (q - 1))


@pytest.mark.parametrize("probs", [[0.5, 0.5], [0.7, 0.2, 0.1], [0.25] * 4, [1.0, 0.0, 0.0]])
@pytest.mark.parametrize("q", [1.1, 1.5, 2.0])
def test_tsallis_entropy_matches_the_formula(probs, q):
    p = torch.tensor([probs])
    got = tsallis_entropy(p, torch.tensor([len(probs)]), torch.tensor([q]), torch.tensor([1e-5]))
    assert got.item() == pytest.approx(normalised_entropy(probs, q, 1e-5), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_tsallis_q1_is_normalised_shannon_of_the_shifted_probabilities(eps):
    """DynMoLE's q = 1: -sum (p + eps) log(p + eps) / log n."""
    p = torch.tensor([[0.7, 0.2, 0.1]])
    got = tsallis_entropy(p, torch.tensor([3]), torch.tensor([1.0]), torch.tensor([eps]))
    shannon = -sum((x + eps) * math.log(x + eps) for x in (0.7, 0.2, 0.1)) / math.log(3)
    assert got.item() == pytest.approx(shannon, rel=1e-6)


def test_padded_experts_never_receive_weight():
    """An adapter with 3 experts in a 4-wide stack: column 3 is padding, whatever its logit."""
    config = cfg("mixlora-dynamic", 3, top_p=0.99)
    params = routing_row(config)[None].expand(1, -1).clone()
    logits = torch.tensor([[0.0, 1.0, 2.0, 50.0]])
    weights, ids = route(logits, params, 4)
    assert dense(weights, ids, 4)[0, 3] == 0
    assert params[0, NUM_EXPERTS] == 3
    torch.testing.assert_close(weights.sum(), torch.softmax(logits[0, :3], -1).sum())


def test_mixed_strategies_in_one_call_equal_each_alone():
    torch.manual_seed(0)
    configs = [cfg("mixlora", 6, top_k=2), cfg("mixlora-dynamic", 6), cfg("mixlora-switch", 6),
               cfg("dynmole", 6, keep_top_k=2)]
    logits = torch.randn(40, 6) * 2
    which = torch.arange(40) % 4
    params = torch.stack([routing_row(c) for c in configs])[which]
    weights, ids = route(logits, params, 6)
    for i, config in enumerate(configs):
        rows = which == i
        w, e = route_config(logits[rows], config)
        torch.testing.assert_close(dense(weights[rows], ids[rows], 6), dense(w, e, 6))


STRATEGY_SUBSETS = [codes for n in range(1, 5) for codes in itertools.combinations(range(4), n)]


@pytest.mark.parametrize("codes", STRATEGY_SUBSETS, ids=str)
def test_routing_told_the_strategies_in_use_equals_routing_told_nothing(codes):
    """A compact step tells `route` which strategies its rows use, and only those selections
    are computed: every row's weights and ids must be the general routing's, bit for bit.
    Padded expert columns, a mixlora-dynamic temperature, DynMoLE rows above and below the
    entropy threshold (logits from flat to peaked)."""
    torch.manual_seed(sum(codes))
    configs = [cfg("mixlora", 5, top_k=2), cfg("mixlora-dynamic", 5, top_p=0.7, temperature=0.8),
               cfg("mixlora-switch", 5), cfg("dynmole", 5, keep_top_k=1, entropy_threshold=0.95)]
    assert [STRATEGY_CODE[c.routing_strategy] for c in configs] == [0, 1, 2, 3]
    rows = 64
    logits = torch.randn(rows, 6) * torch.linspace(0.05, 4.0, rows)[:, None]
    params = torch.stack([routing_row(configs[c]) for c in codes])[torch.arange(rows) % len(codes)]
    expected = route(logits, params, 6)
    told = route(logits, params, 6, codes)
    assert torch.equal(told[0], expected[0]) and torch.equal(told[1], expected[1])
    if 3 in codes:  # both sides of DynMoLE's broadcast were exercised
        kept = (expected[0] > 0).sum(-1)[params[:, 0] == 3]
        assert kept.max() == 5 and kept.min() < 5


def test_load_balance_loss_by_hand():
    logits = logits_of([0.8, 0.2], [0.3, 0.7], [0.6, 0.4])
    config = cfg("mixlora", 2, top_k=1)
    # f = [2/3, 1/3], P = [1.7/3, 1.3/3]: E * sum f P
    expected = 2 * (2 / 3 * 1.7 / 3 + 1 / 3 * 1.3 / 3)
    assert load_balance_loss(logits, config).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([1, 1, 0])
    assert load_balance_loss(logits, config, mask).item() == pytest.approx(1.0, rel=1e-5)
    assert router_loss(logits, config).item() == pytest.approx(0.001 * expected, rel=1e-5)


def test_dynmole_losses_use_soft_load_and_entropy():
    rows = [[0.9, 0.06, 0.04], [0.12, 0.8, 0.08]]
    assert all(normalised_entropy(r, 1.1, 1e-5) < 0.9 for r in rows)  # no broadcast
    logits = logits_of(*rows)
    config = cfg("dynmole", 3, top_p=0.75, keep_top_k=2)
    # both tokens keep their top two (keep_top_k floor): soft load f = mean kept weight
    f = torch.tensor([(0.9 + 0.12) / 2, (0.06 + 0.8) / 2, 0.0])
    p = torch.tensor([(0.9 + 0.12) / 2, (0.06 + 0.8) / 2, (0.04 + 0.08) / 2])
    balance = 3 * (f * p).sum().item()
    assert load_balance_loss(logits, config).item() == pytest.approx(balance, rel=1e-5)
    ent = sum(normalised_entropy(r, 1.1, 1e-5) for r in rows) / 2
    assert entropy_loss(logits, config).item() == pytest.approx(ent, rel=1e-5)
    total = router_loss(logits, config).item()
    assert total == pytest.approx(0.001 * balance + 0.01 * ent, rel=1e-5)
