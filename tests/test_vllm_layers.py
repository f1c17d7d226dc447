"""The served layers' slot buffers: filling slots in place must compute what
`stack.stack_layer` + `reference` compute, padding to the server's limits included, on both
backends (the Triton kernels run interpreted here, for real on a GPU machine). No vLLM
needed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import take
from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.config import MoleConfig
from mole_serve.layers import ATTENTION_GROUPS, FFNAdapters, ProjectionAdapters
from mole_serve.reference import FrozenFFN, mole_ffn, mole_projection
from mole_serve.slots import SlotLimits, TokenSlots
from mole_serve.stack import stack_layer

BASE = BaseShape(hidden=64, intermediate=96, num_layers=2, num_heads=2, num_kv_heads=1,
                 head_dim=32)
# "compact": the reference as a CPU server runs it, on each step's MoLE rows only.
BACKENDS = ("reference", "compact", "kernels")
# Inputs are made on the CPU (seeded) and moved: on a GPU machine the kernels run for real.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(DEVICE)


def randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator):
    return torch.randint(low, high, shape, generator=generator).to(DEVICE)


def adapters():
    g = torch.Generator().manual_seed(0)
    configs = [MoleConfig("mixlora", 3, 4, 8, ("q_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"), top_k=2),
               MoleConfig("dynmole", 4, 2, 4, ("k_proj", "v_proj", "up_proj", "down_proj")),
               MoleConfig("mixlora-dynamic", 2, 8, 8, ("gate_proj", "down_proj", "v_proj"))]
    return [init_adapter(c, BASE, f"a{i}", generator=g, b_std=0.1, router_std=0.5)
            for i, c in enumerate(configs)]


def step_slots(num_slots: int, slots: torch.Tensor, backend: str) -> TokenSlots:
    """What the adapter-mapping hook (`set`) and the model's forward (`prepare`) do once
    per step; the buffers hold a few rows more than the step, as vLLM's do."""
    token_slots = TokenSlots(num_slots, slots.shape[0] + 5, backend == "kernels", DEVICE,
                             compact=backend == "compact")
    token_slots.set(slots)
    token_slots.prepare(slots.shape[0])
    return token_slots


def served_layer(limits: SlotLimits, slots: torch.Tensor, backend: str):
    token_slots = step_slots(limits.slots, slots, backend)
    use_kernels = backend == "kernels"
    return (FFNAdapters(limits, BASE, 1, token_slots, use_kernels).to(DEVICE),
            ProjectionAdapters(limits, BASE, 1, token_slots, ATTENTION_GROUPS,
                               use_kernels).to(DEVICE))


def ffn_step(ffn: FFNAdapters, frozen: FrozenFFN, x: torch.Tensor) -> torch.Tensor:
    """The MoLE FFN as `model.MoleLlamaMLP` runs it on the served buffers."""
    return ffn.around_frozen(x, frozen.gate_up_gemm, frozen.act_and_mul, frozen.down_gemm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filled_slots_compute_what_stack_layer_computes(backend):
    mix, dyn, dynamic = adapters()
    g = torch.Generator().manual_seed(1)
    slots = randint(-1, 4, (29,), generator=g)
    ffn, attention = served_layer(SlotLimits(slots=4, rank=8, experts=5), slots, backend)
    # Slot 3 first holds an adapter that is then replaced: refills must not leave residue.
    for slot, adapter in ((3, mix), (0, dyn), (1, mix), (3, dynamic), (2, None)):
        ffn.fill(slot, adapter)
        attention.fill(slot, adapter)
    expected_stack = stack_layer([dyn, mix, None, dynamic], 1, BASE).to(DEVICE)

    frozen = FrozenFFN(*(randn(*s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96))))
    x = randn(29, 64, generator=g)
    batch = ffn.slot_batch(29)
    torch.testing.assert_close(ffn_step(ffn, frozen, x), mole_ffn(x, frozen, slots, expected_stack))

    # q, k and v deltas land in their columns of vLLM's fused qkv output, in one launch pair.
    qkv_weight = randn(64 + 32 + 32, 64, generator=g) / 8
    expected = [mole_projection(x, weight, slots, proj, expected_stack) for proj, weight in
                zip(("q_proj", "k_proj", "v_proj"), qkv_weight.split([64, 32, 32]))]
    torch.testing.assert_close(attention.project(x @ qkv_weight.T, x, batch, "qkv"),
                               torch.cat(expected, dim=-1))
    weight = randn(64, 64, generator=g) / 8
    torch.testing.assert_close(attention.project(x @ weight.T, x, batch, "o"),
                               mole_projection(x, weight, slots, "o_proj", expected_stack))

    # Adapters swapped between steps, the step's token plan kept (as vLLM refills slots
    # between steps whose slot ids do not change): the next forward sees the new weights.
    for slot, adapter in ((3, mix), (0, None), (1, dynamic)):
        ffn.fill(slot, adapter)
        attention.fill(slot, adapter)
    swapped_stack = stack_layer([None, dynamic, None, mix], 1, BASE).to(DEVICE)
    torch.testing.assert_close(ffn_step(ffn, frozen, x), mole_ffn(x, frozen, slots, swapped_stack))
    torch.testing.assert_close(attention.project(x @ weight.T, x, ffn.slot_batch(29), "o"),
                               mole_projection(x, weight, slots, "o_proj", swapped_stack))


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_and_other_adapters_tokens_are_untouched(backend):
    mix, dyn, _ = adapters()
    slots = torch.tensor([-1, 2, 0, -1, 1, 2], device=DEVICE)
    ffn, _ = served_layer(SlotLimits(slots=3, rank=4, experts=4), slots, backend)
    ffn.fill(0, mix)
    ffn.fill(1, dyn)
    x = randn(6, 64)
    gate_up = randn(6, 192)  # a fused gate_up output
    out = ffn.project(gate_up.clone(), x, ffn.slot_batch(6), "gate_up")[:, 96:]
    u0 = gate_up[:, 96:]
    dynmole_rows = slots.eq(1)          # MixLoRA's FFN experts are not a per-linear delta
    assert torch.equal(out[~dynmole_rows], u0[~dynmole_rows])
    assert not torch.isclose(out[dynmole_rows], u0[dynmole_rows]).all()

