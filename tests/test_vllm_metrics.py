"""Metrics plumbing without an engine: bulk histogram observation, routing export, and the
multiprocess directory `vllm serve --enable-mole-adapters` sets up."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram

from mole_serve import metrics, vllm_compat


def samples(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect() for s in metric.samples
            if not s.name.endswith("_created")}


def test_observe_counts_writes_what_observe_writes():
    values = [0.05, 0.1, 0.1, 0.35, 0.99, 1.0, 1.2]
    one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "test", buckets=metrics.ENTROPY_BUCKETS, registry=one_by_one)
    h2 = Histogram("h", "test", buckets=metrics.ENTROPY_BUCKETS, registry=bulk)
    for v in values:
        h1.observe(v)
    counts = [0] * (len(metrics.ENTROPY_BUCKETS) + 1)
    for v in values:
        counts[sum(bound < v for bound in metrics.ENTROPY_BUCKETS)] += 1
    metrics.observe_counts(h2, counts, sum(values))
    assert samples(bulk) == pytest.approx(samples(one_by_one))
    with pytest.raises(ValueError, match="bucket counts"):
        metrics.observe_counts(h2, counts[:-1], 0.0)


def test_routing_observed_reaches_the_series():
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    labels = dict(adapter="metrics-test", layer="3", router="ffn", expert="1")
    before = value("mole_serve_expert_selections_total", **labels)
    other = value("mole_serve_expert_selections_total", **dict(labels, layer="4", expert="0"))
    mean_before = (value("mole_serve_experts_per_token_sum", adapter="metrics-test"),
                   value("mole_serve_experts_per_token_count", adapter="metrics-test"))
    # two routers: (layer 3, ffn) routed 6 tokens, 2 experts each; (layer 4, ffn) 1 token, 1
    metrics.routing_observed(
        "metrics-test", [(3, "ffn"), (4, "ffn")],
        selections=torch.tensor([[4, 6, 0, 2], [1, 0, 0, 0]]),
        experts_per_token=torch.tensor([[0, 0, 6, 0, 0], [0, 1, 0, 0, 0]]),
        entropy_buckets=torch.tensor([[0] * 9 + [6, 0], [1] + [0] * 10]),
        entropy_sum=torch.tensor([5.7, 0.05], dtype=torch.float64))
    assert value("mole_serve_expert_selections_total", **labels) - before == 6
    assert value("mole_serve_expert_selections_total",
                 **dict(labels, layer="4", expert="0")) - other == 1
    sums = (value("mole_serve_experts_per_token_sum", adapter="metrics-test") - mean_before[0],
            value("mole_serve_experts_per_token_count", adapter="metrics-test") - mean_before[1])
    assert sums == (13, 7), "6 tokens with 2 experts, 1 with 1"
    assert value("mole_serve_routing_entropy_bucket", adapter="metrics-test", le="0.1") == 1
    assert value("mole_serve_routing_entropy_bucket", adapter="metrics-test", le="0.9") == 1
    assert value("mole_serve_routing_entropy_bucket", adapter="metrics-test", le="1.0") >= 7
    assert value("mole_serve_routing_entropy_sum", adapter="metrics-test") == pytest.approx(
        5.75)


def test_multiprocess_dir_is_made_only_when_the_user_set_none(monkeypatch, tmp_path):
    """What `vllm serve --enable-mole-adapters` does in the API-server process (the serve
    test checks the whole path: worker series at /metrics, the directory removed at exit)."""
    from prometheus_client import values
    from vllm.v1.metrics import prometheus

    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setattr(prometheus, "_prometheus_multiproc_dir", None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    vllm_compat.use_multiprocess_metrics()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path), "the user's choice stays"
    assert prometheus._prometheus_multiproc_dir is None

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    vllm_compat.use_multiprocess_metrics()
    made = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert made == prometheus._prometheus_multiproc_dir and os.path.isdir(made)
    assert values.ValueClass.__name__ == "MmapedValue", "new metrics must go to the directory"
    # vLLM's shutdown marks the process dead there without an error (its own helper's
    # record, a TemporaryDirectory object, logged one at every shutdown)
    pathlib.Path(made, f"gauge_livemostrecent_{os.getpid()}.db").touch()
    errors = []
    monkeypatch.setattr(prometheus.logger, "error", lambda *args: errors.append(args))
    prometheus.shutdown_prometheus()
    assert errors == [] and not any(pathlib.Path(made).iterdir())
    vllm_compat._METRICS_DIR.cleanup()


def test_a_failing_metrics_write_is_logged_not_raised(monkeypatch):
    """Loads and engine steps record metrics: a write that fails must not fail them."""
    import logging

    def broken():
        raise FileNotFoundError("the multiprocess dir is gone")

    monkeypatch.setattr(metrics, "_metrics", broken)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logger = logging.getLogger("vllm.mole_serve")
    logger.addHandler(handler)
    try:
        metrics.adapter_loaded("math", "mixlora", 0.1)
        metrics.slot_filled()
        metrics.slot_filled()  # some run per request: logged once
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage().split(";")[0] for r in logged] == [
        "mole_serve: recording metrics (adapter_loaded) failed",
        "mole_serve: recording metrics (slot_filled) failed"]
    assert all(isinstance(r.exc_info[1], FileNotFoundError) for r in logged)

