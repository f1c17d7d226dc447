"""`vllm serve --enable-mole-adapters` as users run it: a real multi-process server (API
server, engine core, worker) answered through the `openai` client."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import time

import httpx
import pytest
import torch

from mole_serve.adapter import BaseShape
from mole_serve.config import MoleConfig
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import (ENGINE_DTYPE, GPU_MEMORY_SHARE, ReferenceGenerator, make_mole_adapter,
                          make_peft_lora, metric, metric_when_above, server_env)

BASE_NAME = "tiny"
PROMPT = [1, 17, 305, 44, 912, 8]
MAX_TOKENS = 8
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_serve")
    base = TINY_SHAPE
    adapters = {
        "mixlora": make_mole_adapter(root / "mixlora", MoleConfig(
            "mixlora", num_experts=4, r=8, lora_alpha=16, top_k=2,
            target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")),
            base, seed=11, as_bin=True),
        "dynmole": make_mole_adapter(root / "dynmole", MoleConfig(
            "dynmole", num_experts=4, r=8, lora_alpha=16,
            target_modules=("q_proj", "gate_proj", "down_proj")), base, seed=12),
        "late": make_mole_adapter(root / "late", MoleConfig(
            "mixlora-dynamic", num_experts=3, r=4, lora_alpha=8, top_p=0.8,
            target_modules=("gate_proj", "up_proj", "down_proj", "o_proj")), base, seed=13),
        "peft": make_peft_lora(root / "peft", base, seed=14),
    }
    model = make_tiny_llama(root / "tiny-llama")
    # vLLM's filesystem LoRA resolver cache: a request names a dir there, which loads then
    # (the served base by another path: the same dir)
    for name, source, changes in (
            ("cached", "mixlora", {"base_model_name_or_path": str(model / ".." / model.name)}),
            ("cached-other-base", "mixlora", {"base_model_name_or_path": "org/other-model"}),
            ("cached-too-many-experts", "late", {"base_model_name_or_path": str(model),
                                                 "num_experts": 9})):
        shutil.copytree(root / source, root / "resolver-cache" / name)
        config_path = root / "resolver-cache" / name / "adapter_config.json"
        config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), **changes)))
    return {"root": root, "model": model, "adapters": adapters}


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    """One server for the module (started and stopped as `make demo` does: the whole process
    group); its log tail is the error if it fails to start."""
    from mole_serve.demo.server import VllmServer

    root = workspace["root"]
    env = server_env(VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
                     VLLM_LORA_RESOLVER_CACHE_DIR=str(root / "resolver-cache"))
    serve_args = ["--served-model-name", BASE_NAME, "--dtype", ENGINE_DTYPE,
                  "--max-model-len", "128", "--max-num-seqs", "8",
                  "--max-num-batched-tokens", "256", "--enforce-eager",
                  "--enable-mole-adapters", "--max-mole-experts", "4",
                  "--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "3",
                  # Steps never export: routing counts come from the idle flush alone.
                  "--additional-config", '{"mole": {"metrics_interval_s": 3600}}',
                  "--lora-modules", *(f"{n}={root / n}" for n in ("mixlora", "dynmole", "peft"))]
    if torch.cuda.is_available():  # beside the in-process test engines of the same run
        serve_args += ["--gpu-memory-utilization", str(GPU_MEMORY_SHARE)]
    with VllmServer(workspace["model"], serve_args, log_path=root / "server.log", env=env,
                    startup_timeout_s=STARTUP_TIMEOUT_S, metrics=False) as served:
        workspace["server_pid"] = served.process.pid
        yield served.url
    if "metrics_dir" in workspace:
        assert not pathlib.Path(workspace["metrics_dir"]).exists(), \
            "the PROMETHEUS_MULTIPROC_DIR the plugin made must be removed at exit"
    assert "Error during metrics cleanup" not in (root / "server.log").read_text()


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(workspace):
    return ReferenceGenerator(workspace["model"], list(workspace["adapters"].values()))


@pytest.fixture(scope="module")
def expected(workspace, reference):
    adapters = workspace["adapters"]
    expected = {name: reference.greedy(PROMPT, MAX_TOKENS, name) for name in adapters}
    expected[BASE_NAME] = reference.greedy(PROMPT, MAX_TOKENS)
    return expected


def complete_ids(client, model: str) -> list[int]:
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                         temperature=0.0,
                                         extra_body={"ignore_eos": True,
                                                     "return_token_ids": True})
    return list(response.choices[0].token_ids)


def test_models_lists_base_and_adapters(client):
    names = {m.id for m in client.models.list().data}
    assert names == {BASE_NAME, "mixlora", "dynmole", "peft"}


def test_completions_match_reference_per_model(client, expected):
    got = {name: complete_ids(client, name) for name in (BASE_NAME, "mixlora", "dynmole", "peft")}
    assert got == {name: expected[name] for name in got}
    assert len({tuple(ids) for ids in got.values()}) == len(got), "adapters must differ"


def test_concurrent_mixed_requests_match_reference(client, expected):
    from concurrent.futures import ThreadPoolExecutor
    names = [BASE_NAME, "mixlora", "dynmole", "peft"] * 2
    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda n: complete_ids(client, n), names))
    assert got == [expected[n] for n in names]


def test_chat_uses_the_adapter_and_streams(client, reference):
    """Chat renders the tokenizer's template, then the adapter decodes as the reference does."""
    chat = dict(model="mixlora", messages=[{"role": "user", "content": "abc def"}],
                max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(
        **{**chat, "extra_body": {"ignore_eos": True, "return_token_ids": True}})
    prompt_ids = whole.model_extra["prompt_token_ids"]
    assert list(whole.choices[0].token_ids) == reference.greedy(prompt_ids, 6, "mixlora")
    assert list(whole.choices[0].token_ids) != reference.greedy(prompt_ids, 6)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **chat) if c.choices)
    assert streamed == whole.choices[0].message.content

    kwargs = dict(model="dynmole", prompt="hello there", max_tokens=6, temperature=0.0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True,
                                                                               **kwargs))
    assert streamed == whole


