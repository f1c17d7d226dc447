"""Llama-family checkpoints other than Llama, with their config.json unmodified, are served by
the MoLE Llama class: Qwen2 (q/k/v biases, tied embeddings) and Mistral (sliding-window
attention, here narrower than the sequence so that ignoring it changes the tokens), also in
Mistral's own format (params.json + consolidated.safetensors, `--load-format mistral`)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

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


def save_mistral_format(model, path: pathlib.Path) -> None:
    """The checkpoint as Mistral releases it: vLLM's Mistral renaming (and q/k rotary
    permutation) undone."""
    config = model.config
    path.mkdir()
    (path / "params.json").write_text(json.dumps({
        "dim": config.hidden_size, "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim, "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads, "n_kv_heads": config.num_key_value_heads,
        "norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size,
        "rope_theta": config.rope_parameters["rope_theta"],
        "sliding_window": config.sliding_window,
        "max_position_embeddings": config.max_position_embeddings}))
    renames = {"model.embed_tokens": "tok_embeddings", "lm_head": "output",
               "model.norm": "norm", "model.layers": "layers", "self_attn.q_proj": "attention.wq",
               "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
               "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
               "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
               "post_attention_layernorm": "ffn_norm", "input_layernorm": "attention_norm"}
    heads = {"wq": config.num_attention_heads, "wk": config.num_key_value_heads}
    tensors = {}
    for name, weight in model.state_dict().items():
        for hf, ours in renames.items():
            name = name.replace(hf, ours)
        proj = name.split(".")[-2]
        if proj in heads:  # rows of each head from rotate-half to interleaved pairs
            rows, cols = weight.shape
            weight = weight.view(heads[proj], 2, rows // heads[proj] // 2, cols) \
                .transpose(1, 2).reshape(rows, cols)
        tensors[name] = weight.contiguous()
    save_file(tensors, path / "consolidated.safetensors")


@pytest.fixture(scope="module", params=["qwen2", "mistral", "mistral-format"])
def workspace(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vllm_{request.param}")
    model = qwen2(root) if request.param == "qwen2" else mistral(root)
    model.save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    served, engine_args = root / "model", {}
    if request.param == "mistral-format":
        served = root / "consolidated"
        save_mistral_format(model, served)
        engine_args = dict(config_format="mistral", load_format="mistral",
                           tokenizer=str(root / "model"))
    adapter = make_mole_adapter(root / "mixlora", MoleConfig(
        "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
        target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")),
        BaseShape.from_hf_config(model.config), seed=1)
    return root, adapter, served, engine_args


def test_base_and_mole_adapter_match_reference(workspace):
    root, adapter, served, engine_args = workspace
    reference = ReferenceGenerator(root / "model", [adapter])
    expected = [reference.greedy(PROMPT, MAX_TOKENS), reference.greedy(PROMPT, MAX_TOKENS,
                                                                       "mixlora")]
    with offline_llm(served, **engine_args) as llm:
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
    model = mistral(tmp_path)
    model.save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(Exception, match=message):
        with offline_llm(tmp_path / "model"):
            pass

