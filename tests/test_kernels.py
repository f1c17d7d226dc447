"""Triton kernels vs the reference math (`mole_serve.reference`), under the interpreter on CPU.

Why each test exists:
- test_plan_*: every kernel trusts the token plan; each token must sit in exactly one block
  of its own slot, and the static block count must bound the real one.
- test_route_*: routing is the part most likely to differ silently (sort ties, cumulative
  sums, entropy); ids and weights must match the reference for every strategy, top-k from 1
  to E, dynamic k, temperature and the DynMoLE entropy broadcast, with adapters of different
  expert counts padded into one stack; exact ties select as many experts, equally weighted.
- test_ffn_*: the whole MixLoRA/DynMoLE FFN on the kernels vs `reference.mole_ffn` for 1..8
  slots mixed with base tokens and empty slots, T from 0 to 200 (slots spanning several
  blocks), ranks padded to one max rank, every activation; base-model rows must be
  bit-identical to the frozen FFN, and so must a batch without adapter tokens. One test runs
  the three launches one by one.
- test_projection_*, test_plain_lora_*: per-linear gated LoRA (DynMoLE) and plain LoRA (MixLoRA's
  attention adapters, PEFT LoRA adapters) through the same two kernels.
- test_row_parallel_*: tensor parallelism splits a row-parallel router's input; ranks route
  from the sum of their partial logits and their partial deltas add up.
- test_launch_budget: at most 3 launches per MixLoRA or DynMoLE FFN beyond the frozen FFN
  (DESIGN §5).
- test_dynmole_ffn_pieces_*: DynMoLE's FFN adds its gate/up deltas inside the intermediate
  and routes down from partial sums over it; each launch against the reference pieces, for
  adapters that route only some of gate, up and down.
- test_route_lanes_*: at decode sizes the route spreads a block's experts over programs; that
  must not change a single bit of what it writes.
- test_small_tiles_*: the default interpreter tiles cover the test sizes in one tile, so one
  run forces small tiles to exercise every tile loop, several intermediate splits (the
  down-shrink partial sums), several output splits and route lanes.
- test_bf16_*: the serving dtype; base rows still bit-identical, adapter rows within bf16
  tolerance.
Every kernel output and intermediate is poisoned: `torch.empty` is NaN-filled (deterministic
mode), and adapter rows of the intermediate are set to NaN before the experts kernel, so an
unwritten or wrongly-read element fails the comparison. fp32 bound: max|err| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import rel_err, take
from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.config import ACTIVATIONS, MoleConfig
from mole_serve.kernels import (as_gated, gated_lora_, mixlora_down_delta_, mixlora_experts_,
                                mixlora_route, mole_ffn_kernels, mole_projection_kernels,
                                plan_tokens)
from mole_serve.kernels import configs as kernel_configs
from mole_serve.kernels.plan import BASE_BLOCK, EMPTY_BLOCK, max_blocks
from mole_serve.reference import (FrozenFFN, gated_lora_delta, mixlora_down_delta,
                                  mixlora_experts, mole_ffn, mole_projection, router_logits)
from mole_serve.reference import mixlora_route as reference_mixlora_route
from mole_serve.routing import route as reference_route
from mole_serve.stack import LayerStack, stack_layer

BASE = BaseShape(hidden=96, intermediate=200, num_layers=1, num_heads=3, num_kv_heads=1,
                 head_dim=32)
H, I = BASE.hidden, BASE.intermediate
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
TOLERANCE = 1e-4
# Inputs are made on the CPU (seeded) and moved: on a GPU machine the kernels run for real.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_uninitialised_memory():
    """With deterministic algorithms on, torch.empty fills floats with NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS would refuse otherwise
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def mixlora(strategy: str, experts: int, rank: int, **routing) -> MoleConfig:
    return MoleConfig(strategy, experts, rank, 2 * rank, ("q_proj", "o_proj") + FFN,
                      **routing)


def dynmole(experts: int, rank: int, target_modules=("q_proj", "v_proj") + FFN,
            **routing) -> MoleConfig:
    return MoleConfig("dynmole", experts, rank, 2 * rank, target_modules, **routing)


# Every strategy and the knobs that change k: top-k 1..E, top-p with and without
# temperature, switch, DynMoLE with a low entropy threshold (broadcast to all experts), and
# the plain LoRA a MoLE server also serves.
ZOO = [
    mixlora("mixlora", 8, 16, top_k=2),
    mixlora("mixlora", 4, 8, top_k=1, use_rslora=True),
    mixlora("mixlora-dynamic", 5, 6, top_p=0.8),
    mixlora("mixlora-switch", 4, 8),
    dynmole(6, 5, top_p=0.75, keep_top_k=2, entropy_threshold=0.9),
    mixlora("mixlora", 8, 4, top_k=8),
    mixlora("mixlora-dynamic", 6, 12, top_p=0.6, temperature=0.7),
    dynmole(4, 8, top_p=0.5, keep_top_k=1, entropy_threshold=0.6),
    MoleConfig("lora", 1, 8, 16, ATTN + FFN),  # plain PEFT LoRA: one expert, weight 1
]


