"""Prometheus metrics of MoLE serving, shown at vLLM's `/metrics`.

Where each series is made:
* API-server process: requests and generated tokens per adapter (vLLM's output processor),
  adapters refused at `/v1/load_lora_adapter`.
* worker process: adapter loads, load latency, evictions, slot fills, and the routing
  statistics the layers accumulate on the device (exported at step boundaries, never inside
  a forward: see `routing_stats.RoutingStats`).

`/metrics` shows one process's registry unless `PROMETHEUS_MULTIPROC_DIR` is set, in which
case prometheus_client aggregates every process's values; with `--enable-mole-adapters`
`vllm_compat.use_multiprocess_metrics` sets one up when the user did not. prometheus_client
picks its storage when a metric is *created*, so every metric here is created on first use
(after that switch), never at import. Only counters and histograms: they need no
multiprocess mode.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from torch import Tensor

BASE_MODEL_LABEL = "(base)"  # `adapter` label of requests served by the base model
ENTROPY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))    # normalised, in [0, 1]
EXPERTS_PER_TOKEN_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 64)


class _Metrics:
    def __init__(self):
        self.requests = Counter(
            "mole_serve_requests", "Finished requests per adapter", ["adapter"])
        self.generated_tokens = Counter(
            "mole_serve_generated_tokens", "Generated tokens per adapter", ["adapter"])
        self.expert_selections = Counter(
            "mole_serve_expert_selections",
            "Tokens routed to each expert (load balance), per adapter, layer and router "
            "(`ffn` for MixLoRA's FFN router, the projection for DynMoLE's per-linear ones)",
            ["adapter", "layer", "router", "expert"])
        self.experts_per_token = Histogram(
            "mole_serve_experts_per_token",
            "Experts selected per token and router; mean = _sum / _count", ["adapter"],
            buckets=EXPERTS_PER_TOKEN_BUCKETS)
        self.routing_entropy = Histogram(
            "mole_serve_routing_entropy",
            "Router entropy per token and router, normalised by log(num_experts): "
            "0 = one expert certain, 1 = uniform", ["adapter"], buckets=ENTROPY_BUCKETS)
        self.adapter_loads = Counter(
            "mole_serve_adapter_loads",
            "Adapters read from disk into the CPU cache, by routing strategy (plain: lora)",
            ["adapter", "strategy"])
        self.adapter_load_seconds = Histogram(
            "mole_serve_adapter_load_seconds", "Time to read and check one adapter dir",
            ["strategy"], buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0))
        self.adapter_evictions = Counter(
            "mole_serve_adapter_evictions",
            "Adapters leaving a device slot (`slot`) or the CPU cache (`cpu_cache`: LRU "
            "eviction or unload)", ["adapter", "place"])
        self.adapter_rejections = Counter(
            "mole_serve_adapter_rejections",
            "MoLE adapters refused as malformed or over the server's limits", ["stage"])
        self.slot_fills = Counter(
            "mole_serve_slot_fills",
            "Adapters copied into a slot's buffers (MoLE or, to empty it, plain LoRA)")
        self._selections: dict[tuple, Counter] = {}

    def selections_of(self, adapter: str, layer: int, router: str, expert: int) -> Counter:
        """One expert's selection series, looked up once: an export touches every layer's
        routers, and `labels()` costs several times the increment."""
        key = (adapter, layer, router, expert)
        series = self._selections.get(key)
        if series is None:
            series = self._selections[key] = self.expert_selections.labels(
                adapter=adapter, layer=str(layer), router=router, expert=str(expert))
        return series


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


def _never_raises(record):
    """Metrics are recorded inside adapter loads and engine steps: a failing write (e.g. a
    multiprocess dir removed under the server) is logged, never allowed to fail the request
    or take the engine down. Logged once per function: some run for every request."""
    failed = False

    @functools.wraps(record)
    def guarded(*args, **kwargs):
        nonlocal failed
        try:
            record(*args, **kwargs)
        except Exception:
            if not failed:
                failed = True
                logging.getLogger("vllm.mole_serve").exception(
                    "mole_serve: recording metrics (%s) failed; later failures are not "
                    "logged", record.__name__)
    return guarded


@_never_raises
def request_finished(adapter: str | None) -> None:
    _metrics().requests.labels(adapter=adapter or BASE_MODEL_LABEL).inc()


@_never_raises
def tokens_generated(adapter: str | None, count: int) -> None:
    _metrics().generated_tokens.labels(adapter=adapter or BASE_MODEL_LABEL).inc(count)


@_never_raises
def adapter_loaded(adapter: str, strategy: str, seconds: float) -> None:
    m = _metrics()
    m.adapter_loads.labels(adapter=adapter, strategy=strategy).inc()
    m.adapter_load_seconds.labels(strategy=strategy).observe(seconds)


@_never_raises
def adapter_evicted(adapter: str, place: str) -> None:
    """`place`: "slot" (the adapter left a device slot) or "cpu_cache"."""
    _metrics().adapter_evictions.labels(adapter=adapter, place=place).inc()


@_never_raises
def adapter_rejected(stage: str) -> None:
    """`stage`: "api_server" (load request refused with 400) or "engine" (worker load)."""
    _metrics().adapter_rejections.labels(stage=stage).inc()


@_never_raises
def slot_filled() -> None:
    _metrics().slot_fills.inc()


@_never_raises
def routing_observed(adapter: str, routers: Sequence[tuple[int, str]], selections: Tensor,
                     experts_per_token: Tensor, entropy_buckets: Tensor, entropy_sum: Tensor
                     ) -> None:
    """Add an adapter's routing counts since the last export, one row per router
    `routers[i]` = (layer, router name): `selections[i, e]` tokens chose expert e,
    `experts_per_token[i, k]` tokens kept k experts, `entropy_buckets[i, b]` tokens fell in
    `ENTROPY_BUCKETS[b]` (last: above 1, rounding), with entropies summing to
    `entropy_sum[i]` (integer tensors; the sum float)."""
    m = _metrics()
    rows, experts = selections.nonzero(as_tuple=True)
    for row, expert, count in zip(rows.tolist(), experts.tolist(),
                                  selections[rows, experts].tolist()):
        m.selections_of(adapter, *routers[row], expert).inc(count)
    per_bucket = [0] * (len(EXPERTS_PER_TOKEN_BUCKETS) + 1)
    per_k = experts_per_token.sum(0).tolist()
    for k, count in enumerate(per_k):
        per_bucket[bisect.bisect_left(EXPERTS_PER_TOKEN_BUCKETS, k)] += count
    total_experts = sum(k * count for k, count in enumerate(per_k))
    observe_counts(m.experts_per_token.labels(adapter=adapter), per_bucket, total_experts)
    observe_counts(m.routing_entropy.labels(adapter=adapter), entropy_buckets.sum(0).tolist(),
                   float(entropy_sum.sum()))


def observe_counts(histogram: Histogram, bucket_counts: Sequence[int], total: float) -> None:
    """Observe many values at once, given how many fell in each bucket (+Inf last) and their
    sum. prometheus_client has no bulk `observe`, and one call per token and layer would
    cost far more than the forward itself; this writes the same per-bucket values that
    `observe` writes (checked against it in the tests, as it relies on its internals)."""
    if len(bucket_counts) != len(histogram._buckets):
        raise ValueError(f"expected {len(histogram._buckets)} bucket counts, "
                         f"found {len(bucket_counts)}")
    if not any(bucket_counts):
        return
    for bucket, count in zip(histogram._buckets, bucket_counts):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)
