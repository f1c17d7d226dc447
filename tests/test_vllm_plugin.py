"""The plugin's wiring into vLLM, without starting an engine: CLI flags, what they imply,
stock behaviour without them, and the CPU LoRA -1 slot fix."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap
import types
from unittest import mock

import pytest
import torch

from mole_serve import admission, plugin, vllm_compat
from mole_serve.adapter import BaseShape
from mole_serve.config import MoleConfig
from mole_serve.errors import AdapterError
from tiny_model import make_tiny_llama
from vllm_helpers import engine_env, make_mole_adapter, make_peft_lora, serve_arg_parser


@pytest.fixture(scope="module", autouse=True)
def offline_env():
    with pytest.MonkeyPatch.context() as env:
        for key, value in engine_env().items():
            env.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("plugin") / "tiny-llama")


def parse_serve_args(argv: list[str]):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plugin.register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_register_is_idempotent():
    from vllm.config.speculative import SpeculativeConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core import EngineCoreProc

    def hooks():
        return (EngineArgs.add_cli_args, EngineArgs.create_engine_config,
                EngineCoreProc._process_input_queue,
                SpeculativeConfig.compose_draft_hf_overrides)

    plugin.register()
    patched = hooks()
    plugin.register()
    assert hooks() == patched


def test_cli_flags_land_in_additional_config(tiny_llama, monkeypatch, tmp_path):
    # A directory of "the user's", so the flag leaves this process's metrics alone.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    model = ["--model", str(tiny_llama)]
    engine_args = parse_serve_args([*model, "--enable-mole-adapters", "--max-mole-experts", "4",
                                    "--max-mole-rank", "8", "--additional-config",
                                    '{"other": 1, "mole": {"metrics_interval_s": 0}}'])
    assert engine_args.additional_config == {
        "other": 1, "mole": {"enabled": True, "max_experts": 4, "max_rank": 8,
                             "routing_metrics": True, "metrics_interval_s": 0.0,
                             "backend": "auto", "families": ["mixlora", "dynmole"]}}
    assert parse_serve_args(model).additional_config == {}
    # what the flag writes is read back as it is (no MoLE rank given: --max-lora-rank's)
    plain = parse_serve_args([*model, "--enable-mole-adapters", "--max-lora-rank", "16"])
    assert vllm_compat.slot_capacity(plain.create_engine_config()) == (1, 16, 8)
    # enabled by hand: the flags still apply
    by_hand = parse_serve_args([*model, "--max-mole-experts", "16", "--additional-config",
                                '{"mole": {"enabled": true, "max_rank": 4}}'])
    assert (by_hand.additional_config["mole"]["max_experts"],
            by_hand.additional_config["mole"]["max_rank"]) == (16, 4)
    for flag in ("--max-mole-experts", "--max-mole-rank"):
        with pytest.raises(SystemExit):
            parse_serve_args([*model, "--enable-mole-adapters", flag, "0"])
        with pytest.raises(ValueError, match="need --enable-mole-adapters"):
            parse_serve_args([*model, flag, "4"])


def test_max_mole_rank_sizes_moles_slots_apart_from_plain_lora(tiny_llama):
    """A server with rank-64 plain LoRA need not give every MoLE slot rank 64."""
    from vllm.engine.arg_utils import EngineArgs

    def capacity(**mole):
        config = EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128,
                            max_loras=3, max_lora_rank=64, additional_config={
                                "mole": {"enabled": True, **mole}}).create_engine_config()
        return vllm_compat.slot_capacity(config)

    assert capacity() == (3, 64, 8)
    assert capacity(max_rank=8, max_experts=4) == (3, 8, 4)
    with pytest.raises(ValueError, match=r"max_rank: expected an integer >= 1, found 0"):
        capacity(max_rank=0)


def test_the_enabled_setting_alone_sets_up_multiprocess_metrics(tiny_llama, monkeypatch):
    """`mole.enabled` given by hand serves MoLE as the flag does: the worker's series must
    reach /metrics too."""
    from mole_serve import vllm_compat

    calls = []
    monkeypatch.setattr(vllm_compat, "use_multiprocess_metrics", lambda: calls.append(1))
    model = ["--model", str(tiny_llama)]
    parse_serve_args(model)
    assert calls == [], "stock vLLM: untouched"
    parse_serve_args([*model, "--additional-config", '{"mole": {"enabled": true}}'])
    assert calls == [1]


@pytest.fixture(scope="module")
def startup_adapters(tmp_path_factory):
    """One dir per kind an adapter of `--lora-modules` can be (tiny shapes: only the
    configs are read when the flags are parsed)."""
    root = tmp_path_factory.mktemp("startup_adapters")
    base = BaseShape(hidden=32, intermediate=48, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=16)
    for strategy in ("mixlora-dynamic", "dynmole"):
        config = MoleConfig(strategy, num_experts=2, r=2, lora_alpha=4,
                            target_modules=("gate_proj",))
        make_mole_adapter(root / strategy, config, base, seed=1)
    make_peft_lora(root / "peft", base, seed=2)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text('{"peft_type": "MIXLORA"}')
    return root


@pytest.mark.parametrize("served, runtime_updating, families", [
    (["mixlora-dynamic", "peft"], False, ["mixlora"]),
    (["dynmole"], False, ["dynmole"]),
    (["dynmole", "mixlora-dynamic"], False, ["mixlora", "dynmole"]),
    (["peft"], False, ["mixlora"]),  # no MoLE adapter: the lighter build
    # adapters may be loaded later, or a module's family cannot be read here: every family
    (["mixlora-dynamic"], True, ["mixlora", "dynmole"]),
    (["mixlora-dynamic", "broken"], False, ["mixlora", "dynmole"]),
    (["mixlora-dynamic", "org/hub-adapter"], False, ["mixlora", "dynmole"]),
    ([], False, ["mixlora", "dynmole"]),
])
def test_vllm_serve_builds_the_families_its_lora_modules_need(
        tiny_llama, startup_adapters, monkeypatch, tmp_path, served, runtime_updating,
        families):
    import vllm.envs
    from vllm.engine.arg_utils import AsyncEngineArgs

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    # an attribute beats vllm.envs' (possibly cached) lazy lookup
    monkeypatch.setattr(vllm.envs, "VLLM_ALLOW_RUNTIME_LORA_UPDATING", runtime_updating,
                        raising=False)
    modules = [f"{name.replace('/', '-')}="
               f"{startup_adapters / name if '/' not in name else name}" for name in served]
    argv = ["--model", str(tiny_llama), "--enable-mole-adapters",
            *(["--lora-modules", *modules] if modules else [])]
    args = serve_arg_parser().parse_args(argv)
    assert AsyncEngineArgs.from_cli_args(args).additional_config["mole"]["families"] == families
    # the user's choice stands
    args = serve_arg_parser().parse_args(
        [*argv, "--additional-config", '{"mole": {"families": ["dynmole", "mixlora"]}}'])
    assert AsyncEngineArgs.from_cli_args(args).additional_config["mole"]["families"] == [
        "mixlora", "dynmole"]


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_enabled_implies_lora_and_mole_architecture(tiny_llama, architecture):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128,
                        hf_overrides={"architectures": [architecture]},
                        additional_config={"mole": {"enabled": True}}).create_engine_config()
    assert config.model_config.architectures == ["MoleLlamaForCausalLM"]
    assert config.lora_config is not None


@pytest.mark.parametrize("method, draft_architecture", [
    ("eagle", "EagleLlamaForCausalLM"), ("draft_model", "LlamaForCausalLM")])
def test_a_speculative_draft_keeps_its_architecture(tiny_llama, tmp_path, method,
                                                     draft_architecture):
    """vLLM applies a callable hf_overrides to the draft too: ours must map the target only
    (an EAGLE draft became 'EagleMoleLlamaForCausalLM', which vLLM refused), and the user's
    dict overrides stay target-only as in stock vLLM."""
    from vllm.engine.arg_utils import EngineArgs

    draft = make_tiny_llama(tmp_path / "draft", layers=1)
    config = EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=128,
                        hf_overrides={"rms_norm_eps": 1e-3},
                        speculative_config={"method": method, "model": str(draft),
                                            "num_speculative_tokens": 2},
                        additional_config={"mole": {"enabled": True}}).create_engine_config()
    assert config.model_config.architectures == ["MoleLlamaForCausalLM"]
    assert config.model_config.hf_config.rms_norm_eps == 1e-3
    draft_config = config.speculative_config.draft_model_config
    assert draft_config.architectures == [draft_architecture]
    assert draft_config.hf_config.rms_norm_eps != 1e-3


@pytest.mark.parametrize("tp_rank, first_stage, counts", [
    (0, True, True), (1, True, False), (0, False, False)])
def test_only_the_first_rank_of_the_first_stage_counts_adapter_events(
        monkeypatch, tp_rank, first_stage, counts):
    """Every tensor-parallel rank and pipeline stage loads and evicts the same adapters."""
    import vllm.distributed
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: tp_rank)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(vllm.distributed, "get_pp_group",
                        lambda: types.SimpleNamespace(is_first_rank=first_stage))
    assert vllm_compat.counts_adapter_events() == counts


def test_without_flag_vllm_is_stock_and_refuses_mole_adapters(tiny_llama, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(tiny_llama), dtype="float32",
                        max_model_len=128).create_engine_config()
    assert config.model_config.architectures == ["LlamaForCausalLM"]
    assert config.lora_config is None

    adapter_dir = tmp_path / "mixlora"
    make_mole_adapter(adapter_dir, MoleConfig("mixlora", 2, 4, 8, ("gate_proj",)),
                      BaseShape.from_hf_config(config.model_config.hf_config), seed=0)
    assert vllm_compat.is_mole_adapter_dir(str(adapter_dir))
    with pytest.raises(AdapterError, match=r"'mixlora': base model: expected a checkpoint of"):
        admission.load_served_adapter(str(adapter_dir), "mixlora",
                                      vllm_compat.served_model(config))


def test_vllm_serve_help_documents_the_flags():
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True,
                            env=dict(os.environ, **engine_env()), timeout=300)
    vllm = str(pathlib.Path(sys.executable).parent / "vllm")  # the venv's, as installed
    groups = run([vllm, "serve", "--help"]).stdout
    assert "MoLE adapters" in groups and "Mixture-of-LoRA-Experts" in groups
    flags = run([vllm, "serve", "--help=MoLE adapters"]).stdout
    assert "--enable-mole-adapters" in flags and "Implies --enable-lora" in flags
    assert "--max-mole-experts" in flags and "--max-mole-rank" in flags


def test_plugin_leaves_vllm_code_alone_until_a_mole_model_is_served(tiny_llama):
    """In a fresh process that loads the plugins as vLLM does and builds a config without the
    flag, vLLM's own LoRA ops are untouched (the CPU fix comes with our model class)."""
    script = textwrap.dedent(f"""
        from vllm.engine.arg_utils import EngineArgs
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        config = EngineArgs(model={str(tiny_llama)!r}, dtype="float32",
                            max_model_len=128).create_engine_config()
        print(config.model_config.architectures, hasattr(lora_ops.bgmv_shrink,
                                                         "_mole_serve_patched"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, **engine_env()), timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "['LlamaForCausalLM'] False", \
        result.stderr[-2000:]


def test_unknown_mole_setting_is_a_clear_error(tiny_llama):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="unknown keys.*max_expert"):
        EngineArgs(model=str(tiny_llama), additional_config={
            "mole": {"enabled": True, "max_expert": 4}}).create_engine_config()
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'kernels', "
                                         r"'reference'\], found 'triton'"):
        EngineArgs(model=str(tiny_llama), additional_config={
            "mole": {"enabled": True, "backend": "triton"}}).create_engine_config()
    with pytest.raises(ValueError, match=r"families: expected a non-empty list of "
                                         r"\['mixlora', 'dynmole'\], found \['moe'\]"):
        EngineArgs(model=str(tiny_llama), additional_config={
            "mole": {"enabled": True, "families": ["moe"]}}).create_engine_config()
    with pytest.raises(ValueError, match=r"routing_metrics: expected true or false, "
                                         r"found 'false'"):
        EngineArgs(model=str(tiny_llama), additional_config={
            "mole": {"enabled": True, "routing_metrics": "false"}}).create_engine_config()


def test_cpu_lora_ops_leave_no_adapter_rows_alone():
    """vLLM's torch LoRA ops read slot -1 as the last slot; fixed, those rows keep their
    output as the GPU kernels' early exit does."""
    vllm_compat.fix_cpu_lora_no_adapter_rows()     # what our model class does on a CPU
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    x = torch.randn(3, 16)
    a = torch.randn(2, 1, 4, 16)          # [slots, 1, rank, in]
    b = torch.randn(2, 1, 8, 4)           # [slots, 1, out, rank]
    slots = torch.tensor([0, -1, 1])
    shrunk = torch.full((3, 4), 7.0)
    bgmv_shrink(x, a, shrunk, slots, 1.0)
    assert torch.equal(shrunk[1], torch.full((4,), 7.0))
    torch.testing.assert_close(shrunk[2], a[1, 0] @ x[2])
    y = torch.ones(3, 8)
    bgmv_expand(shrunk, b, y, slots, add_inputs=True)
    assert torch.equal(y[1], torch.ones(8))
    torch.testing.assert_close(y[0], 1 + b[0, 0] @ shrunk[0])
    # The prompt-logprobs pass: one request's 5 prompt rows, the step's per-request slots.
    without_logits_lora = torch.cat([a[:1], torch.zeros_like(a[1:])])  # slot 1: none
    for step_slots in ([-1], [-1, -1], [1, -1]):  # no request of the step has logits LoRA
        rows = torch.full((5, 4), 7.0)
        bgmv_shrink(torch.randn(5, 16), without_logits_lora, rows, torch.tensor(step_slots),
                    1.0)
        assert torch.equal(rows, torch.full((5, 4), 7.0))
    rows, prompt = torch.zeros(5, 4), torch.randn(5, 16)
    bgmv_shrink(prompt, a, rows, torch.tensor([1]), 1.0)  # one request: vLLM broadcasts it
    torch.testing.assert_close(rows, prompt @ a[1, 0].T)


def test_lora_finds_the_device_of_a_linear_whose_weight_was_prepacked():
    """vLLM's CPU int8 kernel sets a linear's `weight` to None; its LoRA wrapper then takes
    the device off the layer's other tensors (tests/test_vllm_quantized.py serves one)."""
    vllm_compat.fix_cpu_lora_device_of_prepacked_weights()  # what our model class does on CPU
    vllm_compat.fix_cpu_lora_device_of_prepacked_weights()  # and again: wrapped once
    from vllm.lora.layers import base_linear

    prepacked = torch.nn.Module()
    prepacked.weight = None
    prepacked.weight_scale = torch.nn.Parameter(torch.ones(4, 1, device="meta"))
    assert base_linear._get_lora_device(prepacked) == torch.device("meta")
    assert base_linear._get_lora_device(torch.nn.Linear(2, 3)) == torch.device("cpu")
    assert not getattr(base_linear._get_lora_device.__wrapped__, "_mole_serve_patched", False)
    with pytest.raises(AttributeError):  # no tensor at all: vLLM's own error
        bare = torch.nn.Module()
        bare.weight = None
        base_linear._get_lora_device(bare)


def test_hf_overrides_apply_as_vllm_applies_them():
    """With the flag our `hf_overrides` callable wraps the user's dict: a dict attribute is
    replaced, a nested config updated key by key, as stock vLLM does."""
    from transformers import LlamaConfig, PretrainedConfig

    config = PretrainedConfig(architectures=["LlamaForCausalLM"], hidden_size=64,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    config.text_config = LlamaConfig(hidden_size=64, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": 1e4})
    overrides = {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "hidden_size": 96,
                 "text_config": {"hidden_size": 96, "rope_parameters": {"factor": 2.0}}}
    config = vllm_compat.UseMoleArchitecture(overrides)(config)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0}
    assert config.hidden_size == 96 and config.text_config.hidden_size == 96
    assert config.text_config.rope_parameters["factor"] == 2.0
    assert config.text_config.rope_parameters["rope_theta"] == 1e4
    assert config.architectures == ["MoleLlamaForCausalLM"]


def test_a_hub_adapter_that_cannot_be_had_is_refused_naming_why(tmp_path, monkeypatch):
    """A missing path that reads as a hub id is vLLM's to download; offline (HF_HUB_OFFLINE,
    no ModelScope) and not cached, vLLM would answer 500: a 400 names it instead. One it
    can have is checked as a local dir is."""
    import huggingface_hub.constants
    import vllm.envs

    from mole_serve.errors import AdapterError

    vllm.envs.disable_envs_cache()  # an earlier in-process engine froze the variables
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "models--org--cached"
    (cached / "snapshots" / "c0ffee").mkdir(parents=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("c0ffee")
    (cached / "snapshots" / "c0ffee" / "adapter_config.json").write_text('{"r": 8}')
    check = vllm_compat._check_requested_adapter
    not_ours = types.SimpleNamespace(
        model_config=types.SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    for offline, modelscope in ((False, "0"), (True, "1")):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("VLLM_USE_MODELSCOPE", modelscope)
        # vLLM may download it; a download that fails leaves the path as it was
        with mock.patch("vllm.lora.utils.get_adapter_absolute_path", lambda path: path):
            check("org/missing", "a", not_ours)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "0")
    check("org/cached", "a", not_ours)                       # vLLM finds it in the cache
    with pytest.raises(AdapterError, match=r"HF_HUB_OFFLINE forbids downloading hub repo "
                                           r"'org/missing', which is not in the cache"):
        check("org/missing", "a", not_ours)
    # a cached (or fetched) MoLE adapter is checked as a local dir is: a 400, not the engine's 500
    (cached / "snapshots" / "c0ffee" / "adapter_config.json").write_text(
        '{"peft_type": "MIXLORA"}')
    with pytest.raises(AdapterError, match="does not serve MoLE adapters on"):
        check("org/cached", "a", not_ours)
