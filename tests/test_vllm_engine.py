"""MoLE serving inside a real (CPU, in-process) vLLM engine.

One engine serves two MoLE adapters (MixLoRA top-k with attention LoRA, as MoE-PEFT's `.bin`;
DynMoLE, as safetensors) and a plain PEFT LoRA with two slots and a CPU cache of two, so
adapters are evicted, reloaded and moved between slots while the tests run. Greedy tokens must
equal a transformers + `mole_serve.reference` generation, alone and in batches mixed with
base-model requests (which also catches vLLM's CPU "-1 slot" bug). Every test runs on both
backends: the reference math (the CPU default) and the Triton kernels (interpreted here), the
GPU path with its once-per-step token plan and in-kernel routing metrics; on a GPU also as
vLLM serves by default there, compiled (`fullgraph=True`) and replayed from CUDA graphs.
"""

from __future__ import annotations


import pytest
import torch

from mole_serve.config import MoleConfig
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import (ReferenceGenerator, make_mole_adapter, make_peft_lora, metric_total,
                          offline_llm)

MAX_TOKENS = 12
PROMPTS = [[1, 17, 305, 44, 912, 8], [1, 600, 2, 77], [1, 5, 5, 5, 400, 123, 250, 31, 999],
           [1, 42]]
ADAPTERS = ("mixlora", "dynmole", "peft")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_engine")
    model_dir = make_tiny_llama(root / "tiny-llama")
    base = TINY_SHAPE
    mixlora = make_mole_adapter(root / "mixlora", MoleConfig(
        "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")), base, seed=1, as_bin=True)
    dynmole = make_mole_adapter(root / "dynmole", MoleConfig(
        "dynmole", num_experts=3, r=4, lora_alpha=8, top_p=0.75,
        target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        base, seed=2)
    peft = make_peft_lora(root / "peft", base, seed=3)
    return {"root": root, "model": model_dir, "base": base,
            "adapters": {"mixlora": mixlora, "dynmole": dynmole, "peft": peft}}


@pytest.fixture(scope="module")
def reference(workspace):
    return ReferenceGenerator(workspace["model"], list(workspace["adapters"].values()))


@pytest.fixture(scope="module")
def expected(workspace, reference):
    """Reference greedy tokens per (adapter or None, prompt index)."""
    return {(name, i): reference.greedy(prompt, MAX_TOKENS, name)
            for i, prompt in enumerate(PROMPTS) for name in (None, *workspace["adapters"])}


@pytest.fixture(scope="module", params=["reference", "kernels", "kernels-compiled"])
def engine(workspace, request):
    backend, _, compiled = request.param.partition("-")
    if compiled and not torch.cuda.is_available():
        pytest.skip("vLLM compiles and captures CUDA graphs on a GPU only (its CPU backend "
                    "runs LoRA models eagerly)")
    with offline_llm(workspace["model"], {"metrics_interval_s": 0, "backend": backend},
                     # block_size: the CPU default, 128, leaves no full block in a prompt
                     max_cpu_loras=2, enforce_eager=not compiled, block_size=32) as llm:
        from vllm.lora.request import LoRARequest

        (plan_block_m, compact), = llm.apply_model(
            lambda model: (model.mole_token_slots.plan_block_m, model.mole_token_slots.compact))
        assert (plan_block_m is not None) == (backend == "kernels")
        # vLLM's CPU backend runs eagerly: its steps' MoLE rows are read on the host there
        assert compact == (backend == "reference" and not torch.cuda.is_available())
        if compiled:  # not silently eager
            from vllm.config import CompilationMode, CUDAGraphMode
            compilation = llm.llm_engine.vllm_config.compilation_config
            assert compilation.mode != CompilationMode.NONE
            assert compilation.cudagraph_mode != CUDAGraphMode.NONE
        requests = {name: LoRARequest(name, i + 1, str(workspace["root"] / name))
                    for i, name in enumerate(ADAPTERS)}
        yield llm, requests


def generate(engine, jobs: list[tuple[str | None, int]]) -> list[list[int]]:
    """Greedy tokens for (adapter name or None, prompt index) jobs, all in one call."""
    from vllm import SamplingParams
    llm, requests = engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for _, i in jobs], params,
                           lora_request=[requests[n] if n else None for n, _ in jobs],
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_served_model_is_mole_and_base_requests_match_transformers(engine, expected):
    llm, _ = engine
    assert llm.llm_engine.model_config.architectures == ["MoleLlamaForCausalLM"]
    jobs = [(None, i) for i in range(len(PROMPTS))]
    assert generate(engine, jobs) == [expected[job] for job in jobs]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_alone_matches_reference(engine, expected, adapter):
    jobs = [(adapter, i) for i in range(len(PROMPTS))]
    got = generate(engine, jobs)
    assert got == [expected[job] for job in jobs]
    assert got != [expected[(None, i)] for i in range(len(PROMPTS))], \
        f"{adapter} does not change the output: this test could not fail"


