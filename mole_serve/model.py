"""The served model: vLLM's Llama with MoLE slots in every decoder layer.

Attention projections and the MLP keep vLLM's own (LoRA-wrappable) linear layers and weight
names, so base checkpoints load unchanged and plain PEFT adapters work beside MoLE ones. Each
layer adds the deltas of the adapter in each token's slot (`layers.py`); tokens without a MoLE
adapter get exactly stock vLLM's result.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import (LlamaAttention, LlamaDecoderLayer,
                                              LlamaForCausalLM)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.sequence import IntermediateTensors

from . import admission, metrics, vllm_compat
from .adapter import BaseShape, MoleAdapter
from .errors import AdapterError
from .layers import ATTENTION_GROUPS, FFNAdapters, ProjectionAdapters
from .routing_stats import RoutingExport
from .sharding import TensorShard
from .slots import SlotLimits, TokenSlots


class MoleLlamaAttention(LlamaAttention):
    """Llama attention whose q/k/v/o outputs get each token's adapter delta."""

    mole: ProjectionAdapters  # attached by MoleLlamaDecoderLayer

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        batch = self.mole.slot_batch(hidden_states.shape[0])
        qkv, _ = self.qkv_proj(hidden_states)
        # q, k and v deltas in one route + one expand launch
        qkv = self.mole.project(qkv, hidden_states, batch, "qkv")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)  # all-reduce deferred: see MoleLlamaDecoderLayer
        output = self.mole.project(output, attn_output, batch, "o")
        return vllm_compat.tensor_parallel_all_reduce(output)