# Several tiles and splits along every dim, and route lanes that do not divide the experts.
SMALL_TILES = kernel_configs.Tiles(kernel_configs.RouteTiles(block_h=32, lanes=3, num_warps=4),
                                   kernel_configs.ExpertsTiles(block_i=32, num_warps=4),
                                   kernel_configs.ExpandTiles(block_n=32, split_n=2, num_warps=4))


def use_tiles(monkeypatch, tiles) -> None:
    """Every kernel op runs with `tiles`, on the interpreter and on a GPU alike."""
    from mole_serve.kernels import ops
    monkeypatch.setattr(ops, "pick_tiles",
                        lambda num_tokens, kernel, experts, width: getattr(tiles, kernel))


def make_adapters(configs: list[MoleConfig | None], seed: int):
    g = torch.Generator().manual_seed(seed)
    return [None if c is None else init_adapter(c, BASE, f"a{i}", generator=g, b_std=0.05,
                                                router_std=0.15)
            for i, c in enumerate(configs)]


def make_stack(configs: list[MoleConfig | None], seed: int, dtype=None) -> LayerStack:
    return stack_layer(make_adapters(configs, seed), 0, BASE).to(DEVICE, dtype)


def frozen(seed: int, dtype=torch.float32) -> FrozenFFN:
    g = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(DEVICE, dtype)

    return FrozenFFN(weight(I, H), weight(I, H), weight(H, I))


def tokens(num: int, num_slots: int, seed: int, dtype=torch.float32, width: int = H):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, width, generator=g).to(DEVICE, dtype)
    slots = torch.randint(-1, num_slots, (num,), generator=g).to(DEVICE)
    return x, slots


# -- plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens,num_slots,block_m", [(1, 1, 16), (37, 5, 16),
                                                          (200, 8, 64), (5, 32, 32)])
def test_plan_puts_each_token_once_in_a_block_of_its_slot(num_tokens, num_slots, block_m):
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=torch.Generator()
                          .manual_seed(num_tokens))
    plan = plan_tokens(slots.to(DEVICE), num_slots, block_m)
    assert plan.num_blocks == max_blocks(num_tokens, num_slots, block_m)
    rows = plan.sorted_tokens.cpu().view(plan.num_blocks, block_m).long()
    placed = rows[rows >= 0]
    assert torch.equal(placed.sort().values, torch.arange(num_tokens))
    for block, slot in enumerate(plan.block_slot.cpu().tolist()):
        members = rows[block][rows[block] >= 0]
        if slot == EMPTY_BLOCK:
            assert members.numel() == 0
        else:
            expected = -1 if slot == BASE_BLOCK else slot
            assert members.numel() > 0 and (slots[members] == expected).all()
            assert torch.equal(members, members.sort().values), "stable within a slot"


def test_plan_block_bound_is_tight():
    """Each group one token past whole blocks (and base tokens too): every static block is
    used, none is missing."""
    block_m, counts = 4, [5, 1, 9]                   # slots 0..2; then 1 base token
    slots = torch.tensor(sum(([s] * n for s, n in enumerate(counts)), []) + [-1])
    slots = slots[torch.randperm(slots.numel(), generator=torch.Generator().manual_seed(0))]
    plan = plan_tokens(slots.to(DEVICE), len(counts), block_m)
    assert plan.num_blocks == 2 + 1 + 3 + 1
    assert (plan.block_slot.cpu() != EMPTY_BLOCK).all()
    placed = plan.sorted_tokens.cpu()
    assert torch.equal(placed[placed >= 0].sort().values, torch.arange(slots.numel()))


