"""Checks `mole_serve.vllm_compat` against the vLLM release on the path, without an engine,
so a release we cannot run here (the GPU host's CUDA vLLM 0.26.0: its wheel's Python sources)
is checked on the CPU box too. Run by tests/test_vllm_releases.py; prints what it checked.

1. Every hook installs: each vLLM method and function we wrap (`HOOKS`) exists beforehand,
   and those are all the hooks found afterwards.
2. Each wrapper takes the named parameters of what it wraps (vLLM calls it in its place; a
   wrapper's *args / **kwargs pass the rest on).
3. `vllm serve`'s parser takes our flags, and they land in `additional_config`.
4. vLLM's HF-hub LoRA resolver (faked hub) takes a MoLE dir made for the served base, a
   refused one is a 400 naming why, one for another base vLLM's 404.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pathlib
import sys
import tempfile
import types
from collections import defaultdict

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import vllm  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from mole_serve import plugin, vllm_compat  # noqa: E402
from mole_serve.adapter import BaseShape  # noqa: E402
from mole_serve.config import MoleConfig  # noqa: E402
from vllm_helpers import make_mole_adapter  # noqa: E402


# Every vLLM attribute vllm_compat replaces (a new hook fails the check until listed here).
HOOKS = (
    "vllm.config.speculative.SpeculativeConfig.compose_draft_hf_overrides",
    "vllm.engine.arg_utils.EngineArgs.add_cli_args",
    "vllm.engine.arg_utils.EngineArgs.create_engine_config",
    "vllm.engine.arg_utils.EngineArgs.from_cli_args",
    "vllm.entrypoints.openai.models.serving.OpenAIServingModels."
    "_check_load_lora_adapter_request",
    "vllm.entrypoints.openai.models.serving.OpenAIServingModels.resolve_lora",
    "vllm.lora.layers.base_linear._get_lora_device",
    "vllm.lora.model_manager.AdapterLRUCache._on_remove",
    "vllm.lora.model_manager.LoRAModelManager._create_merged_loras_inplace",
    "vllm.lora.model_manager.LoRAModelManager._deactivate_adapter",
    "vllm.lora.model_manager.LoRAModelManager._set_adapter_mapping",
    "vllm.lora.model_manager.LoRAModelManager.activate_adapter",
    *(f"{module}.{op}" for module in ("vllm.lora.ops.torch_ops", "vllm.lora.ops.torch_ops.lora_ops",
                                      "vllm.lora.punica_wrapper.punica_cpu")
      for op in ("bgmv_expand", "bgmv_expand_slice", "bgmv_shrink")),
    "vllm.lora.worker_manager.WorkerLoRAManager._load_adapter",
    "vllm.lora.worker_manager.WorkerLoRAManager.set_active_adapters",
    "vllm.plugins.lora_resolvers.filesystem_resolver.FilesystemResolver._get_lora_req_from_path",
    "vllm.v1.engine.core.EngineCoreProc._process_engine_step",
    "vllm.v1.engine.core.EngineCoreProc._process_input_queue",
    "vllm.v1.engine.output_processor.OutputProcessor.process_outputs",
)


def check_hooks_exist() -> None:
    """Before anything is installed: each hooked attribute is the release's own function (an
    install may otherwise create a name the release no longer has, which nothing calls)."""
    for where in HOOKS:
        parts = where.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                owner = importlib.import_module(".".join(parts[:split]))
                break
            except ModuleNotFoundError:
                continue
        for name in parts[split:-1]:
            owner = getattr(owner, name)
        value = inspect.getattr_static(owner, parts[-1], None)
        value = getattr(value, "__func__", value)  # static and class methods
        assert isinstance(value, types.FunctionType), f"{where}: not in vLLM {vllm.__version__}"


def install_every_hook() -> None:
    """What `register()` installs in every process, and the rest in the processes that
    serve MoLE adapters (the CPU fixes on a CPU only)."""
    plugin.register()
    vllm_compat.install_request_metrics()
    vllm_compat.take_mole_dirs_in_lora_resolvers()
    vllm_compat.fix_cpu_lora_no_adapter_rows()
    vllm_compat.fix_cpu_lora_device_of_prepacked_weights()


def our_wrappers() -> dict[str, types.FunctionType]:
    """Every function of vllm_compat's now in a vLLM module or class, by where it sits."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if not (module_name == "vllm" or module_name.startswith("vllm.")) or module is None:
            continue
        owners = [(module_name, module)] + [
            (f"{module_name}.{name}", value) for name, value in vars(module).items()
            if isinstance(value, type) and value.__module__ == module_name]
        for owner_name, owner in owners:
            for name, value in list(vars(owner).items()):
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if isinstance(value, types.FunctionType) and \
                        value.__code__.co_filename.endswith("vllm_compat.py"):
                    found[f"{owner_name}.{name}"] = value
    return found