def test_echo_logprobs_score_the_prompt_with_each_request_s_adapter(client, reference):
    """`echo` with `logprobs` (vLLM's prompt logprobs), MoLE adapters and the base model at
    once: each prompt token's logprob is the reference's for that model (such a request
    once stopped the engine)."""
    from concurrent.futures import ThreadPoolExecutor

    def prompt_logprobs(model: str) -> list[float]:
        response = client.completions.create(model=model, prompt=PROMPT, max_tokens=1,
                                             temperature=0.0, echo=True, logprobs=0)
        return response.choices[0].logprobs.token_logprobs[1:len(PROMPT)]

    names = ["mixlora", BASE_NAME, "dynmole"]
    with ThreadPoolExecutor(len(names)) as pool:
        got = dict(zip(names, pool.map(prompt_logprobs, names)))
    for name in names:
        expected = reference.prompt_logprobs(PROMPT, None if name == BASE_NAME else name)
        torch.testing.assert_close(torch.tensor(got[name]), expected, rtol=0, atol=2e-3)


def test_the_log_says_what_the_adapter_slots_cost(server, workspace):
    """Slot buffers are sized before vLLM sizes the KV cache: the server log says how
    much they take and which flags size them (our lines must reach vLLM's log handler)."""
    log = (workspace["root"] / "server.log").read_text()
    match = re.search(r"mole_serve: MoLE adapter slots take (\d+\.\d+) GiB on \w+ \(2 slots "
                      r"x 4 experts x rank 8, mixlora/dynmole layers\)", log)
    assert match, log[-3000:]


def test_unknown_adapter_is_404(client):
    import openai
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)


def test_mole_dirs_in_the_lora_resolver_cache_load_on_first_request(client, expected):
    """vLLM's filesystem resolver takes PEFT LoRA dirs only; MoLE dirs there load as well,
    on its terms: made for the served base model, else vLLM's 404; a malformed one is a 400
    naming the problem, as at /v1/load_lora_adapter."""
    import openai
    with pytest.raises(openai.BadRequestError, match="adapter 'cached-too-many-experts': "
                                                     ".*num_experts"):
        complete_ids(client, "cached-too-many-experts")
    assert complete_ids(client, "cached") == expected["mixlora"]  # mixlora's weights
    assert "cached" in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        complete_ids(client, "cached-other-base")


