"""The slot-grouped expert math of CPU compact steps (`mole_serve.grouped`) equals the
reference's per-token gathers: every strategy in one mixed batch, adapters of different
expert counts and ranks padded into one stack (a slot of fewer experts than the step's
columns), an empty slot and a slot whose adapter does not adapt the stack, fp32 and bf16
factors."""

import pytest
import torch

from conftest import ODD_BASE, rel_err
from mole_serve import grouped, reference
from mole_serve.stack import stack_layer

H, I = ODD_BASE.hidden, ODD_BASE.intermediate
FFN_EXPERTS = ("topk", "top1", "dynamic", "switch")


def mixed_batch(adapters, tokens: int, seed: int):
    """A stack of every adapter plus an empty slot; tokens in every slot, and the slots used."""
    names = list(adapters)
    stack = stack_layer([adapters[n] for n in names] + [None], 1, ODD_BASE)
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, len(names) + 1, (tokens,), generator=g)
    return names, stack, slots, tuple(slots.unique().tolist()), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixlora_experts_and_down_delta_equal_the_reference(adapters, dtype):
    names, stack, slots, used, g = mixed_batch(adapters, 61, seed=0)
    ffn = stack.ffn.__class__(**{**vars(stack.ffn), **{
        f: getattr(stack.ffn, f).to(dtype) for f in ("gate_up_a", "gate_up_b", "down_a",
                                                     "down_b")}})
    x = torch.randn(61, H, generator=g)
    g0, u0 = torch.randn(61, I, generator=g), torch.randn(61, I, generator=g)
    weights, ids, uses = reference.mixlora_route(x, slots, ffn)
    assert {names[s] for s in slots[uses].tolist()} == set(FFN_EXPERTS)
    expected = reference.mixlora_experts(g0, u0, x, slots, weights, ids, ffn)
    got = grouped.mixlora_experts(g0, u0, x, slots, weights, ids, ffn, used)
    for got_part, expected_part in zip(got, expected, strict=True):
        assert rel_err(got_part[uses], expected_part[uses]) <= 1e-5
    delta = grouped.mixlora_down_delta(got[1], slots, weights, ids, ffn, used)
    expected_delta = reference.mixlora_down_delta(expected[1], slots, weights, ids, ffn)
    assert rel_err(delta[uses], expected_delta[uses]) <= 1e-5
    assert torch.equal(delta[~uses], torch.zeros_like(delta[~uses]))


@pytest.mark.parametrize("proj", ["q_proj", "up_proj", "down_proj"])
def test_gated_lora_delta_equals_the_reference(adapters, proj):
    """DynMoLE's routed experts (and a plain LoRA as no slot of a gated stack uses it)."""
    names, stack, slots, used, g = mixed_batch(adapters, 53, seed=1)
    gated = stack.gated[proj]
    x = torch.randn(53, gated.a.shape[-1], generator=g)
    routed = reference.gated_route(reference.router_logits(x, slots, gated.router), slots,
                                   gated)
    expected, expected_uses = reference.gated_lora_delta(x, slots, gated, routed=routed)
    got, uses = grouped.gated_lora_delta(x, slots, gated, routed, used)
    assert torch.equal(uses, expected_uses) and uses.any() and not uses.all()
    assert rel_err(got[uses], expected[uses]) <= 1e-5
    assert torch.equal(got[~uses], torch.zeros_like(got[~uses]))


def test_step_columns_wider_than_a_slot_s_experts(adapters):
    """A compact step's k is its widest slot's; a slot of fewer experts then has columns of
    padded expert ids (weight 0), which the grouped math must drop."""
    names, stack, slots, used, g = mixed_batch(adapters, 40, seed=2)
    ffn = stack.ffn
    assert ffn.k_max > min(int(n) for n in ffn.routing[:, 1] if n > 0)
    x = torch.randn(40, H, generator=g)
    g0, u0 = torch.randn(40, I, generator=g), torch.randn(40, I, generator=g)
    weights, ids, uses = reference.mixlora_route(x, slots, ffn)
    assert (ids[uses] >= ffn.routing[slots[uses], 1, None]).any()
    expected = reference.mixlora_experts(g0, u0, x, slots, weights, ids, ffn)
    got = grouped.mixlora_experts(g0, u0, x, slots, weights, ids, ffn, used)
    assert rel_err(got[0][uses], expected[0][uses]) <= 1e-5


def test_plain_lora_slots_skip_the_routing_and_equal_the_reference(adapters):
    """A served q/k/v group holds MixLoRA's attention LoRA as one-expert stacks (weight 1),
    which compact steps compute without routing: beside DynMoLE's routed slots (whose
    routing they ignore), and alone (no routing at all)."""
    from mole_serve.layers import GroupedLoRABuffers
    from mole_serve.sharding import ShardDims, TensorShard
    from mole_serve.slots import SlotLimits

    names = list(adapters)
    projs = ("q_proj", "k_proj", "v_proj")
    buffers = GroupedLoRABuffers(SlotLimits(len(names), 8, 6),
                                 [ShardDims.of(ODD_BASE, p, TensorShard()) for p in projs], projs)
    for slot, name in enumerate(names):
        buffers.fill(slot, adapters[name], adapters[name].layers[1])
    q = buffers.stack().member(0)
    lora_slots = buffers.lora_slots[0]
    assert {names[s] for s in lora_slots} == {"topk", "dynamic", "lora"}  # LoRA on q
    assert {names[s] for s in buffers.routed_slots[0]} == {"dynmole"}
    g = torch.Generator().manual_seed(3)
    slots = torch.randint(-1, len(names), (47,), generator=g)
    x = torch.randn(47, H, generator=g)
    expected, expected_uses = reference.gated_lora_delta(x, slots, q)
    routed = reference.gated_route(reference.router_logits(x, slots, q.router), slots, q)
    got, uses = grouped.gated_lora_delta(x, slots, q, routed, tuple(range(len(names))),
                                         lora_slots)
    assert torch.equal(uses, expected_uses) and {names[s] for s in slots[uses].tolist()} == \
        {"topk", "dynamic", "lora", "dynmole"}
    assert rel_err(got[uses], expected[uses]) <= 1e-5
    plain = torch.isin(slots, torch.tensor(sorted(lora_slots)))
    alone, alone_uses = grouped.gated_lora_delta(x[plain], slots[plain], q, None,
                                                 tuple(sorted(lora_slots)), lora_slots)
    assert alone_uses.all() and rel_err(alone, expected[plain]) <= 1e-5


def test_router_logits_of_a_group_s_routers_equal_the_reference(adapters):
    """Several routers' logits at once (routing members of a group), stacked router by
    router; rows of a slot the step does not use stay 0."""
    names, stack, slots, used, g = mixed_batch(adapters, 45, seed=4)
    routers = torch.stack([stack.gated[p].router for p in ("q_proj", "v_proj", "up_proj")])
    x = torch.randn(45, H, generator=g)
    members, used = [0, 2], used[1:]
    got = grouped.router_logits(x, slots, routers, members, used).view(2, 45, -1)
    rows = torch.isin(slots, torch.tensor(used))
    assert not rows.all() and torch.equal(got[:, ~rows], torch.zeros_like(got[:, ~rows]))
    for index, member in enumerate(members):
        expected = reference.router_logits(x, slots, routers[member])
        assert rel_err(got[index, rows], expected[rows]) <= 1e-5