# -- routing ---------------------------------------------------------------------------------
def assert_same_routing(got, ref_weights, ref_ids, uses):
    """Same experts and weights on routed tokens; zero weights on the others."""
    assert (got.weights[~uses] == 0).all()
    used = ref_weights[uses] > 0
    assert torch.equal(got.weights[uses] > 0, used)
    assert torch.equal(got.ids.long()[uses][used], ref_ids[uses][used])
    assert (got.weights[uses] - ref_weights[uses]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", ["top-k 1..E", "dynamic", "switch"])
def test_route_matches_reference_mixlora_family(family):
    configs = {
        "top-k 1..E": [mixlora("mixlora", 8, 8, top_k=k) for k in range(1, 9)]
        + [mixlora("mixlora", 3, 4, top_k=3)],
        "dynamic": [mixlora("mixlora-dynamic", 8, 8, top_p=p, temperature=t)
                    for p, t in [(0.8, 0.0), (0.5, 0.0), (0.95, 0.0), (0.7, 0.9), (1.0, 0.0)]]
        + [mixlora("mixlora-dynamic", 3, 4, top_p=0.6)],
        "switch": [mixlora("mixlora-switch", e, 8) for e in (2, 4, 8)],
    }[family]
    stack = make_stack(configs + [None], seed=1).ffn
    x, slots = tokens(150, len(configs) + 1, seed=2)
    plan = plan_tokens(slots, len(configs) + 1, kernel_configs.BLOCK_M)
    got = mixlora_route(x, plan, stack)
    ref_weights, ref_ids, uses = reference_mixlora_route(x, slots, stack)
    assert_same_routing(got, ref_weights, ref_ids, uses)
    if family == "dynamic":
        experts_per_token = (got.weights > 0).sum(1)[uses]
        assert experts_per_token.unique().numel() >= 3, "the case must cover dynamic k"
    shrink_ref = torch.einsum("th,tkrh->tkr", x, stack.gate_up_a[slots.clamp(min=0)[:, None],
                                                                got.ids.long()])
    used = got.weights > 0
    assert rel_err(got.shrink[used], shrink_ref[used]) <= TOLERANCE


@pytest.mark.parametrize("config", [
    mixlora("mixlora", 8, 4, top_k=3), mixlora("mixlora-dynamic", 8, 4, top_p=0.5),
    mixlora("mixlora-dynamic", 8, 4, top_p=0.6), mixlora("mixlora-switch", 8, 4),
    dynmole(8, 4, top_p=0.5, keep_top_k=2, entropy_threshold=0.9),
    dynmole(8, 4, top_p=0.5, keep_top_k=2, entropy_threshold=1.0, entropy_index=0.5)],
    ids=["top-3", "top-p-0.5", "top-p-0.6", "switch", "dynmole-broadcast",
         "dynmole-broadcast-off"])
def test_route_exact_ties_select_as_many_experts_with_the_same_weights(config):
    """A zero router gives every expert probability exactly 1/8 (sums exact in fp32): which
    tied experts win is the implementation's choice (torch.topk's too), but how many and
    their weights are not, whatever order the kernel sums in."""
    stack = make_stack([config], seed=29)
    x, slots = tokens(40, 1, seed=29)
    plan = plan_tokens(slots, 1, kernel_configs.BLOCK_M)
    if config.has_ffn_experts:
        stack.ffn.router.zero_()
        got = mixlora_route(x, plan, stack.ffn)
        ref_weights, _, uses = reference_mixlora_route(x, slots, stack.ffn)
    else:
        gated = stack.gated["q_proj"]
        gated.router.zero_()
        y = torch.zeros(x.shape[0], BASE.in_out("q_proj")[1], device=DEVICE)
        got = gated_lora_(y, x, plan, gated)
        ref_weights, _ = reference_route(torch.zeros(x.shape[0], gated.router.shape[1],
                                                     device=DEVICE),
                                         gated.routing[slots.clamp(min=0)], gated.k_max)
        uses = slots >= 0
    assert uses.any()
    ours, theirs = got.weights[uses], ref_weights[uses]
    assert torch.equal((ours > 0).sum(1), (theirs > 0).sum(1))
    if config.entropy_threshold == 1.0:  # entropy above 1 (q < 1), no broadcast: top-p's 4
        assert ((ours > 0).sum(1) == 4).all()
    torch.testing.assert_close(ours.sort(1).values, theirs.sort(1).values, rtol=0, atol=1e-6)
    chosen = got.ids.long()[uses][ours > 0].view(int(uses.sum()), -1)
    assert (chosen.sort(1).values.diff(dim=1) > 0).all(), "an expert chosen twice"


def test_route_reads_strided_inputs():
    """x may be a column slice of a wider activation (vLLM hands views around)."""
    stack = make_stack([ZOO[0], ZOO[2]], seed=31).ffn
    wide, slots = tokens(30, 2, seed=31, width=2 * H)
    x = wide[:, :H]
    plan = plan_tokens(slots, 2, kernel_configs.BLOCK_M)
    got, want = mixlora_route(x, plan, stack), mixlora_route(x.contiguous(), plan, stack)
    for a, b in zip((got.ids, got.weights, got.shrink), (want.ids, want.weights, want.shrink)):
        assert torch.equal(a, b)


def test_route_matches_reference_dynmole_with_entropy_broadcast():
    configs = [dynmole(6, 5, top_p=0.75, keep_top_k=2, entropy_threshold=0.9),
               dynmole(8, 8, top_p=0.5, keep_top_k=1, entropy_threshold=0.6),
               dynmole(4, 4, top_p=0.9, keep_top_k=3, entropy_threshold=0.95,
                       entropy_index=1.0),
               # a floor above the slot's 3 experts (padded to 8): every expert, as DynMoLE
               dynmole(3, 4, top_p=0.3, keep_top_k=5, entropy_threshold=0.99)]
    stack = make_stack(configs, seed=3).gated["q_proj"]
    x, slots = tokens(120, len(configs), seed=4)
    plan = plan_tokens(slots, len(configs), kernel_configs.BLOCK_M)
    y = torch.zeros(x.shape[0], BASE.in_out("q_proj")[1], device=DEVICE)
    got = gated_lora_(y, x, plan, stack)
    slot = slots.clamp(min=0)
    logits = torch.einsum("th,teh->te", x, stack.router[slot])
    ref_weights, ref_ids = reference_route(logits, stack.routing[slot], stack.k_max)
    uses = slots >= 0
    assert_same_routing(got, ref_weights, ref_ids, uses)
    per_token = (got.weights > 0).sum(1)
    everything = per_token == stack.routing[slot, 1].long()
    assert (everything & uses).any() and (~everything & uses).any(), "broadcast and not"
    assert everything[slots == 3].all() and (slots == 3).any()


def counter_pair(num_slots: int, experts: int, router: str):
    """Routing counters of one router for the kernels and for the reference
    (`RoutingStats.record`), both reporting every slot (empty ones included)."""
    from mole_serve.routing_stats import RoutingStats
    pair = [RoutingStats(num_slots, experts, 0, (router,)).to(DEVICE) for _ in range(2)]
    for stats in pair:
        stats.routed_slots[0].update(range(num_slots))
    return pair


def take_equal_counts(kernel_stats, reference_stats, router: str):
    """What both counters added since their last take, the integer counts checked equal."""
    got, want = take(kernel_stats)[router], take(reference_stats)[router]
    for key in ("selections", "experts_per_token", "entropy_buckets"):
        assert torch.equal(got[key], want[key]), key
    return got, want


def test_route_counts_the_routing_metrics_the_reference_counts():
    """With metrics on, the route kernel adds each block's routing to the per-slot counters
    (selections, experts kept, entropy buckets, entropy sum): the same counts as
    `RoutingStats.record` (the reference backend's counter) for every strategy, twice over
    (counters accumulate), nothing for base tokens and empty slots."""
    from mole_serve.kernels import RoutingCounts
    configs = [c for c in ZOO if c.has_ffn_experts] + [None]
    stack = make_stack(configs, seed=5).ffn
    x, slots = tokens(130, len(configs), seed=6)
    plan = plan_tokens(slots, len(configs), kernel_configs.BLOCK_M)
    kernel_stats, reference_stats = counter_pair(len(configs), stack.router.shape[1], "ffn")
    for _ in range(2):
        mixlora_route(x, plan, stack, RoutingCounts(kernel_stats.counts,
                                                    kernel_stats.entropy_bounds))
        reference_stats.record(router_logits(x, slots, stack.router), slots, stack)
    got, want = take_equal_counts(kernel_stats, reference_stats, "ffn")
    torch.testing.assert_close(got["entropy_sum"], want["entropy_sum"], rtol=1e-5, atol=1e-6)
    assert got["experts_per_token"][:-1].sum() == 2 * (slots >= 0).sum().item() - 2 * (
        slots == len(configs) - 1).sum().item()
    assert not got["experts_per_token"][-1].any(), "the empty slot counts nothing"


@pytest.mark.parametrize("lanes", [2, 3, 16])
def test_route_lanes_change_nothing(lanes, monkeypatch):
    """Lanes spread a block's selected experts over programs (for decode-size batches): ids,
    weights, shrinks, metrics counts and the gated LoRA output, also routed from given logits
    (tensor parallelism), equal the one-lane route's bit for bit, for every strategy, with
    lane counts that do not divide the experts and more lanes than experts."""
    from mole_serve.kernels import RoutingCounts
    from mole_serve.kernels import router_logits as kernel_router_logits
    from mole_serve.routing_stats import RoutingStats
    from mole_serve.stack import GroupedLoRAStack
    configs = ZOO + [None]
    stack = make_stack(configs, seed=7)
    x, slots = tokens(70, len(configs), seed=7)
    plan = plan_tokens(slots, len(configs), kernel_configs.BLOCK_M)
    y0 = torch.randn(70, BASE.in_out("q_proj")[1], generator=torch.Generator().manual_seed(7))

    def run(route_lanes: int):
        use_tiles(monkeypatch, dataclasses.replace(
            SMALL_TILES, route=dataclasses.replace(SMALL_TILES.route, lanes=route_lanes)))
        stats = RoutingStats(len(configs), stack.ffn.router.shape[1], 0, ("ffn",)).to(DEVICE)
        mixed = mixlora_route(x, plan, stack.ffn, RoutingCounts(stats.counts,
                                                                stats.entropy_bounds))
        y, y_given = y0.to(DEVICE), y0.to(DEVICE)
        gated = gated_lora_(y, x, plan, stack.gated["q_proj"])
        logits = kernel_router_logits(x, plan, GroupedLoRAStack.of([stack.gated["q_proj"]]))
        given = gated_lora_(y_given, x, plan, stack.gated["q_proj"], logits=logits)
        return [*dataclasses.astuple(mixed), stats.counts, *dataclasses.astuple(gated), y,
                *dataclasses.astuple(given), y_given]

    one, many = run(1), run(lanes)
    assert (one[1] > 0).sum(1).max() > 2, "blocks must select several experts"
    for got, want in zip(many, one, strict=True):
        assert torch.equal(got, want)


# -- the FFN ---------------------------------------------------------------------------------
def check_ffn(configs, num_tokens: int, seed: int, dtype=torch.float32, tolerance=TOLERANCE):
    stack = make_stack(configs, seed, dtype)
    base = frozen(seed, dtype)
    x, slots = tokens(num_tokens, len(configs), seed, dtype)
    got = mole_ffn_kernels(x, base, slots, stack)
    # The reference runs in fp32 on the same (rounded) values.
    ref_stack = make_stack(configs, seed, dtype).to(dtype=torch.float32)
    ref_base = FrozenFFN(base.gate.float(), base.up.float(), base.down.float(), base.act_fn)
    ref = mole_ffn(x.float(), ref_base, slots, ref_stack)
    assert torch.isfinite(got).all()
    is_base = slots < 0
    assert torch.equal(got[is_base], base(x)[is_base]), "base rows must be bit-identical"
    assert (~is_base).any(), "the case must hold adapter tokens (pick another seed)"
    assert rel_err(got[~is_base], ref[~is_base]) <= tolerance
    return stack, x, slots, base


@pytest.mark.parametrize("num_tokens,configs", [
    (1, [ZOO[1]]),
    (5, [ZOO[0], None]),
    (33, ZOO[:3]),
    (64, ZOO[2:5] + [None]),
    (200, ZOO),
    (50, [ZOO[8], None, ZOO[0]]),
    (40, [dynmole(4, 8, top_p=0.6, target_modules=("gate_proj", "up_proj")), ZOO[2],
          dynmole(6, 4, top_p=0.7, keep_top_k=2, target_modules=("up_proj", "down_proj"))]),
], ids=["T1-one-adapter", "T5-empty-slot", "T33-3-slots", "T64-dynmole-mix", "T200-9-slots",
        "T50-plain-lora", "T40-dynmole-partial-targets"])
def test_ffn_matches_reference(num_tokens, configs):
    check_ffn(configs, num_tokens, seed=num_tokens)


@pytest.mark.parametrize("num_tokens,configs", [(150, [ZOO[0]]), (300, [ZOO[4], ZOO[2]])],
                         ids=["mixlora", "dynmole-and-mixlora"])
def test_ffn_slot_spanning_blocks_matches_reference(num_tokens, configs):
    """Prefill: a slot's tokens fill one block and part of the next."""
    _, _, slots, _ = check_ffn(configs, num_tokens, seed=num_tokens)
    assert torch.bincount(slots[slots >= 0].cpu()).min() > kernel_configs.BLOCK_M


@pytest.mark.parametrize("num_tokens", [0, 1, 9])
def test_ffn_without_adapter_tokens_is_the_frozen_ffn(num_tokens):
    stack = make_stack(ZOO[:5], seed=5)
    base = frozen(5)
    x = torch.randn(num_tokens, H, device=DEVICE)
    slots = torch.full((num_tokens,), -1, device=DEVICE)
    assert torch.equal(mole_ffn_kernels(x, base, slots, stack), base(x))


def test_ffn_pieces_match_reference_pieces():
    """The three launches one by one, with the intermediate's adapter rows poisoned."""
    stack = make_stack(ZOO[:4] + ZOO[5:7], seed=7)
    ffn, base = stack.ffn, frozen(7)
    x, slots = tokens(90, 6, seed=7)
    plan = plan_tokens(slots, 6, kernel_configs.BLOCK_M)
    g, u = x @ base.gate.T, x @ base.up.T
    routing = mixlora_route(x, plan, ffn)
    weights, ids, uses = reference_mixlora_route(x, slots, ffn)
    h = base.act(g) * u
    frozen_h = h.clone()
    h[uses] = float("nan")
    partials = mixlora_experts_(h, g, u, routing, plan, ffn)
    mixed, down_shrink = mixlora_experts(g, u, x, slots, weights, ids, ffn)
    assert rel_err(h[uses], mixed[uses]) <= TOLERANCE
    assert torch.equal(h[~uses], frozen_h[~uses])
    y = h @ base.down.T
    y_before = y.clone()
    mixlora_down_delta_(y, partials, routing, plan, ffn)
    delta = mixlora_down_delta(down_shrink, slots, weights, ids, ffn)
    assert rel_err(y[uses] - y_before[uses], delta[uses]) <= TOLERANCE
    assert torch.equal(y[~uses], y_before[~uses])


def check_added(after, before, delta, rows, dtype, tolerance):
    """after = before + delta on `rows`: relative to the delta in fp32; in bf16 relative to
    y, whose own rounding dwarfs a small delta."""
    if dtype == torch.float32:
        assert rel_err(after[rows] - before[rows], delta[rows]) <= tolerance
    else:
        assert rel_err(after[rows], before[rows].float() + delta[rows]) <= tolerance


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, TOLERANCE),
                                             (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_dynmole_ffn_pieces_match_reference_pieces(dtype, tolerance):
    """DynMoLE's three FFN launches one by one, with the intermediate's adapter rows
    poisoned: slots whose adapters route gate and up only, down only, up and down, all three,
    and a MixLoRA slot the DynMoLE kernels must leave alone. The down kernel counts the routing
    metrics of the summed logits. bf16 runs the serving dtype's loads, casts and stores (the
    interpreter truncates to bf16 where a GPU rounds to nearest, hence the bf16 bound only)."""
    from mole_serve.kernels import (RoutingCounts, dynmole_down_delta_, dynmole_gate_up,
                                    dynmole_gate_up_route, dynmole_intermediate_)
    configs = [dynmole(4, 8, top_p=0.6, target_modules=("gate_proj", "up_proj")),
               dynmole(6, 4, top_p=0.7, keep_top_k=2, target_modules=("down_proj",)),
               dynmole(5, 6, top_p=0.8, target_modules=("up_proj", "down_proj")),
               ZOO[4], ZOO[0]]
    stack, base = make_stack(configs, seed=47, dtype=dtype), frozen(47, dtype)
    x, slots = tokens(70, len(configs), seed=47, dtype=dtype)
    plan = plan_tokens(slots, len(configs), kernel_configs.BLOCK_M)
    slot = slots.clamp(min=0)
    gated = stack.gated
    rewritten = (slots >= 0) & (gated["gate_proj"].enabled | gated["up_proj"].enabled)[slot]
    down_rows = (slots >= 0) & gated["down_proj"].enabled[slot]
    assert (rewritten & ~down_rows).any() and (down_rows & ~rewritten).any()

    g0, u0 = x @ base.gate.T, x @ base.up.T
    routing = dynmole_gate_up_route(x, plan, dynmole_gate_up(stack))
    h = base.act(g0) * u0
    frozen_h = h.clone()
    h[rewritten] = float("nan")
    partials = dynmole_intermediate_(h, g0, u0, routing, plan, dynmole_gate_up(stack),
                                     gated["down_proj"])
    want_h = base.act(mole_projection(x, base.gate, slots, "gate_proj", stack)) \
        * mole_projection(x, base.up, slots, "up_proj", stack)
    check_added(h, frozen_h, want_h.float() - frozen_h.float(), rewritten, dtype, tolerance)
    assert torch.equal(h[~rewritten], frozen_h[~rewritten])
    assert rel_err(partials.logits.sum(0)[down_rows],
                   router_logits(h, slots, gated["down_proj"].router)[down_rows]) <= TOLERANCE

    stats, expected = counter_pair(len(configs), gated["down_proj"].router.shape[1], "down")
    y = h @ base.down.T
    y_before = y.clone()
    dynmole_down_delta_(y, partials, plan, gated["down_proj"],
                        RoutingCounts(stats.counts, stats.entropy_bounds))
    delta, uses = gated_lora_delta(h, slots, gated["down_proj"])
    assert torch.equal(uses, down_rows)
    check_added(y, y_before, delta, uses, dtype, tolerance)
    assert torch.equal(y[~uses], y_before[~uses])
    capped = dataclasses.replace(gated["down_proj"], k_max=2)  # as the route kernel cuts
    y_capped = y_before.clone()
    dynmole_down_delta_(y_capped, partials, plan, capped)
    delta_capped, _ = gated_lora_delta(h, slots, capped)
    check_added(y_capped, y_before, delta_capped, uses, dtype, tolerance)
    assert rel_err(delta_capped[uses], delta[uses]) > 5e-2, "the cap must bite"
    expected.record(router_logits(h, slots, gated["down_proj"].router), slots,
                    gated["down_proj"])
    got, _ = take_equal_counts(stats, expected, "down")
    assert got["selections"].sum() > 0


@pytest.mark.parametrize("act_fn", [a for a in ACTIVATIONS if a != "silu"])
def test_ffn_other_activations(act_fn):
    """Every activation a config may name: the kernels and the reference compute the same,
    on MixLoRA's experts and DynMoLE's rewritten intermediate alike."""
    stack = make_stack([ZOO[0], ZOO[2], ZOO[4]], seed=11)
    base = frozen(11)
    base.act_fn = act_fn
    x, slots = tokens(30, 3, seed=11)
    ref = mole_ffn(x, base, slots, stack)
    assert rel_err(mole_ffn_kernels(x, base, slots, stack), ref) <= TOLERANCE


def test_launch_budget(monkeypatch):
    """A MixLoRA or DynMoLE FFN costs 3 launches beyond the frozen FFN; any other routed or
    plain LoRA projection 2 (route + expand). The token plan is built once per batch,
    outside."""
    from mole_serve.kernels import ops
    launches = []

    def counted(name, launch):
        def wrapper(*args, **kwargs):
            launches.append(name)
            return launch(*args, **kwargs)
        return wrapper

    for name in ("launch_route", "launch_experts", "launch_expand", "launch_intermediate",
                 "launch_down"):
        monkeypatch.setattr(ops, name, counted(name, getattr(ops, name)))
    x, slots = tokens(10, 2, seed=3)
    plan = plan_tokens(slots, 2, kernel_configs.BLOCK_M)
    mixlora_only = make_stack([ZOO[0], ZOO[2]], seed=3)
    mole_ffn_kernels(x, frozen(3), slots, mixlora_only, plan)
    assert launches == ["launch_route", "launch_experts", "launch_expand"]
    launches.clear()
    mole_projection_kernels(x, frozen(3).gate[:H], slots, "q_proj", mixlora_only, plan)
    assert launches == ["launch_route", "launch_expand"]
    launches.clear()
    dynmole_only = make_stack([ZOO[4], ZOO[7]], seed=3)
    mole_ffn_kernels(x, frozen(3), slots, dynmole_only, plan)
    assert launches == ["launch_route", "launch_intermediate", "launch_down"]


def test_small_tiles_exercise_every_loop(monkeypatch):
    from mole_serve.kernels import expand, functional
    use_tiles(monkeypatch, SMALL_TILES)
    # I=200 in 7 tiles of 32 over 5 splits of 2 tiles: the 4th split ends past I, the 5th has
    # no tile inside I (its partials must still be zeros).
    monkeypatch.setattr(kernel_configs, "I_PER_PROGRAM", 40)
    # blocks of 16 rows: the 5 partials are summed 2 at a time (PARTIAL_ELEMENTS / (16 x 8
    # experts x rank 16)), the last load half masked
    monkeypatch.setattr(functional, "BLOCK_M", 16)
    assert expand.partials_per_load(16, 8, 16, 5) == 2
    check_ffn([ZOO[0], ZOO[4], ZOO[6]], 40, seed=13)
    _, _, slots, _ = check_ffn([ZOO[2]], 45, seed=14)  # one slot over 2+ blocks of 16
    assert (slots == 0).sum() > 16


# -- projections -----------------------------------------------------------------------------
@pytest.mark.parametrize("proj, tiles", [
    ("q_proj", "default"), ("o_proj", "default"), ("v_proj", "default"),
    ("down_proj", "default"), ("down_proj", "small")])
def test_projection_matches_reference(proj, tiles, monkeypatch):
    """Small tiles: down_proj's router and A reductions over I=200 in 32-wide tiles, the
    last one partial, over lanes and splits."""
    from mole_serve.kernels import functional
    if tiles == "small":
        use_tiles(monkeypatch, SMALL_TILES)
        monkeypatch.setattr(functional, "BLOCK_M", 16)
    stack = make_stack(ZOO, seed=17)
    fan_in, fan_out = BASE.in_out(proj)
    g = torch.Generator().manual_seed(17)
    weight = (torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5).to(DEVICE)
    x, slots = tokens(70, len(ZOO), seed=17, width=fan_in)
    got = mole_projection_kernels(x, weight, slots, proj, stack)
    ref = mole_projection(x, weight, slots, proj, stack)
    is_base, frozen_y = slots < 0, x @ weight.T
    assert torch.equal(got[is_base], frozen_y[is_base])
    # against the delta: a few % of y, whose scale would hide an error of the delta's own
    assert rel_err(got - frozen_y, ref - frozen_y) <= TOLERANCE
    assert proj in stack.lora or proj in stack.gated


@pytest.mark.parametrize("tiles", ["default", "small"])
def test_grouped_projections_match_each_alone(tiles, monkeypatch):
    """q, k and v (widths 96, 32, 32) in one route and one expand launch write their own
    columns of the fused qkv output, each what its projection alone gives; with small tiles
    a group's columns span several tiles and splits, and tiles end inside a group."""
    from mole_serve.kernels import functional
    from mole_serve.stack import GroupedLoRAStack
    if tiles == "small":
        use_tiles(monkeypatch, SMALL_TILES)
        monkeypatch.setattr(functional, "BLOCK_M", 16)
    projs = ("q_proj", "k_proj", "v_proj")
    configs = [dataclasses.replace(c, target_modules=projs) if c else None
               for c in (dynmole(6, 5, top_p=0.75, keep_top_k=2), ZOO[7], None, ZOO[4])]
    stack = make_stack(configs, seed=41)
    group = GroupedLoRAStack.of([stack.gated[p] for p in projs])
    assert group.out_sizes == (96, 32, 32)
    x, slots = tokens(45, len(configs), seed=41)
    plan = plan_tokens(slots, len(configs), functional.BLOCK_M)
    base = torch.randn(45, 160, generator=torch.Generator().manual_seed(41)).to(DEVICE)
    y = base.clone()
    routing = gated_lora_(y, x, plan, group)
    assert routing.ids.shape == (3, 45, group.k_max)
    for index, part in enumerate(base.split(group.out_sizes, dim=-1)):
        alone, member = part.clone(), group.member(index)
        gated_lora_(alone, x, plan, dataclasses.replace(member, b=member.b.contiguous()))
        assert torch.equal(y.split(group.out_sizes, dim=-1)[index], alone), projs[index]
    assert torch.equal(y[slots < 0], base[slots < 0])


def test_row_parallel_ranks_route_from_summed_logits():
    """Tensor parallelism splits down_proj's input over ranks, and with it the router's and
    the A factors' reduction: each rank's `router_logits` of its slice sum to the whole's;
    routed from that sum (ids and weights alike on every rank), the ranks' deltas sum to the
    whole delta, and the metrics count the routing of the summed logits."""
    from mole_serve.kernels import RoutingCounts
    from mole_serve.kernels import router_logits as kernel_router_logits
    from mole_serve.stack import GroupedLoRAStack
    stack = make_stack(ZOO, seed=43).gated["down_proj"]
    x, slots = tokens(50, len(ZOO), seed=43, width=I)
    plan = plan_tokens(slots, len(ZOO), kernel_configs.BLOCK_M)
    halves = (slice(0, I // 2), slice(I // 2, I))
    ranks = [GroupedLoRAStack.of([dataclasses.replace(
        stack, router=stack.router[..., part].contiguous(), a=stack.a[..., part].contiguous())])
        for part in halves]
    inputs = [x[:, part].contiguous() for part in halves]
    summed = sum(kernel_router_logits(x_part, plan, rank) for x_part, rank in zip(inputs, ranks))
    uses = (slots >= 0) & stack.enabled[slots.clamp(min=0)]
    whole = router_logits(x, slots, stack.router)
    assert rel_err(summed[0][uses], whole[uses]) <= TOLERANCE
    assert (summed[0][~uses] == 0).all()
    stats, reference_stats = counter_pair(len(ZOO), stack.router.shape[1], "down")
    deltas, routings = [], []
    for x_part, rank in zip(inputs, ranks):
        y = torch.zeros(50, H, device=DEVICE)
        counts = RoutingCounts(stats.counts, stats.entropy_bounds) if not routings else None
        routings.append(gated_lora_(y, x_part, plan, rank, counts, summed))
        deltas.append(y)
    assert torch.equal(routings[0].ids, routings[1].ids)
    assert torch.equal(routings[0].weights, routings[1].weights)
    want, _ = gated_lora_delta(x, slots, stack, summed[0])
    assert rel_err((deltas[0] + deltas[1])[uses], want[uses]) <= TOLERANCE
    assert (deltas[0][~uses] == 0).all() and (deltas[1][~uses] == 0).all()
    reference_stats.record(summed[0], slots, stack)
    got, _ = take_equal_counts(stats, reference_stats, "down")
    assert got["selections"].sum() > 0


def test_plain_lora_as_one_expert_gated_stack():
    stack = make_stack([ZOO[0], None, ZOO[2]], seed=19).lora["q_proj"]
    gated = as_gated(stack)
    x, slots = tokens(30, 3, seed=19)
    plan = plan_tokens(slots, 3, kernel_configs.BLOCK_M)
    y = torch.zeros(30, H, device=DEVICE)
    routing = gated_lora_(y, x, plan, gated)
    uses = (slots >= 0) & stack.enabled[slots.clamp(min=0)]
    assert (routing.weights[uses] == 1).all()
    slot = slots.clamp(min=0)
    ref = torch.einsum("tr,tor->to", torch.einsum("th,trh->tr", x, stack.a[slot])
                       * stack.scaling[slot][:, None], stack.b[slot])
    assert rel_err(y[uses], ref[uses]) <= TOLERANCE
    assert (y[~uses] == 0).all()


# -- serving dtype ---------------------------------------------------------------------------
def test_bf16_ffn_close_to_reference_and_base_bit_identical():
    check_ffn(ZOO[:5], 48, seed=23, dtype=torch.bfloat16, tolerance=2e-2)
