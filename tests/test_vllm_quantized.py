"""MoLE adapters on a quantised base: a 4-bit AWQ checkpoint of the tiny Llama (written here,
as AutoAWQ lays it out) served with MixLoRA, DynMoLE and a plain PEFT LoRA in one batch. The
adapters' layers take the inputs and outputs of vLLM's quantised GEMMs, so each request's
prompt log-probabilities must equal the reference on the dequantised weights (bf16: vLLM's CPU
AWQ kernel takes no fp32), on both backends."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mole_serve.config import MoleConfig
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import ReferenceGenerator, make_mole_adapter, make_peft_lora, offline_llm

PROMPTS = [[1, 5, 5, 5, 400, 123, 250, 31, 999], [1, 17, 305, 44, 912, 8, 77, 501, 23, 6]]
ADAPTERS = ("mixlora", "dynmole", "peft")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP_SIZE = 32
# AutoAWQ's packing: nibble i of each int32 holds column AWQ_NIBBLE_COLUMNS[i] of its 8.
AWQ_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)
# bf16 noise: up to 0.055 on both backends (0.26 between the AWQ and the original weights);
# each adapter moves some log-probability by more than 1.
LOGPROB_ATOL = 0.15


def quantize_awq(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A [out, in] weight as 4-bit AWQ (asymmetric, groups of GROUP_SIZE input rows):
    (qweight, qzeros, scales) and the dequantised weight those encode."""
    w = weight.t().float().reshape(-1, GROUP_SIZE, weight.shape[0])  # [groups, group, out]
    low, high = w.amin(1), w.amax(1)
    scales = ((high - low) / 15).clamp_min(1e-6).half()
    zeros = (-low / scales.float()).round().clamp(0, 15)
    codes = (w / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15)
    dequantized = ((codes - zeros[:, None]) * scales.float()[:, None]).reshape(-1, weight.shape[0])
    return ({"qweight": pack_awq(codes.reshape(-1, weight.shape[0])), "qzeros": pack_awq(zeros),
             "scales": scales}, dequantized.t().contiguous())


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit codes -> [rows, cols / 8] int32 in AutoAWQ's nibble order."""
    groups = codes.long().reshape(codes.shape[0], -1, 8)
    packed = torch.zeros(groups.shape[:2], dtype=torch.long)
    for nibble, column in enumerate(AWQ_NIBBLE_COLUMNS):
        packed |= groups[..., column] << (4 * nibble)
    return (packed - ((packed >> 31) << 32)).int()  # the top nibble's high bit is the sign


def write_awq_checkpoint(model_dir: pathlib.Path, awq_dir: pathlib.Path,
                         dequantized_dir: pathlib.Path) -> None:
    """The model as an AWQ checkpoint, and as an fp32 one of the weights that AWQ encodes."""
    for path in (awq_dir, dequantized_dir):
        shutil.copytree(model_dir, path)
    awq, dequantized = {}, {}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rpartition(".")[2] in LINEARS:
            parts, dequantized[name] = quantize_awq(tensor)
            awq.update({f"{module}.{part}": value for part, value in parts.items()})
        else:
            awq[name], dequantized[name] = tensor.half(), tensor
    save_file(awq, awq_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, dequantized_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((awq_dir / "config.json").read_text())
    config.update(torch_dtype="float16", quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
        "version": "gemm"})
    (awq_dir / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_quantized")
    write_awq_checkpoint(make_tiny_llama(root / "tiny-llama"), root / "awq", root / "dequantized")
    adapters = [
        make_mole_adapter(root / "mixlora", MoleConfig(
            "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2, target_modules=LINEARS),
            TINY_SHAPE, seed=1),
        make_mole_adapter(root / "dynmole", MoleConfig(
            "dynmole", num_experts=3, r=4, lora_alpha=8, top_p=0.75,
            target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
            TINY_SHAPE, seed=2),
        make_peft_lora(root / "peft", TINY_SHAPE, seed=3)]
    return root, ReferenceGenerator(root / "dequantized", adapters, dtype="bfloat16")


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_adapters_on_an_awq_base_match_the_dequantised_reference(workspace, backend):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    root, reference = workspace
    names = [None, *ADAPTERS]
    with offline_llm(root / "awq", {"backend": backend}, dtype="bfloat16", max_loras=3) as llm:
        (gate_up,) = llm.apply_model(lambda model: type(
            model.model.layers[0].mlp.gate_up_proj.base_layer.quant_method).__name__)
        assert "AWQ" in gate_up, f"the base is not served quantised ({gate_up})"
        requests = {name: LoRARequest(name, i + 1, str(root / name))
                    for i, name in enumerate(ADAPTERS)}
        jobs = [(name, prompt) for prompt in PROMPTS for name in names]
        outputs = llm.generate(
            [{"prompt_token_ids": prompt} for _, prompt in jobs],
            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
            lora_request=[requests[name] if name else None for name, _ in jobs],
            use_tqdm=False)
    for (name, prompt), output in zip(jobs, outputs, strict=True):
        got = torch.tensor([entry[token].logprob for entry, token
                            in zip(output.prompt_logprobs[1:], prompt[1:], strict=True)])
        expected = reference.prompt_logprobs(prompt, name)
        torch.testing.assert_close(got, expected, rtol=0, atol=LOGPROB_ATOL,
                                   msg=lambda message: f"{name}: {message}")
        if name:
            effect = (expected - reference.prompt_logprobs(prompt)).abs().max()
            assert effect > 4 * LOGPROB_ATOL, f"{name} barely changes the logprobs"
