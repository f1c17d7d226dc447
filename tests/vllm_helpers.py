"""Offline fixtures for the vLLM tests: MoLE and plain PEFT adapters for the tiny random Llama
of `tiny_model`, and a transformers + `mole_serve.hf` greedy generator that serves as the
expected output. Nothing is downloaded."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pathlib
import shutil
import tempfile
import time

import httpx
import pytest
import torch

from mole_serve.adapter import BaseShape, MoleAdapter, init_adapter
from mole_serve.checkpoint import save_adapter
from mole_serve.config import MoleConfig
from mole_serve.hf import attach_adapters

# In-process engines: one process, no compile, small KV cache, nothing downloaded.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@functools.cache
def vllm_cache_root() -> str:
    """One VLLM_CACHE_ROOT for the whole test run: vLLM inspects each model class in a
    subprocess (~13 s) and caches the result there, so engines after the first start fast."""
    root = tempfile.mkdtemp(prefix="mole_serve_vllm_cache_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def engine_env() -> dict[str, str]:
    return dict(ENGINE_ENV, VLLM_CACHE_ROOT=vllm_cache_root())


def server_env(**extra: str) -> dict[str, str]:
    """A `vllm serve` subprocess's environment: the test engines' settings (multiprocess,
    as users run it) and no PROMETHEUS_MULTIPROC_DIR, which the plugin or vLLM must make."""
    env = dict(os.environ, **engine_env(), **extra)
    del env["VLLM_ENABLE_V1_MULTIPROCESSING"]
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


# On a GPU each test engine takes a small share of its memory: several live in one test
# process (vLLM 0.26 frees an in-process engine's memory only at shutdown) beside servers.
GPU_MEMORY_SHARE = 0.15
GPU_ONLY_ARGS = {"gpu_memory_utilization": GPU_MEMORY_SHARE} if torch.cuda.is_available() else {}
# vLLM's CUDA LoRA kernels (Triton punica) take fp16 / bf16 only, also in the dummy LoRAs of
# CUDA-graph capture; the CPU backend runs fp32. The reference generates in the same dtype.
ENGINE_DTYPE = "float16" if torch.cuda.is_available() else "float32"
# What every in-process test engine shares: the tiny models, eager, one process.
TINY_ENGINE_ARGS = {"dtype": ENGINE_DTYPE, "enforce_eager": True,
                    "distributed_executor_backend": "uni", "max_model_len": 128,
                    "max_num_batched_tokens": 256, "max_num_seqs": 8, "seed": 0,
                    "max_lora_rank": 8, "max_loras": 2, **GPU_ONLY_ARGS}


def serve_arg_parser():
    """`vllm serve`'s argument parser (its module moved after vLLM 0.26), plugin loaded."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from mole_serve import plugin

    plugin.register()
    return make_arg_parser(FlexibleArgumentParser())


@contextlib.contextmanager
def offline_llm(model_dir: pathlib.Path | str, mole: dict | None = None, **engine_args):
    """An in-process, offline `vllm.LLM` serving MoLE adapters (`mole`: the settings of
    `--additional-config '{"mole": ...}'` besides "enabled"); `engine_args` override
    TINY_ENGINE_ARGS."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in engine_env().items():
            env.setenv(key, value)
        from vllm import LLM
        llm = LLM(model=str(model_dir), **{**TINY_ENGINE_ARGS, **engine_args},
                  additional_config={"mole": {"enabled": True, "max_experts": 4,
                                              **(mole or {})}})
        try:
            yield llm
        finally:
            if torch.cuda.is_available():  # its GPU memory now, not at exit
                llm.llm_engine.engine_core.shutdown()
            del llm


def metric_total(name: str, **labels: str) -> float:
    """Sum of the in-process registry's samples `name` whose labels include `labels`."""
    from prometheus_client import REGISTRY
    return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def metric_when_above(server: str, floor: float, name: str, **labels: str) -> float:
    """`name` at /metrics once above `floor` (or after 30 s): exports made by the engine
    follow the response that ended the burst by a moment."""
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{server}/metrics", timeout=10).text
        value = metric(text, name, **labels) if name in text else 0.0
        if value > floor or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def metric(text: str, name: str, *, required: bool = True, **labels: str) -> float:
    """Sum of the samples `name` in a /metrics text whose labels include `labels` (0 for
    none, unless `required`)."""
    from prometheus_client.parser import text_string_to_metric_families
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples
              if sample.name == name and labels.items() <= sample.labels.items()]
    assert values or not required, f"{name} {labels} not in /metrics"
    return sum(values)


def make_mole_adapter(path: pathlib.Path, config: MoleConfig, base: BaseShape, seed: int,
                      *, as_bin: bool = False) -> MoleAdapter:
    """A random adapter strong enough to change greedy tokens; `.bin` as MoE-PEFT writes."""
    adapter = init_adapter(config, base, path.name, generator=torch.Generator().manual_seed(seed),
                           b_std=0.2, router_std=0.5)
    save_adapter(adapter, path, safetensors=not as_bin, bin=as_bin)
    return adapter


def make_peft_lora(path: pathlib.Path, base: BaseShape, seed: int, rank: int = 8,
                   alpha: int = 16, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
                   ) -> MoleAdapter:
    """A plain PEFT LoRA dir (PEFT's key names and config, which vLLM loads itself)."""
    config = MoleConfig("lora", num_experts=1, r=rank, lora_alpha=alpha, target_modules=targets)
    return make_mole_adapter(path, config, base, seed)


class ReferenceGenerator:
    """A transformers Llama-family model with adapters (MoLE or plain LoRA) attached by
    `mole_serve.hf` (the reference math); greedy decoding by full recomputation."""

    def __init__(self, model_dir: pathlib.Path, adapters: list[MoleAdapter],
                 dtype: str = ENGINE_DTYPE):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, torch_dtype=getattr(torch, dtype), attn_implementation="eager").eval()
        if torch.cuda.is_available():
            model.cuda()
        self.attachment = attach_adapters(model, adapters)

    def greedy(self, prompt: list[int], max_tokens: int, adapter: str | None = None) -> list[int]:
        """Greedy tokens of the base model (None) or an attached adapter."""
        with self.attachment.use(adapter):
            return greedy_tokens(self.attachment.model, prompt, max_tokens)

    @torch.no_grad()
    def prompt_logprobs(self, prompt: list[int], adapter: str | None = None) -> torch.Tensor:
        """Log-probability of each prompt token after the first, given the ones before."""
        model = self.attachment.model
        ids = torch.tensor([prompt], device=next(model.parameters()).device)
        with self.attachment.use(adapter):
            logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
        return logprobs.gather(-1, ids[0, 1:, None])[:, 0].cpu()


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation, never stopping at EOS (as `ignore_eos`)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        device = next(model.parameters()).device  # the trainer's model may be on the GPU
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return ids[len(prompt):]
