"""`vllm serve --enable-mole-adapters --api-server-count 2` (as data parallelism starts it
too): the API server processes vLLM spawns parse no flags of their own and load the plugin
late, yet each must serve MoLE adapters and count into the same `/metrics`."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from mole_serve.config import MoleConfig
from mole_serve.demo.server import VllmServer
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import (ENGINE_DTYPE, GPU_MEMORY_SHARE, ReferenceGenerator, make_mole_adapter,
                          metric, metric_when_above, server_env)

PROMPT = [1, 17, 305, 44, 912, 8]
MAX_TOKENS = 6
REQUESTS_PER_MODEL = 4
MAX_ROUNDS = 8  # of REQUESTS_PER_MODEL requests per model, until both API servers had some


def api_servers_given(log: str, adapter: str) -> set[str]:
    """The API server processes that received a request for `adapter` (`--enable-log-requests`
    lines carry each process's name)."""
    return set(re.findall(rf"^\((ApiServer_\d+) pid=\d+\).*Received request .*"
                          rf"lora_name='{adapter}'", log, re.MULTILINE))


def test_two_api_servers_serve_mole_adapters_into_one_metrics_view(tmp_path):
    base = TINY_SHAPE
    adapter = make_mole_adapter(tmp_path / "mixlora", MoleConfig(
        "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
        target_modules=("gate_proj", "up_proj", "down_proj")), base, seed=21)
    model = make_tiny_llama(tmp_path / "tiny-llama")
    reference = ReferenceGenerator(model, [adapter])
    expected = {"mixlora": reference.greedy(PROMPT, MAX_TOKENS, "mixlora"),
                "tiny": reference.greedy(PROMPT, MAX_TOKENS)}
    assert expected["mixlora"] != expected["tiny"]
    serve_args = ["--served-model-name", "tiny", "--dtype", ENGINE_DTYPE, "--max-model-len",
                  "128", "--max-num-seqs", "8", "--enforce-eager", "--api-server-count", "2",
                  "--enable-log-requests",
                  "--enable-mole-adapters", "--max-mole-experts", "4", "--max-lora-rank", "8",
                  "--lora-modules", f"mixlora={tmp_path / 'mixlora'}"]
    if torch.cuda.is_available():
        serve_args += ["--gpu-memory-utilization", str(GPU_MEMORY_SHARE)]
    with VllmServer(model, serve_args, log_path=tmp_path / "server.log", env=server_env(),
                    startup_timeout_s=300, metrics=False) as server:
        def complete(name: str) -> list[int]:
            # one connection per request, so that both API servers answer some
            response = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
                "model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["token_ids"]

        names = list(expected) * REQUESTS_PER_MODEL
        rounds = 0
        # The kernel spreads the connections over the two processes: more rounds until each
        # has served the adapter (one round is enough almost always).
        while len(api_servers_given(server.log_path.read_text(), "mixlora")) < 2:
            assert rounds < MAX_ROUNDS, "one API server took every connection"
            rounds += 1
            with ThreadPoolExecutor(len(names)) as pool:
                assert list(pool.map(complete, names)) == [expected[n] for n in names]
        metric_when_above(server.url, 0, "mole_serve_expert_selections_total",
                          adapter="mixlora")
        for _ in range(3):  # any API server answers with every process's series
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert metric(text, "mole_serve_requests_total",
                          adapter="mixlora") == rounds * REQUESTS_PER_MODEL
            assert metric(text, "mole_serve_expert_selections_total", adapter="mixlora") > 0
    assert "Error during metrics cleanup" not in (tmp_path / "server.log").read_text()
