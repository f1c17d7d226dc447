"""The transformers integration: per-row adapters in one forward, generation, detach."""

import dataclasses
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_adapters
from mole_serve.adapter import BaseShape
from mole_serve.errors import AdapterError
from mole_serve.hf import attach_adapters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                         vocab_size=300, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def adapters(model):
    assert BaseShape.from_hf_config(model.config).hidden == 96
    return random_adapters(seed=4)


def test_each_row_uses_its_adapter(model, adapters):
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        base = model(ids).logits
        attachment = attach_adapters(model, list(adapters.values()))
        try:
            alone = {}
            for name in adapters:
                with attachment.use(name):
                    alone[name] = model(ids).logits
                assert not torch.allclose(alone[name], base, atol=1e-3), name
            rows = [None, *adapters, None]
            with attachment.use(rows):
                mixed = model(ids.expand(len(rows), -1)).logits
            with attachment.use(None):
                assert torch.equal(model(ids).logits, base)
        finally:
            attachment.detach()
        assert torch.equal(model(ids).logits, base)
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-6)
    for i, name in enumerate(adapters, start=1):
        torch.testing.assert_close(mixed[i], alone[name][0], rtol=1e-5, atol=1e-5)


def test_generate_with_mixed_rows(model, adapters):
    ids = torch.randint(0, 300, (3, 6))
    attachment = attach_adapters(model, [adapters["topk"], adapters["dynmole"]])
    try:
        with torch.no_grad():
            with attachment.use(["topk", None, "dynmole"]):
                together = model.generate(ids, max_new_tokens=5, do_sample=False)
            for row, name in enumerate(["topk", None, "dynmole"]):
                with attachment.use(name):
                    alone = model.generate(ids[row:row + 1], max_new_tokens=5, do_sample=False)
                assert torch.equal(together[row], alone[0]), name
    finally:
        attachment.detach()


def test_errors(model, adapters):
    attachment = attach_adapters(model, [adapters["topk"]])
    try:
        with pytest.raises(KeyError, match="no adapter named 'nope'"):
            with attachment.use("nope"):
                pass
        with pytest.raises(ValueError, match="2 adapter choices for a batch of 3 rows"):
            with attachment.use(["topk", None]), torch.no_grad():
                model(torch.zeros(3, 4, dtype=torch.long))
    finally:
        attachment.detach()
    with pytest.raises(ValueError, match="unique"):
        attach_adapters(model, [adapters["topk"], adapters["topk"]])


def test_adapters_that_do_not_fit_the_model_are_refused_before_attaching(model):
    """An adapter loaded without `base=` gets the checks loading with it makes."""
    narrower = dataclasses.replace(BaseShape.from_hf_config(model.config), intermediate=48)
    adapter = random_adapters(base=narrower, seed=5)["topk"]
    with pytest.raises(AdapterError, match=r"gate_proj.experts.0.lora_B.weight: expected "
                                           r"shape \[200, 8\], found shape \[48, 8\]"):
        attach_adapters(model, [adapter])
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)


@pytest.mark.parametrize("change", [{"hidden_act": "quick_gelu"}, {"mlp_bias": True}])
def test_models_whose_mlp_the_reference_cannot_compute_are_refused(change):
    config = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                         vocab_size=300, **change)
    with pytest.raises(ValueError, match="is not one the reference computes"):
        attach_adapters(LlamaForCausalLM(config), [])


def test_plain_peft_lora_matches_peft(model, tmp_path):
    """A PEFT LoRA written by peft itself loads as our plain-LoRA adapter with PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    from mole_serve.checkpoint import load_adapter

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(
        r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        init_lora_weights=False, lora_dropout=0.0))
    ids = torch.randint(0, 300, (2, 9))
    try:
        with torch.no_grad():
            expected = peft_model(ids).logits
        peft_model.save_pretrained(tmp_path)
    finally:
        base = peft_model.unload()
    assert base is model
    adapter = load_adapter(tmp_path, "plain")
    assert adapter.config.is_plain_lora and adapter.config.scaling == 2.0
    attachment = attach_adapters(model, [adapter])
    try:
        with torch.no_grad(), attachment.use("plain"):
            ours = model(ids).logits
    finally:
        attachment.detach()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_activation_is_read_under_gemma_s_name_and_never_guessed():
    """Gemma2 names its MLP activation `hidden_activation`: base rows computed by the
    reference MLP beside an adapter's rows match the model (silu guessed for it did not);
    a config naming no activation is refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from mole_serve.adapter import init_adapter
    from mole_serve.config import MoleConfig
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=300)).eval()
    assert BaseShape.from_hf_config(gemma.config).hidden_act == "gelu_pytorch_tanh"
    adapter = init_adapter(MoleConfig("mixlora", 3, 4, 8, ("gate_proj", "up_proj")),
                           BaseShape.from_hf_config(gemma.config), "m", b_std=0.1)
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        base = gemma(ids).logits
        attachment = attach_adapters(gemma, [adapter])
        with attachment.use([None, "m"]):
            mixed = gemma(ids.expand(2, -1)).logits
        attachment.detach()
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-5)
    unnamed = types.SimpleNamespace(config=types.SimpleNamespace(
        hidden_size=96, intermediate_size=200, num_hidden_layers=1, num_attention_heads=3))
    with pytest.raises(ValueError, match="hidden_act None"):
        attach_adapters(unnamed, [])