def test_mixed_batch_matches_reference(engine, expected):
    """Base and all three adapters in one call: more adapters than slots, so the scheduler
    rotates them through the two slots while base requests share every batch."""
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (None, *ADAPTERS)]
    assert generate(engine, jobs) == [expected[job] for job in jobs]


def test_prompt_logprobs_are_the_adapters(engine, reference):
    """`prompt_logprobs` (and `echo` with logprobs) score the prompt with the request's
    adapter, whatever shares the step. vLLM's CPU LoRA computes a request's prompt rows
    against the step's per-request indices (upstream #51594): its einsum fails on several
    requests and our -1 fix on any; with no logits (lm_head) LoRA in the step, none is
    applied."""
    from vllm import SamplingParams
    llm, requests = engine
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompt = PROMPTS[2]
    for names in ([None, "mixlora", "dynmole"], ["peft"], ["peft", "mixlora", None]):
        outputs = llm.generate([{"prompt_token_ids": prompt}] * len(names), params,
                               lora_request=[requests[n] if n else None for n in names],
                               use_tqdm=False)
        for name, output in zip(names, outputs, strict=True):
            got = torch.tensor([entry[token].logprob for entry, token
                                in zip(output.prompt_logprobs[1:], prompt[1:], strict=True)])
            expected = reference.prompt_logprobs(prompt, name)
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
            if name:
                assert not torch.allclose(expected, reference.prompt_logprobs(prompt),
                                          atol=1e-2), f"{name} does not change the logprobs"


def test_parallel_samples_each_use_the_requests_adapter(engine, reference):
    """`n` > 1: vLLM forks a request into child requests (sharing its prompt's cached
    blocks), each of which must carry the adapter. Every sampled token's logprob is the
    reference's for that adapter, given the prompt and the tokens the child sampled before."""
    from vllm import SamplingParams
    llm, requests = engine
    n, prompt = 3, PROMPTS[0]
    names = [None, *ADAPTERS]
    params = SamplingParams(n=n, temperature=1.0, seed=7, max_tokens=5, logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt}] * len(names), params,
                           lora_request=[requests[m] if m else None for m in names],
                           use_tqdm=False)
    for name, output in zip(names, outputs, strict=True):
        assert len(output.outputs) == n
        assert len({tuple(sample.token_ids) for sample in output.outputs}) > 1, \
            f"{name}: the samples are all alike: this test could not tell them apart"
        for sample in output.outputs:
            tokens = list(sample.token_ids)
            got = torch.tensor([entry[token].logprob
                                for entry, token in zip(sample.logprobs, tokens, strict=True)])
            expected = reference.prompt_logprobs(prompt + tokens, name)[len(prompt) - 1:]
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-3,
                                       msg=lambda message: f"{name}: {message}")