class MoleLlamaMLP(nn.Module):
    """SwiGLU MLP on vLLM's linears, with DynMoLE deltas on gate/up/down and MixLoRA's
    FFN-level experts mixed before the single frozen down projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, prefix: str,
                 adapters: FFNAdapters, quant_config: QuantizationConfig | None):
        super().__init__()
        # A quantised base keeps vLLM's quantised GEMMs: the adapters only read their inputs
        # and outputs, never the frozen weights.
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=hidden_size, output_sizes=[intermediate_size] * 2, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(input_size=intermediate_size, output_size=hidden_size,
                                           bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        # Reduced in forward, after the adapters' deltas: with tensor parallelism each rank's
        # down delta is a partial sum over its I-slice (sharding.TensorShard), and the base
        # all-reduce adds those up with the frozen projection's partial sums.
        vllm_compat.defer_all_reduce(self.down_proj)
        self.act_fn = SiluAndMul()
        self.mole = adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mole.around_frozen(x, self._gate_up, self.act_fn, self._down)
        return vllm_compat.tensor_parallel_all_reduce(y)

    def _gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_up_proj(x)[0]

    def _down(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(h)[0]


class MoleLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, *,
                 limits: SlotLimits, base: BaseShape, token_slots: TokenSlots,
                 use_kernels: bool, routing_stats: bool, shard: TensorShard,
                 families: tuple[str, ...]):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=MoleLlamaAttention)
        config = config or vllm_config.model_config.hf_config
        layer_index = extract_layer_index(prefix)
        # With tensor parallelism each rank's o_proj delta is a partial sum (TensorShard):
        # add it before the base all-reduce, as the MLP does with down_proj.
        vllm_compat.defer_all_reduce(self.self_attn.o_proj)
        # Attention projections hold DynMoLE's routed experts, or, in a server of MixLoRA
        # adapters only, MixLoRA's attention LoRA alone (one expert: smaller, cheaper).
        per_linear = "dynmole" in families
        self.self_attn.mole = ProjectionAdapters(
            limits if per_linear else dataclasses.replace(limits, experts=1), base,
            layer_index, token_slots, ATTENTION_GROUPS, use_kernels,
            routing_stats and per_linear, shard)
        self.mlp = MoleLlamaMLP(config.hidden_size, config.intermediate_size,
                                bias=getattr(config, "mlp_bias", False), prefix=f"{prefix}.mlp",
                                adapters=FFNAdapters(limits, base, layer_index, token_slots,
                                                     use_kernels, routing_stats, shard,
                                                     per_linear=per_linear,
                                                     ffn_experts="mixlora" in families),
                                quant_config=vllm_config.quant_config)


class MoleLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with MoLE adapter slots; also serves Mistral and Qwen2 checkpoints
    (see `admission.LLAMA_FAMILY`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        shard = vllm_compat.tensor_parallel_shard()
        if config.hidden_act != "silu":
            raise ValueError(f"MoLE serving needs a SiLU MLP; found {config.hidden_act!r}")
        if getattr(config, "llama_4_scaling", None):
            # vLLM's Mistral class scales queries by position; the Llama layers do not.
            raise ValueError("MoLE serving does not support llama_4_scaling attention "
                             "(a Mistral-3-style config.json)")
        if vllm_compat.is_cpu_platform():
            # vLLM's own LoRA layers see MoLE tokens as "no adapter" (slot -1), which the
            # CPU LoRA ops of vLLM <= 0.33 misread as the last slot; and they could not wrap
            # an int8 linear whose weight the CPU kernel prepacked.
            vllm_compat.fix_cpu_lora_no_adapter_rows()
            vllm_compat.fix_cpu_lora_device_of_prepacked_weights()
        slots, rank, experts = vllm_compat.slot_capacity(vllm_config)
        settings = vllm_compat.serve_settings(vllm_config)
        base = vllm_compat.base_shape(vllm_config)
        use_kernels = settings.uses_kernels()
        # On a CPU vLLM runs LoRA models eagerly: the reference layers may compute each
        # step's MoLE rows only (slots.SlotBatch), which CUDA graphs would not allow.
        token_slots = TokenSlots(slots, vllm_config.scheduler_config.max_num_batched_tokens,
                                 use_kernels, vllm_config.device_config.device,
                                 compact=not use_kernels and vllm_compat.is_cpu_platform())
        layer_type = functools.partial(MoleLlamaDecoderLayer, base=base, token_slots=token_slots,
                                       limits=SlotLimits(slots, rank, experts,
                                                         torch.get_default_dtype()),
                                       use_kernels=use_kernels,
                                       # every rank routes alike: the first one counts
                                       routing_stats=settings.routing_metrics
                                       and shard.rank == 0, shard=shard,
                                       families=settings.families)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.mole_served = vllm_compat.served_model(vllm_config)
        self.mole_token_slots = token_slots
        self.mole_metrics_interval_s = settings.metrics_interval_s
        self.mole_slot_names: list[str | None] = [None] * slots  # adapter in each slot
        self.mole_adapter_slots: set[int] = set()  # slots holding a MoLE (not plain) adapter
        self.mole_reports_metrics = vllm_compat.counts_adapter_events()
        # every layer's slot buffers (no two share a buffer)
        self.mole_adapter_modules = [m for m in self.modules()
                                     if isinstance(m, ProjectionAdapters)]
        self.mole_routing = RoutingExport([stats for module in self.mole_adapter_modules
                                           for stats in module.routing_stats()])
        slot_bytes = sum(b.nbytes for m in self.mole_adapter_modules for b in m.buffers())
        vllm_compat.logger.info(
            "mole_serve: MoLE adapter slots take %.2f GiB on %s (%d slots x %d experts x "
            "rank %d, %s layers); --max-loras, --max-mole-experts and --max-mole-rank "
            "(else --max-lora-rank) size them", slot_bytes / 2**30,
            vllm_config.device_config.device, slots, experts, rank, "/".join(settings.families))
        self._mole_last_export = time.monotonic()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A Mistral checkpoint maps to this class; vLLM's Mistral class renames its weights.
        return super().load_weights(vllm_compat.hf_weight_names(weights, self.config))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        # positions: every pipeline stage gets them (later stages may get no input ids)
        self.mole_token_slots.prepare(positions.shape[-1])
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_mole_adapter(self, path: str, name: str) -> MoleAdapter:
        """Read a MoLE adapter dir for this model and the server's limits (worker side)."""
        try:
            return admission.load_served_adapter(path, name, self.mole_served)
        except AdapterError:
            if self.mole_reports_metrics:
                metrics.adapter_rejected("engine")
            raise

    def set_mole_slot(self, slot: int, adapter: MoleAdapter | None, name: str | None) -> None:
        """Copy `adapter` into slot `slot` of every layer (None empties it; a plain LoRA
        adapter `name` gets an empty MoLE slot). The slot's routing counts are collected
        first: they belong to the adapter that leaves."""
        self.mole_routing.collect(self.mole_slot_names)
        leaving = self.mole_slot_names[slot]
        if self.mole_reports_metrics and leaving is not None and leaving != name:
            metrics.adapter_evicted(leaving, "slot")
        self.mole_slot_names[slot] = name
        if adapter is not None:
            self.mole_adapter_slots.add(slot)
        else:
            self.mole_adapter_slots.discard(slot)
        for module in self.mole_adapter_modules:
            module.fill(slot, adapter)
        if self.mole_reports_metrics and name is not None:  # not emptied, not a dummy
            metrics.slot_filled()

    def set_mole_token_slots(self, slots: list[int]) -> None:
        """The next steps' per-token slots (-1: base model or a plain LoRA adapter, which
        vLLM's own LoRA layers apply), set outside the forward with vLLM's adapter mapping."""
        self.mole_token_slots.set(torch.tensor(slots, dtype=torch.long))

    def maybe_export_routing_metrics(self) -> None:
        """At a step boundary: export when `metrics_interval_s` has passed. The copy to the
        host waits for the device, so it is rate-limited rather than done every step."""
        if time.monotonic() - self._mole_last_export >= self.mole_metrics_interval_s:
            self.export_routing_metrics()

    def export_routing_metrics(self) -> None:
        """Add every router's per-slot counts since the last export to the Prometheus
        series of the adapter in that slot, and those collected from slots since left
        (outside the forward)."""
        self._mole_last_export = time.monotonic()
        self.mole_routing.collect(self.mole_slot_names)
        self.mole_routing.flush()
