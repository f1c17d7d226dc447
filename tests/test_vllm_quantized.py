"""MoLE adapters on quantised bases: checkpoints of the tiny Llama written here as AutoAWQ,
AutoGPTQ and llm-compressor (compressed-tensors 4-bit `pack-quantized` and W8A8 int8) lay
them out, each served with MixLoRA, DynMoLE and a plain PEFT LoRA in one batch. The adapters'
layers take the inputs and outputs of vLLM's quantised GEMMs, so each request's prompt
log-probabilities must equal the reference on the dequantised weights (bf16: vLLM's CPU
quantised kernels take no fp32), on both backends. Each checkpoint's packing is checked by
that same comparison: a misplaced nibble moves the logprobs by far more than the tolerance
(the zero points of symmetric GPTQ excepted: vLLM does not read them).
W8A8 runs only with `fix_cpu_lora_device_of_prepacked_weights` on a CPU (vLLM's LoRA
wrapper failed on its prepacked weights)."""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Callable, NamedTuple

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
SEQUENTIAL_NIBBLES = tuple(range(8))
# AutoAWQ's packing: nibble i of each int32 holds column AWQ_NIBBLE_COLUMNS[i] of its 8.
AWQ_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)
# Weight-only formats: bf16 noise, up to 0.081 on both backends (0.26 between the AWQ and the
# original weights). W8A8 also quantises activations, which the reference does not: up to
# 0.141. Each adapter moves some log-probability by more than 1.
WEIGHT_ONLY_ATOL, W8A8_ATOL = 0.15, 0.25
MIN_ADAPTER_EFFECT = 0.6  # on some logprob, in the reference: else a test that cannot fail


class Quantized(NamedTuple):
    """One linear's weight as a quantised checkpoint holds it."""

    tensors: dict[str, torch.Tensor]  # a linear's checkpoint tensors, by suffix
    dequantized: torch.Tensor         # the [out, in] weight they encode


def pack_nibbles(codes: torch.Tensor, dim: int, order: tuple[int, ...]) -> torch.Tensor:
    """4-bit codes packed 8 to an int32 along `dim`: nibble i of each int32 holds entry
    `order[i]` of its 8."""
    codes = codes.long().movedim(dim, -1)
    groups = codes.reshape(*codes.shape[:-1], -1, 8)
    packed = torch.zeros(groups.shape[:-1], dtype=torch.long)
    for nibble, entry in enumerate(order):
        packed |= groups[..., entry] << (4 * nibble)
    packed = packed - ((packed >> 31) << 32)  # the top nibble's high bit is the sign
    return packed.int().movedim(-1, dim).contiguous()


def symmetric_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [out, in] weight as signed 4-bit codes in groups of GROUP_SIZE inputs:
    (codes [out, in] in -8..7, fp16 scales [out, groups], the dequantised weight)."""
    w = weight.float().reshape(weight.shape[0], -1, GROUP_SIZE)
    scales = (w.abs().amax(2) / 7).clamp_min(1e-6).half()
    codes = (w / scales.float()[..., None]).round().clamp(-8, 7)
    return (codes.reshape(weight.shape), scales,
            (codes * scales.float()[..., None]).reshape(weight.shape))


def quantize_awq(weight: torch.Tensor) -> Quantized:
    """AutoAWQ GEMM: asymmetric, transposed ([in, out]), packed along the outputs."""
    w = weight.t().float().reshape(-1, GROUP_SIZE, weight.shape[0])  # [groups, group, out]
    low, high = w.amin(1), w.amax(1)
    scales = ((high - low) / 15).clamp_min(1e-6).half()
    zeros = (-low / scales.float()).round().clamp(0, 15)
    codes = (w / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15)
    dequantized = ((codes - zeros[:, None]) * scales.float()[:, None]).reshape(-1, weight.shape[0])
    return Quantized({"qweight": pack_nibbles(codes.reshape(-1, weight.shape[0]), 1,
                                              AWQ_NIBBLE_COLUMNS),
                      "qzeros": pack_nibbles(zeros, 1, AWQ_NIBBLE_COLUMNS), "scales": scales},
                     dequantized.t().contiguous())


def quantize_gptq(weight: torch.Tensor) -> Quantized:
    """AutoGPTQ, symmetric, no act-order: codes offset by 8, transposed and packed along the
    inputs; zero points stored minus one (its v1 format), packed along the outputs (vLLM
    reads no zero points for a symmetric checkpoint: only the layout is AutoGPTQ's here)."""
    codes, scales, dequantized = symmetric_codes(weight)
    zeros = torch.full_like(scales, 8, dtype=torch.long)
    return Quantized({"qweight": pack_nibbles(codes.t() + 8, 0, SEQUENTIAL_NIBBLES),
                      "qzeros": pack_nibbles(zeros.t() - 1, 1, SEQUENTIAL_NIBBLES),
                      "scales": scales.t().contiguous(),
                      "g_idx": torch.arange(weight.shape[1], dtype=torch.int32) // GROUP_SIZE},
                     dequantized)


def quantize_w8a8(weight: torch.Tensor) -> Quantized:
    """llm-compressor's W8A8 int8 (`int-quantized`): int8 weights with a scale per output
    channel (the activations are quantised per token by vLLM as it runs)."""
    scale = (weight.float().abs().amax(1, keepdim=True) / 127).clamp_min(1e-6).half()
    codes = (weight.float() / scale.float()).round().clamp(-128, 127)
    return Quantized({"weight": codes.to(torch.int8), "weight_scale": scale},
                     codes * scale.float())


def quantize_compressed_tensors(weight: torch.Tensor) -> Quantized:
    """llm-compressor's W4A16 `pack-quantized`: symmetric, codes offset by 8, packed along
    the inputs of the [out, in] weight."""
    codes, scales, dequantized = symmetric_codes(weight)
    return Quantized({"weight_packed": pack_nibbles(codes + 8, 1, SEQUENTIAL_NIBBLES),
                      "weight_scale": scales, "weight_shape": torch.tensor(weight.shape)},
                     dequantized)


class Format(NamedTuple):
    """A checkpoint format: how it quantises a weight, and how vLLM should serve it."""

    quantize: Callable[[torch.Tensor], Quantized]
    config: dict        # the checkpoint's quantization_config
    linear_method: str  # in the class names of vLLM's quantised linears' method and scheme
    logprob_atol: float = WEIGHT_ONLY_ATOL


FORMATS = {
    "awq": Format(quantize_awq, {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE,
                                 "zero_point": True, "version": "gemm"}, "AWQ"),
    "gptq": Format(quantize_gptq, {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE,
                                   "desc_act": False, "sym": True}, "GPTQ"),
    "compressed-tensors": Format(quantize_compressed_tensors, {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": GROUP_SIZE, "dynamic": False}}}}, "CompressedTensorsWNA16"),
    "w8a8-int8": Format(quantize_w8a8, {
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
            "dynamic": False}, "input_activations": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
            "dynamic": True}}}}, "CompressedTensorsW8A8Int8", W8A8_ATOL),
}


