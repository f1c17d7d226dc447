"""The two forms of the reference math agree, and a mixed batch equals each adapter alone.

The rewritten, slot-stacked form is what kernels and the vLLM layer are tested against; it
must equal the literal per-expert form MoE-PEFT computes (fp32 <= 1e-5) for every strategy,
and base tokens (slot -1) must come out bit-identical to the frozen model.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import ODD_BASE, configs, random_adapters, rel_err
from mole_serve.reference import (FrozenFFN, ffn_literal, mole_ffn, mole_projection,
                                  projection_literal)
from mole_serve.stack import stack_layer

H, I = ODD_BASE.hidden, ODD_BASE.intermediate


def frozen(seed: int = 3, dtype=torch.float32) -> FrozenFFN:
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    return FrozenFFN(w(I, H), w(I, H), w(H, I))


@pytest.mark.parametrize("name", list(configs()))
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_rewritten_ffn_equals_literal_per_strategy(adapters, name, tokens):
    adapter = adapters[name]
    base = frozen()
    stack = stack_layer([adapter], 0, ODD_BASE)
    x = torch.randn(tokens, H)
    literal = ffn_literal(x, base, adapter.layers[0], adapter.config)
    rewritten = mole_ffn(x, base, torch.zeros(tokens, dtype=torch.long), stack)
    assert rel_err(rewritten, literal) <= 1e-5
    assert rel_err(literal, base(x)) > 1e-3, "the adapter must visibly change the output"


def test_mixed_batch_equals_each_adapter_alone_and_base_is_bit_identical(adapters):
    names = list(adapters)
    slots_of = [adapters[n] for n in names] + [None]  # an empty slot too
    stack = stack_layer(slots_of, 1, ODD_BASE)
    base = frozen(seed=5)
    torch.manual_seed(0)
    x = torch.randn(301, H)
    slots = torch.randint(-1, len(names), (301,))
    y = mole_ffn(x, base, slots, stack)
    for slot, name in enumerate(names):
        rows = slots == slot
        alone = ffn_literal(x[rows], base, adapters[name].layers[1], adapters[name].config)
        assert rel_err(y[rows], alone) <= 1e-5, name
    rows = slots < 0
    assert torch.equal(y[rows], base(x)[rows])


@pytest.mark.parametrize("proj", ["q_proj", "v_proj", "o_proj", "k_proj"])
def test_attention_projection_mixed_batch(adapters, proj):
    names = list(adapters)
    stack = stack_layer([adapters[n] for n in names], 0, ODD_BASE)
    fan_in, fan_out = ODD_BASE.in_out(proj)
    weight = torch.randn(fan_out, fan_in) / fan_in ** 0.5
    x = torch.randn(64, fan_in)
    slots = torch.arange(64) % (len(names) + 1) - 1
    y = mole_projection(x, weight, slots, proj, stack)
    for slot, name in enumerate(names):
        rows = slots == slot
        alone = projection_literal(x[rows], weight, proj, adapters[name].layers[0],
                                   adapters[name].config)
        assert rel_err(y[rows], alone) <= 1e-5, name
    assert torch.equal(y[slots < 0], F.linear(x, weight)[slots < 0])


def test_bf16_base_tokens_stay_bit_identical(adapters):
    """A bf16 server must not perturb base-model requests batched with adapter requests."""
    base = frozen(dtype=torch.bfloat16)
    stack = stack_layer(list(adapters.values()), 0, ODD_BASE)
    x = torch.randn(40, H, dtype=torch.bfloat16)
    slots = torch.arange(40) % 3 - 1
    y = mole_ffn(x, base, slots, stack)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[slots < 0], base(x)[slots < 0])


def test_rank_and_expert_padding_is_exact():
    """Adapters of different r and E share one stack: padding must not change a result."""
    small = random_adapters(seed=1)["top1"]      # E=3, r=4
    big = random_adapters(seed=2)["dynamic"]     # E=5, r=6
    base = frozen()
    x = torch.randn(20, H)
    slots = torch.zeros(20, dtype=torch.long)
    alone = mole_ffn(x, base, slots, stack_layer([small], 0, ODD_BASE))
    padded = mole_ffn(x, base, slots, stack_layer([small, big], 0, ODD_BASE))
    assert rel_err(padded, alone) <= 1e-6


def test_empty_slots_and_bf16_stacks(adapters):
    """Base tokens next to an empty slot 0 get finite routing (zero weights), and a stack
    stored in bf16 computes in fp32 like an fp32 stack holding the same rounded values."""
    from mole_serve.reference import mixlora_route

    stack = stack_layer([None, adapters["topk"], adapters["dynmole"]], 0, ODD_BASE)
    x = torch.randn(30, H)
    slots = torch.arange(30) % 3 - 1          # -1 (base), 0 (empty), 1 ...
    slots[slots == 0] = -1
    weights, _, uses = mixlora_route(x, slots, stack.ffn)
    assert torch.isfinite(weights).all() and not weights[~uses].any()
    base = frozen()
    y32 = mole_ffn(x, base, slots, stack)
    low = stack_layer([None, adapters["topk"], adapters["dynmole"]], 0, ODD_BASE).to(
        dtype=torch.bfloat16)
    rounded = stack_layer([None, adapters["topk"], adapters["dynmole"]], 0, ODD_BASE)
    for part in [rounded.ffn, *rounded.gated.values(), *rounded.lora.values()]:
        for name in ("gate_up_a", "gate_up_b", "down_a", "down_b", "a", "b"):
            if hasattr(part, name):
                setattr(part, name, getattr(part, name).bfloat16().float())
    assert rel_err(mole_ffn(x, base, slots, low), mole_ffn(x, base, slots, rounded)) <= 1e-6
    assert rel_err(mole_ffn(x, base, slots, low), y32) <= 2e-2


def test_tokens_are_taken_in_chunks_that_bound_the_gathers(adapters, monkeypatch):
    """Per-token gathers (expert factors, routers, plain LoRA) stay under GATHER_BUDGET
    elements whatever the token count, and chunking changes no result: each row is computed
    alone."""
    from mole_serve import reference

    names = list(adapters)
    stack = stack_layer([adapters[n] for n in names], 1, ODD_BASE)
    base = frozen(seed=7)
    x = torch.randn(301, H)
    q_weight = torch.randn(ODD_BASE.in_out("q_proj")[1], H) / H ** 0.5
    slots = torch.randint(-1, len(names), (301,), generator=torch.Generator().manual_seed(1))
    gathered = []
    gather, slot_rows = reference._gather, reference._slot_rows

    def counted(table, slot, ids):
        out = gather(table, slot, ids)
        gathered.append(out.numel())
        return out

    def counted_rows(table, slot):  # routers and plain LoRA: one row per token
        out = slot_rows(table, slot)
        gathered.append(out.numel())
        return out

    def run(budget: int) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor]]:
        gathered.clear()
        monkeypatch.setattr(reference, "GATHER_BUDGET", budget)
        outputs = (mole_ffn(x, base, slots, stack),
                   mole_projection(x, q_weight, slots, "q_proj", stack))
        return list(gathered), outputs

    monkeypatch.setattr(reference, "_gather", counted)
    monkeypatch.setattr(reference, "_slot_rows", counted_rows)
    whole_sizes, whole = run(1 << 30)
    budget = 40_000  # a few tokens' worth of the widest gathers here
    chunk_sizes, chunked = run(budget)
    assert max(whole_sizes) > 10 * budget, "the check must need chunks"
    assert len(chunk_sizes) > 10 * len(whole_sizes) and max(chunk_sizes) <= budget
    for ours, unchunked in zip(chunked, whole):
        assert rel_err(ours, unchunked) <= 1e-6
    assert torch.equal(chunked[0][slots < 0], whole[0][slots < 0])


def test_chunking_leaves_the_token_count_symbolic_under_torch_compile(adapters, monkeypatch):
    """vLLM compiles the model with a dynamic token count; a loop over chunks would fix it."""
    from mole_serve import reference

    stack = stack_layer([adapters[n] for n in adapters], 1, ODD_BASE)
    base = frozen(seed=7)
    monkeypatch.setattr(reference, "GATHER_BUDGET", 40_000)  # eager: many chunks
    torch._dynamo.reset()
    compiled = torch.compile(mole_ffn, backend="eager", fullgraph=True)
    for tokens in (33, 70):
        x = torch.randn(tokens, H)
        slots = torch.arange(tokens) % (len(adapters) + 1) - 1
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(slots, 0)
        assert rel_err(compiled(x, base, slots, stack), mole_ffn(x, base, slots, stack)) <= 1e-6