def test_compact_steps_compute_only_their_mole_rows_and_the_experts_they_need(monkeypatch):
    """A CPU server's steps (compact): the slot-grouped math sees only the rows of MoLE tokens
    whose adapter adapts the buffer at hand, with as many expert columns as their slots'
    adapters can select (top-2 MixLoRA: 2; DynMoLE: all 4), not the server's 5; where their
    slots hold plain LoRA only (MixLoRA's attention LoRA), no routing; a step without MoLE
    tokens runs none of it and leaves every output as it was."""
    from mole_serve import grouped

    calls = []

    def spy(name):
        original = getattr(grouped, name)

        def counted(*args, **kwargs):
            if name == "gated_lora_delta" and args[3] is None:  # plain LoRA: no routing
                calls.append(("lora_delta", args[0].shape[0], 1))
            else:
                ids = args[5] if name == "mixlora_experts" else args[3][1]  # (weights, ids)
                calls.append((name, ids.shape[0], ids.shape[1]))
            return original(*args, **kwargs)
        monkeypatch.setattr(grouped, name, counted)
    spy("mixlora_experts")
    spy("gated_lora_delta")

    mix, dyn, _ = adapters()  # mix: top-2 of 3 experts, LoRA on q/o; dyn: DynMoLE, 4 experts
    g = torch.Generator().manual_seed(5)
    frozen = FrozenFFN(*(randn(*s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96))))
    x = randn(7, 64, generator=g)
    for slots, expected_calls in (
            ([-1] * 7, []),
            ([0, -1, 0, -1, -1, -1, 0], [("lora_delta", 3, 1), ("mixlora_experts", 3, 2)]),
            # each buffer computes the rows of the slots it adapts: o and the FFN experts
            # slot 0's two, DynMoLE's up (not gate: it adapts none) and down slot 1's three
            ([1, 0, -1, -1, 0, 1, 1], [("lora_delta", 2, 1), ("gated_lora_delta", 3, 4),
                                       ("mixlora_experts", 2, 2), ("gated_lora_delta", 3, 4)])):
        slots = torch.tensor(slots, device=DEVICE)
        outputs = {}
        for backend in ("reference", "compact"):
            ffn, attention = served_layer(SlotLimits(slots=3, rank=8, experts=5), slots, backend)
            for module in (ffn, attention):
                module.fill(0, mix)
                module.fill(1, dyn)
            calls.clear()
            y = randn(7, 64, generator=torch.Generator().manual_seed(6))
            outputs[backend] = (attention.project(y, x, attention.slot_batch(7), "o"),
                                ffn_step(ffn, frozen, x))
        assert calls == expected_calls
        torch.testing.assert_close(outputs["compact"], outputs["reference"])
        if not expected_calls:
            assert torch.equal(outputs["compact"][0], y)


