"""Shared fixtures: tiny shapes and random adapters built in the test, never downloaded."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this at import time; set it before any test module imports triton
    # (vLLM imports it too), so kernels run on the CPU through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gc

from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.config import MoleConfig

def take(stats) -> dict[str, dict[str, torch.Tensor]]:
    """A `RoutingStats`' counts since the last look, per router and kind of count."""
    from mole_serve.routing_stats import split_counts
    return {name: split_counts(counts, stats.experts)
            for name, counts in zip(stats.routers, stats.added())}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest magnitude expected (in fp32): the
    bound every numerical comparison in the tests uses."""
    got, expected = got.float(), expected.float()
    return ((got - expected).abs().max() / expected.abs().max()).item()


# Odd sizes on purpose (DESIGN §9): nothing may assume powers of two.
ODD_BASE = BaseShape(hidden=96, intermediate=200, num_layers=2, num_heads=3, num_kv_heads=1,
                     head_dim=32)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def configs() -> dict[str, MoleConfig]:
    """One adapter per strategy, with different E, r, targets and scalings."""
    return {
        "topk": MoleConfig("mixlora", num_experts=4, r=8, lora_alpha=16, target_modules=ALL,
                           top_k=2),
        "top1": MoleConfig("mixlora", num_experts=3, r=4, lora_alpha=8, target_modules=FFN,
                           top_k=1, use_rslora=True),
        "dynamic": MoleConfig("mixlora-dynamic", num_experts=5, r=6, lora_alpha=12,
                              target_modules=("q_proj", "o_proj") + FFN, top_p=0.8),
        "switch": MoleConfig("mixlora-switch", num_experts=4, r=8, lora_alpha=16,
                             target_modules=("gate_proj", "down_proj")),
        "dynmole": MoleConfig("dynmole", num_experts=6, r=5, lora_alpha=10,
                              target_modules=("q_proj", "v_proj") + FFN, top_p=0.75,
                              keep_top_k=2, entropy_threshold=0.9),
        "lora": MoleConfig("lora", num_experts=1, r=7, lora_alpha=14,
                           target_modules=("q_proj", "o_proj", "up_proj", "down_proj")),
    }


def random_adapters(base: BaseShape = ODD_BASE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {name: init_adapter(cfg, base, name, generator=g, b_std=0.05, router_std=0.5)
            for name, cfg in configs().items()}


@pytest.fixture(scope="session")
def adapters():
    return random_adapters()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Collect a test module's garbage when it is done, its fixtures and their engines
    released: a finished in-process vLLM engine frees its CPU GEMM handlers in `__del__`
    with a `.item()`, which, left to a later collection, can run inside another test's
    torch.compile tracing (on fake tensors: it fails, and in a one-process full suite
    recursed until the interpreter aborted)."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
