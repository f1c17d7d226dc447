"""Our section of vLLM's `--additional-config` (`{"mole": {...}}`): what `vllm serve
--enable-mole-adapters` and its flags write there, and what every vLLM process (API servers,
engine, workers, Ray workers too) reads back, checked with errors naming the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .config import FAMILIES

MOLE_KEY = "mole"
DEFAULT_MAX_EXPERTS = 8
# "auto": the Triton kernels with CUDA, else the reference math (Triton only runs interpreted
# on a CPU); "kernels" on a CPU runs them interpreted (tests: slow); "reference" anywhere.
BACKENDS = ("auto", "kernels", "reference")


def _switch(section: dict, key: str, default: bool) -> bool:
    """A true/false setting; a string such as "false" would read as true."""
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"--additional-config {MOLE_KEY}.{key}: expected true or false, "
                         f"found {value!r}")
    return value


def _count(section: dict, key: str, default: int | None) -> int | None:
    """An integer >= 1; null stands for an optional one's default (as `merged_into` writes)."""
    value = section.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--additional-config {MOLE_KEY}.{key}: expected an integer >= 1, "
                         f"found {value!r}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    """`--additional-config '{"mole": {...}}'`: reaches every vLLM process, Ray workers too."""

    enabled: bool = False
    max_experts: int = DEFAULT_MAX_EXPERTS
    max_rank: int | None = None        # None: vLLM's --max-lora-rank
    routing_metrics: bool = True       # per-adapter routing counts (routing_stats.RoutingStats)
    metrics_interval_s: float = 5.0    # at most one routing-count export per interval
    backend: str = "auto"              # one of BACKENDS
    # Adapter families served (config.FAMILIES). Each costs slot buffers and kernel launches
    # in every layer whether or not such an adapter is loaded (CUDA graphs fix the launches
    # at start-up): a server of MixLoRA adapters only skips DynMoLE's per-linear routers.
    # `vllm serve` narrows the default to what its adapters need (startup_families).
    families: tuple[str, ...] = tuple(FAMILIES)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "ServeSettings":
        section = mole_section(additional_config)
        if not section:
            return cls()
        unknown = set(section) - _SETTING_KEYS
        if unknown:
            raise ValueError(f"--additional-config {MOLE_KEY}: unknown keys {sorted(unknown)}; "
                             f"expected some of {sorted(_SETTING_KEYS)}")
        max_experts = _count(section, "max_experts", DEFAULT_MAX_EXPERTS)
        max_rank = _count(section, "max_rank", None)
        interval = section.get("metrics_interval_s", cls.metrics_interval_s)
        if not isinstance(interval, (int, float)) or interval < 0:
            raise ValueError(f"--additional-config {MOLE_KEY}.metrics_interval_s: expected "
                             f"seconds >= 0, found {interval!r}")
        backend = section.get("backend", cls.backend)
        if backend not in BACKENDS:
            raise ValueError(f"--additional-config {MOLE_KEY}.backend: expected one of "
                             f"{list(BACKENDS)}, found {backend!r}")
        enabled, routing_metrics = (_switch(section, key, getattr(cls, key))
                                    for key in ("enabled", "routing_metrics"))
        families = section.get("families", list(FAMILIES))
        if (not isinstance(families, list) or not families
                or not set(families) <= set(FAMILIES)):
            raise ValueError(f"--additional-config {MOLE_KEY}.families: expected a non-empty "
                             f"list of {list(FAMILIES)}, found {families!r}")
        return cls(enabled=enabled, max_experts=max_experts, max_rank=max_rank,
                   routing_metrics=routing_metrics,
                   metrics_interval_s=float(interval), backend=backend,
                   families=tuple(f for f in FAMILIES if f in families))

    def uses_kernels(self) -> bool:
        return self.backend == "kernels" or (self.backend == "auto" and torch.cuda.is_available())

    def merged_into(self, additional_config: Any) -> dict:
        merged = dict(additional_config) if isinstance(additional_config, dict) else {}
        merged[MOLE_KEY] = dict(dataclasses.asdict(self), families=list(self.families))
        return merged


_SETTING_KEYS = {f.name for f in dataclasses.fields(ServeSettings)}


def mole_section(additional_config: Any) -> dict:
    """Our section of `--additional-config` as the user gave it ({} when absent)."""
    section = additional_config.get(MOLE_KEY) if isinstance(additional_config, dict) else None
    return section if isinstance(section, dict) else {}
