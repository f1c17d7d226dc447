"""Base-model requests on the MoLE server are bit-identical to stock vLLM (DESIGN §3)."""

from __future__ import annotations

import pytest

from mole_serve.adapter import BaseShape
from tiny_model import make_tiny_llama
from vllm_helpers import ENGINE_DTYPE, GPU_ONLY_ARGS, engine_env, make_peft_lora

MAX_TOKENS = 6
PROMPTS = [[1, 17, 305, 44, 912, 8], [1, 600, 2, 77], [1, 42]]


def base_logprobs(model_dir: str, **engine_kwargs) -> list[list[dict]]:
    """Top-5 logprobs of every greedy step, base model, all PROMPTS in one batch."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=ENGINE_DTYPE, enforce_eager=True,
              distributed_executor_backend="uni", max_model_len=128,
              max_num_batched_tokens=256, max_num_seqs=8, seed=0, **GPU_ONLY_ARGS,
              **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    del llm
    return [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
            for o in outputs]


def test_base_requests_are_bit_identical_to_stock_vllm(tmp_path_factory):
    model_dir = str(make_tiny_llama(tmp_path_factory.mktemp("parity") / "tiny-llama"))
    with pytest.MonkeyPatch.context() as env:
        for key, value in engine_env().items():
            env.setenv(key, value)
        stock = base_logprobs(model_dir)
        mole = base_logprobs(model_dir, max_lora_rank=8, max_loras=2,
                             additional_config={"mole": {"enabled": True, "max_experts": 4}})
    assert mole == stock        # exact floats, not approximately


def test_without_the_flag_plain_lora_serving_leaves_our_metrics_alone(tmp_path):
    """The plugin is installed in every vLLM process; without --enable-mole-adapters a plain
    LoRA is vLLM's alone: no mole_serve series count its load."""
    from prometheus_client import REGISTRY
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir = make_tiny_llama(tmp_path / "tiny-llama")
    make_peft_lora(tmp_path / "peft", BaseShape.from_hf_config(AutoConfig.from_pretrained(
        model_dir)), seed=0, rank=8)
    with pytest.MonkeyPatch.context() as env:
        for key, value in engine_env().items():
            env.setenv(key, value)
        llm = LLM(model=str(model_dir), dtype=ENGINE_DTYPE, enforce_eager=True,
                  distributed_executor_backend="uni", max_model_len=128, enable_lora=True,
                  max_lora_rank=8, max_loras=1, seed=0, **GPU_ONLY_ARGS)
        output = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                              SamplingParams(temperature=0.0, max_tokens=2),
                              lora_request=LoRARequest("stock-peft", 1, str(tmp_path / "peft")),
                              use_tqdm=False)
        del llm
    assert len(output[0].outputs[0].token_ids) == 2
    assert REGISTRY.get_sample_value("mole_serve_adapter_loads_total",
                                     {"adapter": "stock-peft", "strategy": "lora"}) is None