def check_parameters(where: str, wrapper: types.FunctionType) -> None:
    """The wrapper's named parameters are those of the function it wraps, in order (a
    wrapper taking *args / **kwargs passes the rest on as given)."""
    wrapped = getattr(wrapper, "__wrapped__", None)
    assert wrapped is not None, f"{where}: no functools.wraps, so nothing to compare"
    ours = list(inspect.signature(wrapper, follow_wrapped=False).parameters.values())
    theirs = list(inspect.signature(wrapped).parameters.values())
    named = [p.name for p in ours if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    passes_rest = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ours)
    expected = [p.name for p in theirs][:len(named)] if passes_rest else \
        [p.name for p in theirs]
    assert named == expected, f"{where}: takes {named}, vLLM's takes {[p.name for p in theirs]}"


def check_cli_flags(model_dir: str) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model_dir, "--enable-mole-adapters",
                              "--max-mole-experts", "4", "--max-mole-rank", "8"])
    settings = AsyncEngineArgs.from_cli_args(args).additional_config["mole"]
    assert (settings["enabled"], settings["max_experts"], settings["max_rank"]) == (True, 4, 8), \
        settings


def check_hub_resolver(root: pathlib.Path) -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.plugins.lora_resolvers import hf_hub_resolver
    from vllm.utils.counter import AtomicCounter

    hf_config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(architectures=[vllm_compat.MOLE_ARCHITECTURE],
                                           hf_config=hf_config, model="/served/base"),
        lora_config=types.SimpleNamespace(max_loras=2, max_lora_rank=8),
        additional_config={"mole": {"enabled": True, "max_experts": 4}})
    snapshot = root / "snapshot"
    for name, experts, base_name in (("math", 4, "/served/base"), ("big", 6, "/served/base"),
                                     ("other", 4, "org/other-model")):
        make_mole_adapter(snapshot / name, MoleConfig(
            "mixlora", experts, 4, 8, ("gate_proj",), base_model_name_or_path=base_name),
            BaseShape.from_hf_config(hf_config), seed=0)

    class FakeHub:
        def list_repo_files(self, repo_id):
            return [str(path.relative_to(snapshot)) for path in snapshot.rglob("*")]

        def snapshot_download(self, repo_id, allow_patterns):
            return str(snapshot)

    hf_hub_resolver.hf_api = FakeHub
    loaded = []

    async def add_lora(request):
        loaded.append(request.lora_name)

    models = types.SimpleNamespace(
        engine_client=types.SimpleNamespace(vllm_config=config, add_lora=add_lora),
        model_config=config.model_config, lora_requests={}, lora_id_counter=AtomicCounter(0),
        lora_resolver_lock=defaultdict(asyncio.Lock),
        lora_resolvers=[hf_hub_resolver.HfHubResolver(["org/moles"])])

    def resolve(name: str):
        return asyncio.run(OpenAIServingModels.resolve_lora(models, name))

    assert resolve("org/moles/math").lora_path == str(snapshot / "math")
    refused = resolve("org/moles/big")
    assert refused.error.code == 400, refused
    assert "max experts 4, found 6" in refused.error.message, refused.error.message
    assert resolve("org/moles/other").error.code == 404
    assert loaded == ["org/moles/math"], loaded


def main() -> None:
    check_hooks_exist()
    install_every_hook()
    wrappers = our_wrappers()
    assert sorted(wrappers) == sorted(HOOKS), \
        f"hooks installed but not listed: {sorted(set(wrappers) - set(HOOKS))}; " \
        f"listed but not installed: {sorted(set(HOOKS) - set(wrappers))}"
    for where, wrapper in sorted(wrappers.items()):
        check_parameters(where, wrapper)
    with tempfile.TemporaryDirectory() as root:
        check_cli_flags(root)
        check_hub_resolver(pathlib.Path(root))
    print(f"vLLM {vllm.__version__}: {len(wrappers)} wrappers match what they wrap:")
    print("\n".join(sorted(wrappers)))
    print("CLI flags, hub resolver: ok")


if __name__ == "__main__":
    main()