def bad_adapter(root: pathlib.Path, case: str) -> pathlib.Path:
    """An adapter dir (or path) that must be refused, one per row of the refusal table."""
    path = root / f"bad-{case}"
    if case == "missing":
        return path
    if case == "not-json":
        path.mkdir()
        (path / "adapter_config.json").write_text('{"peft_type": "MIXLORA",')
        return path
    if case == "shape":      # a valid adapter, for a base with another hidden size
        make_mole_adapter(path, MoleConfig("mixlora", num_experts=2, r=4, lora_alpha=8,
                                           target_modules=("gate_proj",)),
                          BaseShape(hidden=96, intermediate=256, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=24), seed=1)
        return path
    if case.startswith("lora-"):  # plain PEFT LoRA: vLLM alone would answer a bare 500
        hidden = 128 if case == "lora-rank" else 96
        make_peft_lora(path, BaseShape(hidden=hidden, intermediate=256, num_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim=hidden // 4),
                       seed=2, rank=16 if case == "lora-rank" else 8)
        return path
    edits = {"rank": ('"r": 4', '"r": 16'), "experts": ('"num_experts": 3', '"num_experts": 9')}
    return variant_of_late(root, path.name, *edits.get(case, ("", "")),
                           nan_tensor=case == "nan")


REFUSALS = {"missing": "does not exist", "not-json": "adapter_config.json: expected valid JSON",
            "rank": "max rank 8", "experts": "max experts 4", "shape": "expected shape",
            "nan": "NaN/Inf", "lora-rank": "max rank 8, found 16",
            "lora-shape": "down_proj.lora_B.weight: expected shape [128, 8], found shape [96, 8]"}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_runtime_load_of_a_bad_adapter_is_400_naming_the_problem(server, client, workspace,
                                                                 expected, case):
    response = load_lora(server, f"bad-{case}", bad_adapter(workspace["root"], case))
    assert response.status_code == 400, response.text
    assert REFUSALS[case] in response.json()["error"]["message"], response.text
    assert f"bad-{case}" not in {m.id for m in client.models.list().data}
    assert complete_ids(client, "dynmole") == expected["dynmole"]


def test_a_hub_id_that_cannot_be_had_offline_is_400(server, client):
    """'org/name' is vLLM's to resolve (it may download it); with the hub off
    (HF_HUB_OFFLINE) and no cached copy, vLLM alone would answer 500."""
    response = load_lora(server, "hub", pathlib.Path("no-such-org/no-such-adapter"))
    assert response.status_code == 400, response.text
    assert "HF_HUB_OFFLINE forbids downloading hub repo 'no-such-org/no-such-adapter'" in \
        response.json()["error"]["message"], response.text
    assert "hub" not in {m.id for m in client.models.list().data}


def test_runtime_loaded_adapter_serves_until_unloaded(server, client, workspace, expected):
    import openai
    root = workspace["root"]
    response = load_lora(server, "late", root / "late")
    assert response.status_code == 200, response.text
    assert complete_ids(client, "late") == expected["late"]

    response = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "late"},
                          timeout=60)
    assert response.status_code == 200, response.text
    with pytest.raises(openai.NotFoundError):
        complete_ids(client, "late")
    assert complete_ids(client, "mixlora") == expected["mixlora"]


