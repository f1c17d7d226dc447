"""The served model: vLLM's Llama with MoLE slots in every decoder layer.

Attention projections and the MLP keep vLLM's own (LoRA-wrappable) linear layers and weight
names, so base checkpoints load unchanged and plain PEFT adapters work beside MoLE ones. Each
layer adds the deltas of the adapter in each token's slot (`layers.py`); tokens without a MoLE
adapter get exactly stock vLLM's result.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import (LlamaAttention, LlamaDecoderLayer,
                                              LlamaForCausalLM)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors

from . import metrics, vllm_compat
from .adapter import BaseShape, MoleAdapter
from .config import ATTENTION_PROJS
from .errors import AdapterError
from .layers import FFNAdapters, ProjectionAdapters, SlotLimits, TokenSlots


class MoleLlamaAttention(LlamaAttention):
    """Llama attention whose q/k/v/o outputs get each token's adapter delta."""

    mole: ProjectionAdapters  # attached by MoleLlamaDecoderLayer

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        batch = self.mole.slot_batch(hidden_states.shape[0])
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if batch is not None:
            q, k, v = (self.mole.project(y, hidden_states, batch, proj)
                       for y, proj in zip((q, k, v), ("q_proj", "k_proj", "v_proj")))
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        if batch is not None:
            output = self.mole.project(output, attn_output, batch, "o_proj")
        return output


class MoleLlamaMLP(nn.Module):
    """SwiGLU MLP on vLLM's linears, with DynMoLE deltas on gate/up/down and MixLoRA's
    FFN-level experts mixed before the single frozen down projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, prefix: str,
                 adapters: FFNAdapters):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=hidden_size, output_sizes=[intermediate_size] * 2, bias=bias,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(input_size=intermediate_size, output_size=hidden_size,
                                           bias=bias, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()
        self.mole = adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        batch = self.mole.slot_batch(x.shape[0])
        if batch is None:
            y, _ = self.down_proj(self.act_fn(gate_up))
            return y
        g, u = gate_up.chunk(2, dim=-1)
        g = self.mole.project(g, x, batch, "gate_proj")
        u = self.mole.project(u, x, batch, "up_proj")
        h = self.act_fn(torch.cat([g, u], dim=-1))
        h, routed = self.mole.mix_experts(h, g, u, x, batch)
        y, _ = self.down_proj(h)
        y = self.mole.project(y, h, batch, "down_proj")
        return self.mole.add_down_delta(y, batch, routed)


class MoleLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, *,
                 limits: SlotLimits, base: BaseShape, token_slots: TokenSlots,
                 use_kernels: bool):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=MoleLlamaAttention)
        config = config or vllm_config.model_config.hf_config
        layer_index = extract_layer_index(prefix)
        self.self_attn.mole = ProjectionAdapters(limits, base, layer_index, token_slots,
                                                 ATTENTION_PROJS, use_kernels)
        self.mlp = MoleLlamaMLP(config.hidden_size, config.intermediate_size,
                                bias=getattr(config, "mlp_bias", False), prefix=f"{prefix}.mlp",
                                adapters=FFNAdapters(limits, base, layer_index, token_slots,
                                                     use_kernels))


class MoleLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with MoLE adapter slots; also serves Mistral and Qwen2 checkpoints
    (see `vllm_compat.LLAMA_FAMILY`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        if vllm_config.quant_config is not None:
            raise ValueError("MoLE serving supports unquantized base models only")
        if vllm_compat.tensor_parallel_size() != 1:
            raise ValueError("MoLE serving does not support tensor parallelism yet")
        if config.hidden_act != "silu":
            raise ValueError(f"MoLE serving needs a SiLU MLP; found {config.hidden_act!r}")
        slots, rank, experts = vllm_compat.slot_capacity(vllm_config)
        base = vllm_compat.base_shape(vllm_config)
        token_slots = TokenSlots(slots)
        # Triton kernels with CUDA; on CPU Triton only runs interpreted: the reference math.
        layer_type = functools.partial(MoleLlamaDecoderLayer, base=base, token_slots=token_slots,
                                       limits=SlotLimits(slots, rank, experts),
                                       use_kernels=torch.cuda.is_available())
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.mole_vllm_config = vllm_config
        self.mole_token_slots = token_slots

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if self.mole_token_slots.buffer is None:
            self.mole_token_slots.buffer = vllm_compat.token_slot_buffer(self)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_mole_adapter(self, path: str, name: str) -> MoleAdapter:
        """Read a MoLE adapter dir for this model and the server's limits (worker side)."""
        start = time.perf_counter()
        try:
            adapter = vllm_compat.load_served_adapter(path, name, self.mole_vllm_config)
        except AdapterError:
            metrics.adapter_rejected("engine")
            raise
        metrics.adapter_loaded(adapter.config.routing_strategy, time.perf_counter() - start)
        return adapter

    def set_mole_slot(self, slot: int, adapter: MoleAdapter | None) -> None:
        """Copy `adapter` into slot `slot` of every layer (None empties it)."""
        for module in self.modules():
            if isinstance(module, ProjectionAdapters):
                module.fill(slot, adapter)
        metrics.slot_filled()
