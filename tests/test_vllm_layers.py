"""The served layers' slot buffers: filling slots in place must compute what
`stack.stack_layer` + `reference` compute, padding to the server's limits included, on both
backends (the Triton kernels run interpreted here). No vLLM needed."""

from __future__ import annotations

import pytest
import torch

from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.config import ATTENTION_PROJS, MoleConfig
from mole_serve.layers import FFNAdapters, ProjectionAdapters, SlotLimits, TokenSlots
from mole_serve.reference import FrozenFFN, mole_ffn, mole_projection
from mole_serve.stack import stack_layer

BASE = BaseShape(hidden=64, intermediate=96, num_layers=2, num_heads=2, num_kv_heads=1,
                 head_dim=32)
BACKENDS = {"reference": False, "kernels": True}


def adapters():
    g = torch.Generator().manual_seed(0)
    configs = [MoleConfig("mixlora", 3, 4, 8, ("q_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"), top_k=2),
               MoleConfig("dynmole", 4, 2, 4, ("k_proj", "v_proj", "up_proj", "down_proj")),
               MoleConfig("mixlora-dynamic", 2, 8, 8, ("gate_proj", "down_proj", "v_proj"))]
    return [init_adapter(c, BASE, f"a{i}", generator=g, b_std=0.1, router_std=0.5)
            for i, c in enumerate(configs)]


def served_layer(limits: SlotLimits, slots: torch.Tensor, use_kernels: bool):
    token_slots = TokenSlots(limits.slots)
    token_slots.buffer = slots
    return (FFNAdapters(limits, BASE, 1, token_slots, use_kernels),
            ProjectionAdapters(limits, BASE, 1, token_slots, ATTENTION_PROJS, use_kernels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_filled_slots_compute_what_stack_layer_computes(backend):
    mix, dyn, dynamic = adapters()
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(-1, 4, (29,), generator=g)
    ffn, attention = served_layer(SlotLimits(slots=4, rank=8, experts=5), slots,
                                  BACKENDS[backend])
    # Slot 3 first holds an adapter that is then replaced: refills must not leave residue.
    for slot, adapter in ((3, mix), (0, dyn), (1, mix), (3, dynamic), (2, None)):
        ffn.fill(slot, adapter)
        attention.fill(slot, adapter)
    expected_stack = stack_layer([dyn, mix, None, dynamic], 1, BASE)

    frozen = FrozenFFN(*(torch.randn(s, generator=g) / 8 for s in ((96, 64), (96, 64), (64, 96))))
    x = torch.randn(29, 64, generator=g)
    batch = ffn.slot_batch(29)
    g0, u0 = x @ frozen.gate.T, x @ frozen.up.T
    g1, u1 = (ffn.project(y, x, batch, p) for y, p in ((g0, "gate_proj"), (u0, "up_proj")))
    h = frozen.act(g1) * u1
    h, routed = ffn.mix_experts(h, g1, u1, x, batch)
    y = ffn.add_down_delta(ffn.project(h @ frozen.down.T, h, batch, "down_proj"), batch, routed)
    torch.testing.assert_close(y, mole_ffn(x, frozen, slots, expected_stack))

    # q/k/v arrive as column views of vLLM's fused qkv output.
    qkv_weight = torch.randn(64 + 32 + 32, 64, generator=g) / 8
    views = (x @ qkv_weight.T).split([64, 32, 32], dim=-1)
    for proj, y, weight in zip(("q_proj", "k_proj", "v_proj"), views,
                               qkv_weight.split([64, 32, 32])):
        torch.testing.assert_close(attention.project(y, x, batch, proj),
                                   mole_projection(x, weight, slots, proj, expected_stack))
    weight = torch.randn(64, 64, generator=g) / 8
    torch.testing.assert_close(attention.project(x @ weight.T, x, batch, "o_proj"),
                               mole_projection(x, weight, slots, "o_proj", expected_stack))


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_and_other_adapters_tokens_are_untouched(backend):
    mix, dyn, _ = adapters()
    slots = torch.tensor([-1, 2, 0, -1, 1, 2])
    ffn, _ = served_layer(SlotLimits(slots=3, rank=4, experts=4), slots, BACKENDS[backend])
    ffn.fill(0, mix)
    ffn.fill(1, dyn)
    x = torch.randn(6, 64)
    u0 = torch.randn(6, 96)  # an up_proj output
    out = ffn.project(u0.clone(), x, ffn.slot_batch(6), "up_proj")
    dynmole_rows = slots.eq(1)          # MixLoRA's FFN experts are not a per-linear delta
    assert torch.equal(out[~dynmole_rows], u0[~dynmole_rows])
    assert not torch.isclose(out[dynmole_rows], u0[dynmole_rows]).all()