def test_metrics_reach_metrics_endpoint_without_user_multiproc_dir(server, client, workspace,
                                                                    expected):
    """The plugin made a PROMETHEUS_MULTIPROC_DIR (the user set none): API-server series
    (requests, rejections), worker series (loads, routing counted on the device) and vLLM's
    own all show at /metrics."""
    import psutil
    # The API server set it after it started; the engine and worker it spawned inherited it.
    children = psutil.Process(workspace["server_pid"]).children(recursive=True)
    dirs = {child.environ().get("PROMETHEUS_MULTIPROC_DIR") for child in children} - {None}
    assert len(dirs) == 1, dirs
    workspace["metrics_dir"] = dirs.pop()
    assert any(pathlib.Path(workspace["metrics_dir"]).glob("*.db"))

    too_many_experts = variant_of_late(workspace["root"], "bad2", '"num_experts": 3',
                                       '"num_experts": 9')
    assert load_lora(server, "bad2", too_many_experts).status_code == 400
    before = httpx.get(f"{server}/metrics", timeout=10).text
    for name in ("mixlora", "dynmole", "peft", "mixlora"):  # 3 adapters through 2 slots
        assert complete_ids(client, name) == expected[name]
    assert complete_ids(client, BASE_NAME) == expected[BASE_NAME]
    metric_when_above(server, 0, "mole_serve_expert_selections_total", adapter="mixlora")
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert metric(text, "mole_serve_adapter_rejections_total", stage="api_server") >= 1
    assert metric(text, "mole_serve_adapter_loads_total", adapter="mixlora",
                  strategy="mixlora") >= 1
    assert metric(text, "mole_serve_adapter_loads_total", strategy="dynmole") >= 1
    assert metric(text, "mole_serve_adapter_loads_total", adapter="peft", strategy="lora") >= 1
    # peft then mixlora at least take a slot another adapter held
    assert metric(text, "mole_serve_slot_fills_total") - metric(
        before, "mole_serve_slot_fills_total", required=False) >= 2
    assert metric(text, "mole_serve_adapter_evictions_total", place="slot") - metric(
        before, "mole_serve_adapter_evictions_total", required=False, place="slot") >= 1
    assert metric(text, "mole_serve_adapter_load_seconds_count", strategy="mixlora") >= 1
    assert metric(text, "mole_serve_adapter_load_seconds_sum", strategy="mixlora") > 0
    assert metric(text, "mole_serve_requests_total", adapter="mixlora") >= 1
    assert metric(text, "mole_serve_generated_tokens_total", adapter="(base)") >= MAX_TOKENS
    routed = metric(text, "mole_serve_experts_per_token_count", adapter="mixlora")
    assert metric(text, "mole_serve_experts_per_token_sum", adapter="mixlora") == 2 * routed > 0
    assert metric(text, "mole_serve_expert_selections_total", adapter="mixlora", layer="1",
                  router="ffn") > 0
    assert metric(text, "mole_serve_routing_entropy_count", adapter="dynmole") > 0
    assert metric(text, "vllm:request_success_total") >= 1, "vLLM's own metrics stay"


def test_routing_counts_reach_metrics_when_the_engine_goes_idle(server, client, expected):
    """Steps export routing counts at most every metrics_interval_s (here an hour), so the
    counts of a request on an adapter that keeps its slot come from the idle flush."""
    name, labels = "mole_serve_experts_per_token_count", {"adapter": "dynmole"}
    assert complete_ids(client, "dynmole") == expected["dynmole"]  # now in a slot
    before = settled_metric(server, name, **labels)
    assert complete_ids(client, "dynmole") == expected["dynmole"]  # keeps its slot
    assert metric_when_above(server, before, name, **labels) > before


def settled_metric(server: str, name: str, **labels: str) -> float:
    """`name` at /metrics once two reads a second apart agree (earlier exports landed)."""
    previous = None
    for _ in range(30):
        text = httpx.get(f"{server}/metrics", timeout=10).text
        value = metric(text, name, **labels) if name in text else 0.0
        if value == previous:
            return value
        previous = value
        time.sleep(1)
    raise AssertionError(f"{name} {labels} kept changing")


def load_lora(server: str, name: str, path: pathlib.Path) -> httpx.Response:
    return httpx.post(f"{server}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": name, "lora_path": str(path)})


def variant_of_late(root: pathlib.Path, name: str, old: str = "", new: str = "",
                    nan_tensor: bool = False) -> pathlib.Path:
    """A copy of adapter `late` with `old` replaced by `new` in its config (e.g. 9 experts,
    over the server's --max-mole-experts 4) or a NaN in one tensor."""
    from safetensors.torch import load_file, save_file
    bad = root / name
    bad.mkdir()
    config = (root / "late" / "adapter_config.json").read_text()
    assert old in config
    (bad / "adapter_config.json").write_text(config.replace(old, new))
    tensors = load_file(str(root / "late" / "adapter_model.safetensors"))
    if nan_tensor:
        next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    return bad

