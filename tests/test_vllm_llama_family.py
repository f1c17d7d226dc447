"""Llama-family checkpoints other than Llama, with their config.json unmodified, are served by
the MoLE Llama class: Qwen2 (q/k/v biases, tied embeddings) and Mistral (sliding-window
attention, here narrower than the sequence so that ignoring it changes the tokens)."""

from __future__ import annotations

import pytest
import torch

from mole_serve.adapter import BaseShape
from mole_serve.config import MoleConfig
from tiny_model import build_tokenizer
from vllm_helpers import ReferenceGenerator, make_mole_adapter, offline_llm

PROMPT = [1, 17, 305, 44, 912, 8, 77, 501, 23]
MAX_TOKENS = 10
SHAPE = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def qwen2(root):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **SHAPE))
    with torch.no_grad():          # visible biases, so a model that drops them fails
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def mistral(root):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(sliding_window=6, head_dim=32, **SHAPE))


@pytest.fixture(scope="module", params=[qwen2, mistral], ids=lambda f: f.__name__)
def workspace(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vllm_{request.param.__name__}")
    model = request.param(root)
    model.save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    adapter = make_mole_adapter(root / "mixlora", MoleConfig(
        "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
        target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")),
        BaseShape.from_hf_config(model.config), seed=1)
    return root, adapter


def test_base_and_mole_adapter_match_reference(workspace):
    root, adapter = workspace
    reference = ReferenceGenerator(root / "model", [adapter])
    expected = [reference.greedy(PROMPT, MAX_TOKENS), reference.greedy(PROMPT, MAX_TOKENS,
                                                                       "mixlora")]
    with offline_llm(root / "model") as llm:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        assert llm.llm_engine.model_config.architectures == ["MoleLlamaForCausalLM"]
        outputs = llm.generate(
            [{"prompt_token_ids": PROMPT}] * 2,
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
            lora_request=[None, LoRARequest("mixlora", 1, str(root / "mixlora"))],
            use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


@pytest.mark.parametrize("change, message", [
    ({"llama_4_scaling": {"original_max_position_embeddings": 64, "beta": 0.1}},
     "llama_4_scaling"),
    ({"hidden_act": "gelu"}, "SiLU MLP"),
], ids=["llama-4-scaling", "gelu"])
def test_configs_the_llama_layers_would_serve_wrongly_are_refused(tmp_path, change, message):
    """A Mistral-family config.json that the Llama layers cannot compute exactly."""
    import json
    model = mistral(tmp_path)
    model.save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(Exception, match=message):
        with offline_llm(tmp_path / "model"):
            pass
