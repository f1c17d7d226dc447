"""A server limited to one adapter family (`--additional-config '{"mole": {"families":
["mixlora"]}}'`) builds only that family's slot buffers, so every layer launches fewer kernels
(DynMoLE's per-linear routers are gone; attention keeps MixLoRA's LoRA as one expert), serves
MixLoRA adapters exactly as the full server does, and refuses DynMoLE adapters by name."""

from __future__ import annotations

import pytest
import torch

from mole_serve.config import MoleConfig
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import ReferenceGenerator, make_mole_adapter, metric_total, offline_llm

PROMPTS = [[1, 17, 305, 44, 912, 8], [1, 600, 2, 77]]
MAX_TOKENS = 8
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_mixlora_only_server(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "base")
    base = TINY_SHAPE
    mixlora = make_mole_adapter(tmp_path / "mixlora", MoleConfig(
        "mixlora-dynamic", num_experts=4, r=8, lora_alpha=16, top_p=0.7, target_modules=ALL),
        base, seed=4)
    make_mole_adapter(tmp_path / "dynmole", MoleConfig(
        "dynmole", num_experts=3, r=4, lora_alpha=8, target_modules=ALL), base, seed=5)
    reference = ReferenceGenerator(model_dir, [mixlora])
    expected = [reference.greedy(p, MAX_TOKENS, name) for name in (None, "mixlora")
                for p in PROMPTS]
    with offline_llm(model_dir, {"families": ["mixlora"], "routing_metrics": False}) as llm:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        def layout(model: torch.nn.Module):
            layer = model.model.layers[0]
            return (layer.self_attn.mole.gated["qkv"].a.shape[2], dict(layer.mlp.mole.gated),
                    layer.mlp.mole.mixlora.router.shape[1],
                    layer.self_attn.mole.routing_stats() + layer.mlp.mole.routing_stats())

        assert llm.apply_model(layout) == [(1, {}, 4, [])], \
            "one-expert attention LoRA, no per-linear FFN routers, MixLoRA FFN experts, " \
            "no routing counts (routing_metrics off)"
        request = LoRARequest("mixlora", 1, str(tmp_path / "mixlora"))
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in PROMPTS] * 2,
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
            lora_request=[None] * len(PROMPTS) + [request] * len(PROMPTS), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
        rejections = "mole_serve_adapter_rejections_total"
        rejected_before = metric_total(rejections, stage="engine")
        with pytest.raises(Exception, match=r"'dynmole'.*routing_strategy.*families this "
                                            r"server was started for \(\['mixlora'\]"):
            llm.llm_engine.add_lora(LoRARequest("dynmole", 2, str(tmp_path / "dynmole")))
        assert metric_total(rejections, stage="engine") == rejected_before + 1, \
            "counted as refused by the engine"