def one_step_outputs(slots: torch.Tensor, backend: str, fills, x: torch.Tensor, seed: int):
    """A served layer's qkv, o and FFN outputs for one step on `backend`, its 3 slots filled
    in the order of `fills` ((slot, adapter) pairs); frozen weights drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    frozen = FrozenFFN(*(randn(*s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96))))
    qkv_weight = randn(64 + 32 + 32, 64, generator=g) / 8
    ffn, attention = served_layer(SlotLimits(slots=3, rank=8, experts=5), slots, backend)
    for slot, adapter in fills:
        ffn.fill(slot, adapter)
        attention.fill(slot, adapter)
    batch = attention.slot_batch(slots.shape[0])
    return (attention.project(x @ qkv_weight.T, x, batch, "qkv"),
            attention.project(x.clone(), x, batch, "o"), ffn_step(ffn, frozen, x))


def test_compact_decode_steps_gather_and_prefill_steps_group(monkeypatch):
    """Compact steps read each buffer's expert factors the cheaper way (`gathers`): a decode
    step's row or two per slot gather their k experts (the reference's form), a prefill
    step's rows run each slot's experts as GEMMs (`grouped`); both equal the every-row
    reference, DynMoLE's routed experts and MixLoRA's experts and attention LoRA alike."""
    from mole_serve import grouped, layers

    calls = []
    for module in (grouped, layers):
        for name in ("mixlora_experts", "gated_lora_delta"):
            def spied(*args, _original=getattr(module, name), _module=module, **kwargs):
                calls.append(_module)
                return _original(*args, **kwargs)
            monkeypatch.setattr(module, name, spied)

    fills = list(enumerate(adapters()))  # mix, dyn, dynamic
    g = torch.Generator().manual_seed(7)
    for slots, expected_module in (([0, -1, 2], layers), ([-1, 1], layers),
                                   ([0] * 5 + [1] * 5 + [2] * 5, grouped)):
        slots = torch.tensor(slots, device=DEVICE)
        x = randn(slots.shape[0], 64, generator=g)
        expected = one_step_outputs(slots, "reference", fills, x, seed=7)
        calls.clear()
        got = one_step_outputs(slots, "compact", fills, x, seed=7)
        assert calls and set(calls) == {expected_module}, slots
        torch.testing.assert_close(got, expected)


def test_compact_steps_route_with_just_the_strategies_their_rows_use(monkeypatch):
    """Compact steps tell the routing which strategies their rows use (kept per slot on the
    host), so it computes those selections alone: exactly the strategies of the rows whose
    slot holds an adapter there (plain LoRA: switch over one expert); every-row steps tell
    nothing (any strategy)."""
    from mole_serve import layers, reference
    from mole_serve.routing import NUM_EXPERTS, STRATEGY, STRATEGY_CODE

    told = []
    for module in (layers, reference):
        def spied(logits, params, k_max, strategies=None, _original=module.route):
            present = params[params[:, NUM_EXPERTS] > 0, STRATEGY].round().long()
            told.append((strategies, frozenset(present.tolist())))
            return _original(logits, params, k_max, strategies)
        monkeypatch.setattr(module, "route", spied)

    fills = list(enumerate(adapters()))  # mix, dyn, dynamic
    x = randn(6, 64, generator=torch.Generator().manual_seed(9))
    for slots in ([0, 1, 2, 1, -1, 0], [1, -1, 1], [0, 2]):
        slots = torch.tensor(slots, device=DEVICE)
        told.clear()
        one_step_outputs(slots, "reference", fills, x[:len(slots)], seed=9)
        assert told and all(strategies is None for strategies, _ in told)
        told.clear()
        one_step_outputs(slots, "compact", fills, x[:len(slots)], seed=9)
        assert told and all(strategies == present for strategies, present in told), told
    # the last step: MixLoRA's top-k and mixlora-dynamic in the FFN experts; their attention
    # LoRA (q, o, v: switch over one expert) is beside no routed slot, so never routed
    assert [strategies for strategies, _ in told] == [
        {STRATEGY_CODE["mixlora"], STRATEGY_CODE["mixlora-dynamic"]}]


@pytest.mark.parametrize("gathers", [True, False])
def test_compact_steps_equal_the_reference_whichever_way_they_read_factors(monkeypatch,
                                                                          gathers):
    """Either way of reading expert factors, forced on every buffer whatever the step's size,
    gives the every-row result: slots refilled in turn, members that route some of the
    step's slots and hold plain LoRA for others (v: DynMoLE's experts, mixlora-dynamic's
    LoRA), one-row and many-row steps."""
    from mole_serve.slots import ExpertColumns

    mix, dyn, dynamic = adapters()
    fills = ((2, dyn), (0, mix), (1, dyn), (2, dynamic))
    g = torch.Generator().manual_seed(8)
    for tokens in (1, 3, 20):
        slots = randint(-1, 3, (tokens,), generator=g).to(DEVICE)
        assert tokens < 20 or {0, 1, 2} <= set(slots.tolist())
        x = randn(tokens, 64, generator=g)
        expected = one_step_outputs(slots, "reference", fills, x, seed=8)
        monkeypatch.setattr(ExpertColumns, "gathers",
                            lambda self, batch: batch.rows is None or gathers)
        got = one_step_outputs(slots, "compact", fills, x, seed=8)
        monkeypatch.undo()
        torch.testing.assert_close(got, expected)


def routing_counts(x, slots, adapter, slot, layer=1):
    """Per-token loop: (expert selection counts, experts-per-token counts, entropies) of the
    MixLoRA FFN router of `adapter` for the tokens in `slot`."""
    from mole_serve.routing import route_config
    config, router = adapter.config, adapter.layers[layer].router
    selections = torch.zeros(5, dtype=torch.long)
    per_token = torch.zeros(6, dtype=torch.long)
    entropies = []
    for t in torch.nonzero(slots == slot).flatten().tolist():
        logits = x[t:t + 1].float() @ router.T
        weights, ids = route_config(logits, config)
        kept = ids[0][weights[0] > 0]
        selections[kept] += 1
        per_token[kept.numel()] += 1
        p = torch.softmax(logits[0], -1)
        entropies.append(float(-(p * p.log()).sum() / torch.log(torch.tensor(len(p)))))
    return selections, per_token, torch.tensor(entropies)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_stats_count_what_a_per_token_loop_counts(backend):
    """Device-side counts, taken outside the forward, per slot: what a loop over tokens
    routing one at a time counts; taking again returns only what was added since."""
    from mole_serve.metrics import ENTROPY_BUCKETS
    mix, dyn, _ = adapters()
    g = torch.Generator().manual_seed(2)
    slots = randint(-1, 3, (40,), generator=g)
    ffn, _ = served_layer(SlotLimits(slots=3, rank=8, experts=5), slots, backend)
    ffn.fill(0, mix)
    ffn.fill(2, dyn)
    x = randn(40, 64, generator=g)
    h, gu = randn(40, 96, generator=g), randn(40, 96, generator=g)
    batch = ffn.slot_batch(40)
    ffn.mix_experts(h.clone(), gu, gu, x, batch)
    counts = take(ffn.mixlora_stats)["ffn"]

    selections, per_token, entropies = routing_counts(x.cpu(), slots.cpu(), mix, 0)
    assert torch.equal(counts["selections"][0], selections)
    assert torch.equal(counts["experts_per_token"][0], per_token)
    assert per_token[2] == (slots == 0).sum(), "top-2 keeps two experts per token"
    buckets = torch.bucketize(entropies, torch.tensor(ENTROPY_BUCKETS))
    assert torch.equal(counts["entropy_buckets"][0], torch.bincount(buckets, minlength=11))
    assert counts["entropy_sum"][0].item() == pytest.approx(entropies.sum().item(), rel=1e-5)
    # Slot 2 holds DynMoLE (no FFN router), slot 1 is empty: nothing counted for them.
    assert not counts["experts_per_token"][1:].any()

    # DynMoLE's per-linear routers count in their own stats.
    ffn.project(randn(40, 192, generator=g), x, batch, "gate_up")
    up = take(ffn.gated_stats["gate_up"])["up_proj"]
    assert up["experts_per_token"][2].sum() == (slots == 2).sum()
    assert not up["experts_per_token"][:2].any()

    ffn.token_slots.prepare(10)  # the next step: 10 tokens
    ffn.mix_experts(h[:10].clone(), gu[:10], gu[:10], x[:10], ffn.slot_batch(10))
    again = take(ffn.mixlora_stats)["ffn"]
    assert again["experts_per_token"][0].sum() == (slots[:10] == 0).sum()
    ffn.fill(0, None)
    assert not any(v.any() for v in take(ffn.mixlora_stats)["ffn"].values()), \
        "reset with the slot"


def test_routing_export_adds_up_per_adapter_and_writes_only_when_flushed(monkeypatch):
    """Every layer's counters reach the host in one copy and add up per adapter, each
    module's running baseline as its own `added` keeps it; a slot change (a collect) writes
    no series, the next flush each adapter's once, the leaving adapter's included."""
    import copy

    from mole_serve import metrics
    from mole_serve.routing_stats import RoutingExport, RoutingStats, split_counts

    observed = []
    monkeypatch.setattr(metrics, "routing_observed",
                        lambda name, routers, **counts: observed.append((name, routers, counts)))
    g = torch.Generator().manual_seed(5)
    stats = [RoutingStats(3, 4, 0, ("ffn",)), RoutingStats(3, 4, 1, ("q_proj", "k_proj"))]
    for module in stats:
        for slot in range(3):
            module.reset_slot(slot, [slot != 1] * len(module.routers))  # slot 1: not routed
    twins = copy.deepcopy(stats)
    export = RoutingExport(stats)
    assert export.routers == [(0, "ffn"), (1, "q_proj"), (1, "k_proj")]
    expected = {}

    def collect(names):
        export.collect(names)
        alone = torch.cat([twin.added() for twin in twins])
        for slot, name in enumerate(names):
            if alone[:, slot].any():
                expected[name] = alone[:, slot] + expected.get(name, 0)

    names = ["a", "b", "c"]
    for round in range(3):  # later rounds check the baseline kept from the one before
        if round == 2:  # slot 2 changes adapter: "c"'s counts are collected, then reset
            collect(names)
            for module in stats + twins:
                module.reset_slot(2, [True] * len(module.routers))
            names = ["a", "b", "d"]
        for module, twin in zip(stats, twins):
            added = torch.randint(0, 5, module.counts.shape, generator=g).double()
            module.counts += added
            twin.counts += added
        collect(names)
    assert observed == [] and sorted(expected) == ["a", "c", "d"], "b is not routed"
    export.flush()
    assert [name for name, _, _ in observed] == ["a", "c", "d"]
    for name, routers, counts in observed:
        assert routers == export.routers
        for key, value in split_counts(expected[name], 4).items():
            assert torch.equal(counts[key], value), (name, key)
    export.flush()
    assert len(observed) == 3, "flushed once"
    RoutingExport([]).collect(names)  # a server without routing counters


def test_routing_stats_change_no_output():
    mix, dyn, _ = adapters()
    g = torch.Generator().manual_seed(3)
    slots = randint(-1, 2, (16,), generator=g)
    x, h, gate_up = (randn(16, n, generator=g) for n in (64, 96, 192))
    outputs = []
    for routing_stats in (True, False):
        ffn = FFNAdapters(SlotLimits(2, 8, 4), BASE, 1, step_slots(2, slots, "reference"), False,
                          routing_stats).to(DEVICE)
        ffn.fill(0, mix)
        ffn.fill(1, dyn)
        batch = ffn.slot_batch(16)
        gu = ffn.project(gate_up.clone(), x, batch, "gate_up")
        outputs.append((gu, ffn.mix_experts(h.clone(), *gu.chunk(2, dim=-1), x, batch)[0]))
        assert bool(ffn.routing_stats()) == routing_stats
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def tp_ranks(run, world: int):
    """`run(shard)` on `world` simulated tensor-parallel ranks, one after the other. vLLM's
    all-reduce gives every rank the sum of all ranks' inputs, so a first pass records each
    rank's all-reduce inputs, and a second pass, whose results are returned, gets their sums
    call by call (an all-reduce input never depends on an earlier all-reduce of its step)."""
    from mole_serve.sharding import TensorShard
    recorded = [[] for _ in range(world)]
    for rank in range(world):
        run(TensorShard(rank, world, lambda t, calls=recorded[rank]: calls.append(t) or t))
    sums = [sum(calls) for calls in zip(*recorded, strict=True)]
    return [run(TensorShard(rank, world, lambda t, calls=iter(sums): next(calls)))
            for rank in range(world)], len(sums)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_shards_sum_to_the_unsharded_ffn(backend, world):
    """Simulated ranks, split as vLLM splits the frozen MLP (gate/up by output rows, down
    by input columns): each rank's FFN output, deltas included, is a partial sum, and the
    partials add up (the base down projection's all-reduce) to the unsharded result. The
    DynMoLE router on down_proj sees a part of its input on each rank: ranks route from their
    all-reduced logits, so the first rank (the only one the model lets count) counts the
    unsharded routing."""
    from mole_serve.sharding import TensorShard
    mix, dyn, dynamic = adapters()
    column_dynmole = init_adapter(MoleConfig("dynmole", 4, 2, 4, ("gate_proj", "up_proj")),
                                  BASE, "col", generator=torch.Generator().manual_seed(5),
                                  b_std=0.1, router_std=0.5)
    g = torch.Generator().manual_seed(4)
    slots = randint(-1, 4, (23,), generator=g)
    x = randn(23, 64, generator=g)
    gate, up, down = (randn(*s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96)))
    counted = {}

    def ffn_output(shard):
        ffn = FFNAdapters(SlotLimits(4, 8, 5), BASE, 1, step_slots(4, slots, backend),
                          backend == "kernels", shard=shard).to(DEVICE)
        for slot, adapter in enumerate((mix, column_dynmole, dynamic, dyn)):
            ffn.fill(slot, adapter)
        part = shard.part(96)
        out = ffn_step(ffn, FrozenFFN(gate[part], up[part], down[:, part]), x)
        counted[shard.rank] = [stats.added() for stats in ffn.routing_stats()]
        return out

    whole = ffn_output(TensorShard())
    unsharded_counts = counted[0]
    ranks, all_reduces = tp_ranks(ffn_output, world)
    assert all_reduces == 1, "down_proj's router logits, once per step"
    assert (slots == 3).any(), "tokens routed by the down_proj router"
    torch.testing.assert_close(sum(ranks), whole)
    assert not torch.allclose(ranks[0], whole, atol=1e-3), "each rank holds only a part"
    for sharded, unsharded in zip(counted[0], unsharded_counts, strict=True):
        # counts exact (a moved token is off by 1); the entropy sum to fp32 rounding
        torch.testing.assert_close(sharded, unsharded, rtol=1e-5, atol=1e-9)
    assert any(c[..., :4].sum() > 0 for c in unsharded_counts), "selections were counted"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_attention_routes_o_proj_from_all_reduced_logits(backend, world):
    """o_proj's input (the attention heads) is split over ranks: a DynMoLE router there
    routes from the ranks' summed logits; a MixLoRA-only server's one-expert attention LoRA
    needs no logits and no all-reduce."""
    from mole_serve.sharding import TensorShard
    base = dataclasses.replace(BASE, num_heads=4, head_dim=16)  # heads for 4 ranks
    dyn_o = init_adapter(MoleConfig("dynmole", 3, 4, 8, ("o_proj",), top_p=0.6), base, "o",
                         generator=torch.Generator().manual_seed(8), b_std=0.1, router_std=0.5)
    mix, _, _ = adapters()
    g = torch.Generator().manual_seed(9)
    slots = randint(-1, 2, (19,), generator=g)
    x = randn(19, 64, generator=g)

    def o_output(shard, limits=SlotLimits(2, 8, 5), loaded=(dyn_o, mix)):
        attention = ProjectionAdapters(limits, base, 1,
                                       step_slots(2, slots, backend),
                                       {"o": ("o_proj",)}, backend == "kernels",
                                       shard=shard).to(DEVICE)
        for slot, adapter in enumerate(loaded):
            attention.fill(slot, adapter)
        part = shard.part(64)
        return attention.project(torch.zeros(19, 64, device=DEVICE), x[:, part].contiguous(),
                                 attention.slot_batch(19), "o")

    whole = o_output(TensorShard())
    ranks, all_reduces = tp_ranks(o_output, world)
    assert all_reduces == 1
    torch.testing.assert_close(sum(ranks), whole)
    assert whole[slots == 0].abs().sum() > 0, "the routed o_proj delta"
    whole = o_output(TensorShard(), SlotLimits(2, 8, 1), (None, mix))
    ranks, all_reduces = tp_ranks(
        lambda shard: o_output(shard, SlotLimits(2, 8, 1), (None, mix)), world)
    assert all_reduces == 0
    torch.testing.assert_close(sum(ranks), whole)


@pytest.mark.parametrize("heads, kv_heads, world", [(4, 2, 2), (4, 1, 2), (4, 2, 4), (8, 2, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_qkv_deltas_are_the_rank_s_columns(backend, heads, kv_heads, world):
    """q/k/v are column-parallel with one fused output per rank, [q_local | k_local |
    v_local], k/v heads split or replicated as vLLM does: each rank's deltas (DynMoLE
    routed, MixLoRA's attention LoRA) are exactly those columns of the unsharded deltas."""
    from mole_serve.sharding import TensorShard
    base = dataclasses.replace(BASE, num_heads=heads, num_kv_heads=kv_heads, head_dim=16)
    g = torch.Generator().manual_seed(11)
    dyn = init_adapter(MoleConfig("dynmole", 3, 4, 8, ("q_proj", "k_proj", "v_proj"),
                                  top_p=0.6), base, "d", generator=g, b_std=0.3, router_std=0.5)
    mix = init_adapter(MoleConfig("mixlora", 3, 4, 8, ("q_proj", "k_proj", "v_proj",
                                                       "gate_proj")), base, "m", generator=g,
                       b_std=0.3, router_std=0.5)
    slots = randint(-1, 2, (13,), generator=g)
    x = randn(13, 64, generator=g)
    q, kv = heads * 16, kv_heads * 16

    def qkv_output(shard, q_part, kv_part):
        attention = ProjectionAdapters(SlotLimits(2, 8, 4), base, 1,
                                       step_slots(2, slots, backend),
                                       {"qkv": ("q_proj", "k_proj", "v_proj")},
                                       backend == "kernels", shard=shard).to(DEVICE)
        attention.fill(0, dyn)
        attention.fill(1, mix)
        width = len(range(q)[q_part]) + 2 * len(range(kv)[kv_part])
        return attention.project(torch.zeros(13, width, device=DEVICE), x,
                                 attention.slot_batch(13), "qkv")

    whole_q, whole_k, whole_v = qkv_output(TensorShard(), slice(None), slice(None)).split(
        [q, kv, kv], -1)
    assert whole_q[slots >= 0].abs().sum() > 0 and whole_v[slots >= 0].abs().sum() > 0
    for rank in range(world):
        shard = TensorShard(rank, world, lambda t: t)
        q_part, kv_part = shard.part(q), shard.kv_part(kv_heads, 16)
        local_q, local_kv = q // world, kv_part.stop - kv_part.start
        rank_q, rank_k, rank_v = qkv_output(shard, q_part, kv_part).split(
            [local_q, local_kv, local_kv], -1)
        torch.testing.assert_close(rank_q, whole_q[:, q_part])
        torch.testing.assert_close(rank_k, whole_k[:, kv_part])
        torch.testing.assert_close(rank_v, whole_v[:, kv_part])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_factors_compute_what_the_bf16_stack_computes(backend):
    """Served factors live in the model dtype (routers stay fp32): the same math as the
    reference on a stack cast the same way."""
    mix, dyn, dynamic = adapters()
    g = torch.Generator().manual_seed(6)
    slots = randint(-1, 3, (21,), generator=g)
    limits = SlotLimits(slots=3, rank=8, experts=5, factor_dtype=torch.bfloat16)
    ffn, _ = served_layer(limits, slots, backend)
    for slot, adapter in enumerate((mix, dyn, dynamic)):
        ffn.fill(slot, adapter)
    assert ffn.mixlora.gate_up_b.dtype == torch.bfloat16
    assert ffn.mixlora.router.dtype == ffn.gated["gate_up"].router.dtype == torch.float32
    frozen = FrozenFFN(*(randn(*s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96))))
    x = randn(21, 64, generator=g)
    expected = mole_ffn(x, frozen, slots,
                        stack_layer([mix, dyn, dynamic], 1, BASE).to(DEVICE, torch.bfloat16))
    torch.testing.assert_close(ffn_step(ffn, frozen, x), expected, rtol=1e-5, atol=1e-5)


