"""Soak: 1,000 requests over six adapters (four MoLE strategies, two plain PEFT LoRAs) and the
base model through one in-process engine with fewer slots (3) and CPU cache entries (4) than
adapters, while adapters are unloaded and loaded between steps (in-flight ones included,
which makes the worker reload them). No request may fail, and each must produce exactly the
greedy tokens of the same request served alone."""

from __future__ import annotations

import random

import pytest

from mole_serve.config import MoleConfig
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import make_mole_adapter, make_peft_lora, offline_llm

NUM_REQUESTS = 1000
MAX_TOKENS = 4
MAX_IN_FLIGHT = 24
CHURN_EVERY_STEPS = 7
PROMPTS = [[1, 17, 305, 44, 912, 8], [1, 600, 2, 77], [1, 5, 5, 400, 123, 250, 31]]
BASE = TINY_SHAPE
ATTENTION_AND_FFN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")
MOLE_CONFIGS = {
    "topk": MoleConfig("mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
                       target_modules=ATTENTION_AND_FFN),
    "dynamic": MoleConfig("mixlora-dynamic", num_experts=3, r=4, lora_alpha=8, top_p=0.8,
                          target_modules=("o_proj", "gate_proj", "up_proj", "down_proj")),
    "switch": MoleConfig("mixlora-switch", num_experts=4, r=8, lora_alpha=16,
                         target_modules=("gate_proj", "down_proj")),
    "dynmole": MoleConfig("dynmole", num_experts=3, r=4, lora_alpha=8, top_p=0.75,
                          target_modules=("q_proj", "v_proj", "gate_proj", "down_proj")),
}
PEFT_ADAPTERS = ("peft-a", "peft-b")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_soak")
    model_dir = make_tiny_llama(root / "tiny-llama")
    for seed, (name, config) in enumerate(MOLE_CONFIGS.items()):
        make_mole_adapter(root / name, config, BASE, seed=20 + seed, as_bin=name == "topk")
    for seed, name in enumerate(PEFT_ADAPTERS):
        make_peft_lora(root / name, BASE, seed=30 + seed)
    with offline_llm(model_dir, max_model_len=64, max_num_seqs=MAX_IN_FLIGHT, max_loras=3,
                     max_cpu_loras=4) as llm:
        from vllm.lora.request import LoRARequest

        names = (*MOLE_CONFIGS, *PEFT_ADAPTERS)
        yield llm.llm_engine, {name: LoRARequest(name, i + 1, str(root / name))
                               for i, name in enumerate(names)}


def alone(engine_and_loras, model: str | None, prompt: list[int]) -> list[int]:
    """The greedy tokens of one request, alone in the engine."""
    engine, loras = engine_and_loras
    engine.add_request("alone", {"prompt_token_ids": prompt}, greedy(),
                       lora_request=loras[model] if model else None)
    tokens = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = list(output.outputs[0].token_ids)
    return tokens


def greedy():
    from vllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.slow
def test_thousand_requests_with_adapter_churn_match_requests_served_alone(engine):
    llm_engine, loras = engine
    models = [None, *loras]
    expected = {(m, i): alone(engine, m, p) for m in models for i, p in enumerate(PROMPTS)}
    assert len({tuple(v) for v in expected.values()}) > len(PROMPTS), "adapters must differ"

    rng = random.Random(0)
    jobs = [(rng.choice(models), rng.randrange(len(PROMPTS))) for _ in range(NUM_REQUESTS)]
    pending, in_flight, results, failures = list(enumerate(jobs)), {}, {}, []
    churn = {"unloaded": 0, "loaded": 0}
    step = 0
    while pending or llm_engine.has_unfinished_requests():
        while pending and len(in_flight) < MAX_IN_FLIGHT:
            index, (model, prompt) = pending.pop(0)
            in_flight[str(index)] = (model, prompt)
            llm_engine.add_request(str(index), {"prompt_token_ids": PROMPTS[prompt]}, greedy(),
                                   lora_request=loras[model] if model else None)
        for output in llm_engine.step():
            if not output.finished:
                continue
            job = in_flight.pop(output.request_id)
            completion = output.outputs[0]
            if completion.finish_reason != "length":
                failures.append((output.request_id, job, completion.finish_reason))
            results[int(output.request_id)] = list(completion.token_ids)
        step += 1
        if step % CHURN_EVERY_STEPS == 0:
            # Unload one cached adapter (its requests may still be running: the worker
            # reloads it at the next step) and load another ahead of its requests.
            loaded = sorted(llm_engine.list_loras())
            if loaded:
                churn["unloaded"] += llm_engine.remove_lora(rng.choice(loaded))
            churn["loaded"] += llm_engine.add_lora(loras[rng.choice(list(loras))])

    assert failures == []
    assert len(results) == NUM_REQUESTS
    mismatches = [(i, jobs[i], results[i], expected[jobs[i]]) for i in range(NUM_REQUESTS)
                  if results[i] != expected[jobs[i]]]
    assert mismatches == [], f"{len(mismatches)} responses differ from serving alone"
    assert churn["unloaded"] >= 20 and churn["loaded"] >= 20, churn
    assert {model for model, _ in jobs} == set(models)