def write_quantized_checkpoint(model_dir: pathlib.Path, quantized_dir: pathlib.Path,
                               dequantized_dir: pathlib.Path, form: Format) -> None:
    """The model as a quantised checkpoint, and as an fp32 one of the weights it encodes."""
    for path in (quantized_dir, dequantized_dir):
        shutil.copytree(model_dir, path)
    quantized, dequantized = {}, {}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module.rpartition(".")[2] in LINEARS:
            parts, dequantized[name] = form.quantize(tensor)
            quantized.update({f"{module}.{part}": value for part, value in parts.items()})
        else:
            quantized[name], dequantized[name] = tensor.half(), tensor
    save_file(quantized, quantized_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, dequantized_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized_dir / "config.json").read_text())
    config.update(torch_dtype="float16", quantization_config=form.config)
    (quantized_dir / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_quantized")
    model_dir = make_tiny_llama(root / "tiny-llama")
    adapters = [
        make_mole_adapter(root / "mixlora", MoleConfig(
            "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2, target_modules=LINEARS),
            TINY_SHAPE, seed=1),
        make_mole_adapter(root / "dynmole", MoleConfig(
            "dynmole", num_experts=3, r=4, lora_alpha=8, top_p=0.75,
            target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
            TINY_SHAPE, seed=2),
        make_peft_lora(root / "peft", TINY_SHAPE, seed=3)]
    return root, model_dir, adapters


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized_base(request, workspace):
    """(format name, quantised checkpoint dir, reference on its dequantised weights)."""
    root, model_dir, adapters = workspace
    quantized_dir, dequantized_dir = root / request.param, root / f"{request.param}-dequantized"
    write_quantized_checkpoint(model_dir, quantized_dir, dequantized_dir, FORMATS[request.param])
    return (request.param, quantized_dir,
            ReferenceGenerator(dequantized_dir, adapters, dtype="bfloat16"))


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_adapters_on_a_quantised_base_match_the_dequantised_reference(workspace, quantized_base,
                                                                      backend):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    root = workspace[0]
    form, quantized_dir, reference = quantized_base
    names = [None, *ADAPTERS]
    with offline_llm(quantized_dir, {"backend": backend}, dtype="bfloat16", max_loras=3) as llm:
        (method,) = llm.apply_model(lambda model: "/".join(
            type(getattr(model.model.layers[0].mlp.gate_up_proj.base_layer, part, None)).__name__
            for part in ("quant_method", "scheme")))
        assert FORMATS[form].linear_method in method, f"the base is not served {form} ({method})"
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
        torch.testing.assert_close(got, expected, rtol=0, atol=FORMATS[form].logprob_atol,
                                   msg=lambda message: f"{form}, {name}: {message}")
        if name:
            effect = (expected - reference.prompt_logprobs(prompt)).abs().max()
            assert effect > MIN_ADAPTER_EFFECT, f"{name} barely changes the logprobs"