def test_compact_steps_are_the_reference_backend_s():
    with pytest.raises(ValueError, match="token plan"):
        TokenSlots(2, 8, use_kernels=True, compact=True)


def test_token_slots_from_the_host_reset_the_rows_past_them():
    """The mapping hook's host list lands on the device (pinned, asynchronously, on a GPU)
    and a shorter step leaves no stale slot behind."""
    token_slots = TokenSlots(3, 8, device=DEVICE)
    sync_check = torch.cuda.get_sync_debug_mode() if DEVICE == "cuda" else None
    if DEVICE == "cuda":  # a blocking (pageable) copy would raise here
        torch.cuda.set_sync_debug_mode("error")
    try:
        token_slots.set(torch.tensor([2, 0, -1, 1, 1, 0], dtype=torch.long))
        token_slots.set(torch.tensor([1, -1, 2], dtype=torch.long))
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(sync_check)
    assert token_slots.batch(8).slots.tolist() == [1, -1, 2, -1, -1, -1, -1, -1]


@pytest.mark.parametrize("world, kv_heads, rows", [
    (2, 4, [(0, 64), (64, 128)]),                    # 2 heads each
    (4, 2, [(0, 32), (0, 32), (32, 64), (32, 64)]),  # each head on 2 ranks
    (2, 1, [(0, 32), (0, 32)]),                      # MQA: every rank holds the head
])
def test_kv_rows_follow_vllm_head_split_and_replication(world, kv_heads, rows):
    from mole_serve.sharding import ShardDims, TensorShard
    base = dataclasses.replace(BASE, num_heads=4, num_kv_heads=kv_heads, head_dim=32)
    for rank, (begin, end) in enumerate(rows):
        shard = TensorShard(rank, world, lambda t: t)
        assert shard.kv_part(kv_heads, 32) == slice(begin, end)
        dims = ShardDims.of(base, "v_proj", shard)
        assert (dims.out_part, dims.local_out, dims.in_part) == (slice(begin, end), end - begin,
                                                                  slice(None))
    with pytest.raises(ValueError, match="3 KV heads do not replicate evenly over 4 ranks"):
        TensorShard(0, 4, lambda t: t).kv_part(3, 32)


