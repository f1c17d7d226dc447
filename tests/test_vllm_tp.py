"""Tensor parallelism 2 in a real (CPU) vLLM engine: adapters sharded like the frozen layers
(`sharding.TensorShard`) must give the greedy tokens of the unsharded reference, DynMoLE
routers on the row-parallel o_proj and down_proj (whose inputs are split over the ranks,
their logits all-reduced) included, with KV heads split over the ranks or replicated."""

from __future__ import annotations

import pytest

from mole_serve.adapter import BaseShape
from mole_serve.config import MoleConfig
from tiny_model import make_tiny_llama
from vllm_helpers import ReferenceGenerator, make_mole_adapter, make_peft_lora, offline_llm

MAX_TOKENS = 8
PROMPTS = [[1, 17, 305, 44, 912, 8], [1, 600, 2, 77]]
ADAPTERS = ("mixlora", "dynmole", "peft", "dynmole-row")


# 2 KV heads split over the 2 ranks; 1 KV head (MQA) held whole by both, as vLLM replicates it
@pytest.fixture(scope="module", params=[2, 1], ids=["kv-split", "kv-replicated"])
def workspace(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("vllm_tp")
    base = BaseShape(hidden=128, intermediate=256, num_layers=2, num_heads=4,
                     num_kv_heads=request.param, head_dim=32)
    adapters = {
        "mixlora": make_mole_adapter(root / "mixlora", MoleConfig(
            "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj")), base, seed=41, as_bin=True),
        "dynmole": make_mole_adapter(root / "dynmole", MoleConfig(
            "dynmole", num_experts=3, r=4, lora_alpha=8, top_p=0.75,
            target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")),
            base, seed=42),
        "peft": make_peft_lora(root / "peft", base, seed=43),
        "dynmole-row": make_mole_adapter(root / "dynmole-row", MoleConfig(
            "dynmole", num_experts=3, r=4, lora_alpha=8, top_p=0.6,
            target_modules=("o_proj", "gate_proj", "down_proj")), base, seed=44),
    }
    model = make_tiny_llama(root / "tiny-llama", kv_heads=request.param)
    return {"root": root, "model": model, "adapters": adapters}


@pytest.fixture(scope="module")
def engine(workspace):
    with offline_llm(workspace["model"], tensor_parallel_size=2,
                     distributed_executor_backend="mp", max_model_len=64,
                     max_num_batched_tokens=128, max_cpu_loras=3) as llm:
        from vllm.lora.request import LoRARequest

        requests = {name: LoRARequest(name, i + 1, str(workspace["root"] / name))
                    for i, name in enumerate(ADAPTERS)}
        yield llm, requests


@pytest.mark.slow
def test_tp2_matches_unsharded_reference_in_mixed_batches(engine, workspace):
    from vllm import SamplingParams
    llm, requests = engine
    reference = ReferenceGenerator(workspace["model"], list(workspace["adapters"].values()))
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (None, *ADAPTERS)]
    outputs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for _, i in jobs],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                          ignore_eos=True),
                           lora_request=[requests[n] if n else None for n, _ in jobs],
                           use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert got == [reference.greedy(PROMPTS[i], MAX_TOKENS, n) for n, i in jobs]
    assert len({tuple(ids) for ids in got[:5]}) == 5, "adapters must change the output"
