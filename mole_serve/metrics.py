"""Prometheus metrics of MoLE serving, shown at vLLM's `/metrics`.

Adapters are read and slotted in vLLM's worker process, but `/metrics` shows the API-server
process's registry only: worker-side series (loads, slot fills) appear when
`PROMETHEUS_MULTIPROC_DIR` names an empty directory before `vllm serve` starts, which makes
prometheus_client aggregate every process's values. Rejections at `/v1/load_lora_adapter`
are counted in the API server and always appear. Only counters and histograms are used:
they need no multiprocess mode.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ADAPTER_LOADS = Counter("mole_serve_adapter_loads",
                        "MoLE adapters read from disk into the CPU cache, by routing strategy",
                        ["strategy"])
ADAPTER_LOAD_SECONDS = Histogram("mole_serve_adapter_load_seconds",
                                 "Time to read and check one MoLE adapter dir",
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0))
ADAPTER_REJECTIONS = Counter("mole_serve_adapter_rejections",
                             "MoLE adapters refused as malformed or over the server's limits",
                             ["stage"])
SLOT_FILLS = Counter("mole_serve_slot_fills",
                     "Adapters copied into a slot's buffers (MoLE or, to empty it, plain LoRA)")


def adapter_loaded(strategy: str, seconds: float) -> None:
    ADAPTER_LOADS.labels(strategy=strategy).inc()
    ADAPTER_LOAD_SECONDS.observe(seconds)


def adapter_rejected(stage: str) -> None:
    """`stage`: "api_server" (load request refused with 400) or "engine" (worker load)."""
    ADAPTER_REJECTIONS.labels(stage=stage).inc()


def slot_filled() -> None:
    SLOT_FILLS.inc()