def test_token_plan_is_built_once_per_step_not_per_layer(monkeypatch):
    """On the kernels the model's forward sorts the tokens once (`TokenSlots.prepare`);
    the layers only slice the step's persistent plan."""
    import mole_serve.kernels as kernels
    mix, dyn, _ = adapters()
    slots = torch.tensor([2, -1, 0, 1, 0, -1, 2, 1, 0], device=DEVICE)
    ffn, attention = served_layer(SlotLimits(3, 8, 5), slots, "kernels")
    ffn.fill(0, mix)
    ffn.fill(1, dyn)
    calls = []
    plan_tokens = kernels.plan_tokens
    monkeypatch.setattr(kernels, "plan_tokens", lambda *a: calls.append(a) or plan_tokens(*a))
    ffn.token_slots.prepare(9)
    assert len(calls) == 1
    x = randn(9, 64)
    frozen = FrozenFFN(randn(96, 64), randn(96, 64), randn(64, 96))
    for _ in range(2):  # two decoder layers of one step
        attention.project(randn(9, 64), x, attention.slot_batch(9), "o")
        ffn_step(ffn, frozen, x)
    assert len(calls) == 1
    plan = ffn.slot_batch(9).plan
    assert plan.sorted_tokens.data_ptr() == ffn.token_slots.sorted_tokens.data_ptr()


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_served_layers_compile_once_for_every_token_count(backend, ranks):
    """vLLM compiles each decoder layer with `fullgraph=True` and a symbolic token count, and
    drops the guards: a graph break, a data-dependent shape or a specialisation on the token
    count in the layers (slicing the step buffers, routing counts included) fails here. With
    two ranks, the down_proj router's logits go through the rank's all-reduce (here: rank
    0's slice alone, doubled; vLLM's is a custom op)."""
    from mole_serve.sharding import TensorShard
    mix, dyn, dynamic = adapters()
    g = torch.Generator().manual_seed(7)
    slots = randint(-1, 3, (40,), generator=g)
    shard = TensorShard(0, ranks, (lambda t: 2 * t) if ranks > 1 else None)
    ffn = FFNAdapters(SlotLimits(3, 8, 5), BASE, 1, step_slots(3, slots, backend),
                      backend == "kernels", shard=shard).to(DEVICE)
    for slot, adapter in enumerate((mix, dyn, dynamic)):
        ffn.fill(slot, adapter)
    frozen = FrozenFFN(*(randn(*s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96))))
    part = shard.part(96)
    frozen = FrozenFFN(frozen.gate[part], frozen.up[part], frozen.down[:, part])
    x = randn(40, 64, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(ffn_step, fullgraph=True, dynamic=True, backend="aot_eager")

    # Compiled, a compact step runs the reference on every row; eager, the slot-grouped math
    # on its MoLE rows (`grouped`: the same sums in another order).
    exact = {} if backend == "compact" else {"rtol": 0, "atol": 0}

    def check(num_tokens):
        ffn.token_slots.prepare(num_tokens)
        torch.testing.assert_close(compiled(ffn, frozen, x[:num_tokens]),
                                   ffn_step(ffn, frozen, x[:num_tokens]), **exact)

    check(17)
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(40)
        check(5)