def test_prefix_cache_blocks_are_not_shared_across_adapters(engine, reference):
    """A prompt of several full KV blocks, served for the base model and each adapter in
    turn, then again: later requests find the prompt's blocks cached for another adapter
    (the KV of different adapters differs from the first layer on) and must not use them."""
    from vllm import SamplingParams
    llm, requests = engine
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = [1] + [(7 * i) % 997 + 2 for i in range(3 * block)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for name in (None, *ADAPTERS, *ADAPTERS[::-1], None):
        output = llm.generate([{"prompt_token_ids": prompt}], params,
                              lora_request=requests[name] if name else None, use_tqdm=False)
        assert list(output[0].outputs[0].token_ids) == reference.greedy(prompt, 4, name), name


def test_reloading_an_adapter_in_place_as_another_kind(engine, workspace):
    """`load_inplace` keeps the adapter's id and its slot; with a one-token prompt the first
    step's token mapping equals the last decode step's, so vLLM skips the mapping update:
    the MoLE / plain-LoRA split of the tokens must still follow the new kind."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    llm, requests = engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def tokens(request):
        out = llm.generate([{"prompt_token_ids": [1]}], params, lora_request=[request],
                           use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    kinds = ("mixlora", "peft", "mixlora", "dynmole")
    alone = {kind: tokens(requests[kind]) for kind in set(kinds)}
    assert len(set(map(tuple, alone.values()))) == 3, "the kinds must differ to be told apart"
    for kind in kinds:
        assert tokens(LoRARequest("swapped", 50, str(workspace["root"] / kind),
                                  load_inplace=True)) == alone[kind], kind


def _record_adapter_mappings(model):
    """Spy on vLLM's punica wrapper: the per-token adapter ids it gets each mapping change,
    the slot layout, and our layers' per-token slots at that moment."""
    from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY
    manager = model.lora_manager
    punica = manager.punica_wrapper_mapping[DEFAULT_LANGUAGE_WRAPPER_KEY]
    update = type(punica).update_metadata
    model.recorded_mappings = []

    def update_recorded(mapping, lora_index_to_id, *args, **kwargs):
        ours = model.mole_token_slots.slots[:len(mapping.index_mapping)].tolist()
        model.recorded_mappings.append((mapping.index_mapping, list(lora_index_to_id), ours))
        return update(punica, mapping, lora_index_to_id, *args, **kwargs)

    punica.update_metadata = update_recorded


def _stop_recording(model):
    del model.lora_manager.punica_wrapper_mapping[next(iter(
        model.lora_manager.punica_wrapper_mapping))].update_metadata
    return model.recorded_mappings


def test_vllm_lora_layers_and_mole_layers_each_see_only_their_tokens(engine, expected):
    """With LoRA on, vLLM wraps every linear in its own LoRA layer. MoLE tokens reach those
    as base tokens (adapter id 0: its kernels skip them), and plain-LoRA tokens reach our
    layers as base tokens (slot -1), so neither pays for the other's adapters."""
    llm, requests = engine
    ids = {name: request.lora_int_id for name, request in requests.items()}
    llm.apply_model(_record_adapter_mappings)
    try:
        jobs = [(name, i) for i in range(2) for name in (None, *ADAPTERS)]
        assert generate(engine, jobs) == [expected[job] for job in jobs]
    finally:
        recorded = llm.apply_model(_stop_recording)[0]
    assert recorded
    punica_ids, mole_slots = set(), set()
    for token_ids, slot_ids, our_slots in recorded:
        assert set(token_ids) <= {0, ids["peft"]}
        punica_ids |= set(token_ids)
        for token_id, slot in zip(token_ids, our_slots, strict=True):
            if slot >= 0:
                assert token_id == 0 and slot_ids[slot] in (ids["mixlora"], ids["dynmole"])
                mole_slots.add(slot_ids[slot])
    assert ids["peft"] in punica_ids
    assert mole_slots == {ids["mixlora"], ids["dynmole"]}


def test_malformed_mole_adapter_is_refused_and_engine_keeps_serving(engine, expected,
                                                                    workspace):
    from safetensors.torch import load_file, save_file
    from vllm.lora.request import LoRARequest

    bad = workspace["root"] / "bad-dynmole"
    bad.mkdir(exist_ok=True)  # once per backend
    source = workspace["root"] / "dynmole"
    (bad / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    key = "dynmole.layers.1.mlp.down_proj.experts.2.lora_B.weight"
    tensors[key] = torch.zeros(7, 4)
    save_file(tensors, str(bad / "adapter_model.safetensors"))

    llm, _ = engine
    with pytest.raises(Exception, match=r"bad-dynmole.*experts\.2\.lora_B.*shape \[128, 4\]"):
        llm.llm_engine.add_lora(LoRARequest("bad-dynmole", 99, str(bad)))
    jobs = [(None, 0), ("dynmole", 1)]
    assert generate(engine, jobs) == [expected[job] for job in jobs]


def test_a_request_ended_by_a_stop_string_is_counted(engine, expected, workspace):
    """vLLM's detokenizer, not the engine, ends a request on a stop string."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    llm, requests = engine
    tokens = expected[("mixlora", 0)]
    text = AutoTokenizer.from_pretrained(workspace["model"]).decode(tokens)
    stop = text[len(text) // 2:][:2]
    count = {"requests": lambda: metric_total("mole_serve_requests_total", adapter="mixlora"),
             "tokens": lambda: metric_total("mole_serve_generated_tokens_total",
                                            adapter="mixlora")}
    before = {key: f() for key, f in count.items()}
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            stop=[stop])
    output = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params,
                          lora_request=[requests["mixlora"]], use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "stop" and len(output.token_ids) < MAX_TOKENS, stop
    assert count["requests"]() - before["requests"] == 1
    assert count["tokens"]() - before["tokens"] == len(output.token_ids)


def test_metrics_count_requests_tokens_routing_and_evictions(engine, expected):
    """Requests, tokens and routing per adapter, counted in the engine (routing on the
    device, exported at the next step boundary: the trailing base request)."""
    names = ("mixlora", "dynmole", "peft", "(base)")
    series = {
        "requests": lambda a: metric_total("mole_serve_requests_total", adapter=a),
        "tokens": lambda a: metric_total("mole_serve_generated_tokens_total", adapter=a),
        "routed": lambda a: metric_total("mole_serve_experts_per_token_count", adapter=a),
        "experts": lambda a: metric_total("mole_serve_experts_per_token_sum", adapter=a),
        "entropy": lambda a: metric_total("mole_serve_routing_entropy_count", adapter=a),
        "ffn_selections": lambda a: metric_total("mole_serve_expert_selections_total",
                                                 adapter=a, router="ffn"),
        "slot_evictions": lambda a: metric_total("mole_serve_adapter_evictions_total",
                                                 adapter=a, place="slot"),
        "cpu_evictions": lambda a: metric_total("mole_serve_adapter_evictions_total",
                                                adapter=a, place="cpu_cache"),
    }
    generate(engine, [(None, 0)])  # exports what earlier tests' last step left
    before = {(key, a): f(a) for key, f in series.items() for a in names}
    for name in ADAPTERS:  # one at a time: 3 adapters through 2 slots evicts one
        jobs = [(name, i) for i in range(len(PROMPTS))]
        assert generate(engine, jobs) == [expected[job] for job in jobs]
    assert generate(engine, [(None, 0)]) == [expected[(None, 0)]]
    delta = {(key, a): f(a) - before[(key, a)] for key, f in series.items() for a in names}

    for name in ADAPTERS:
        assert delta[("requests", name)] == len(PROMPTS)
        assert delta[("tokens", name)] == len(PROMPTS) * MAX_TOKENS
    assert delta[("requests", "(base)")] == 1 and delta[("tokens", "(base)")] == MAX_TOKENS
    # Every token through every layer is routed once per router: MixLoRA's FFN router
    # (top-2 of 4: mean exactly 2 experts); DynMoLE's six per-linear routers.
    tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
    assert delta[("routed", "mixlora")] == 2 * tokens
    assert delta[("experts", "mixlora")] == 2 * delta[("routed", "mixlora")]
    assert delta[("ffn_selections", "mixlora")] == delta[("experts", "mixlora")]
    assert delta[("routed", "dynmole")] == 2 * 6 * tokens
    assert 1 <= delta[("experts", "dynmole")] / delta[("routed", "dynmole")] <= 3
    assert delta[("ffn_selections", "dynmole")] == 0, "DynMoLE has no FFN router"
    for name in ("mixlora", "dynmole"):
        assert delta[("entropy", name)] == delta[("routed", name)]
    for name in ("peft", "(base)"):
        assert delta[("routed", name)] == 0
    # one at a time, 3 adapters through 2 slots and a CPU cache of 2: the least recently
    # used (mixlora) leaves both
    assert delta[("slot_evictions", "mixlora")] >= 1
    assert delta[("cpu_evictions", "mixlora")] >= 1
    assert metric_total("mole_serve_adapter_loads_total", adapter="dynmole",
                        strategy="dynmole") >= 1
    assert metric_total("mole_serve_adapter_loads_total", adapter="peft", strategy="lora") >= 1
