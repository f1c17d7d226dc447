"""Which adapter dirs a server admits, and why not, as an AdapterError (HTTP 400).

vLLM-free: `vllm_compat.served_model` reads a `ServedModel` off vLLM's config, and
`vllm_compat` resolves hub ids (then checks the dirs they resolve to here). The API server
checks every requested adapter so a bad one is a 400 naming the problem (vLLM's own answer
is a bare 500); the engine checks each MoLE adapter it loads again (`load_served_adapter`)."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

from .adapter import BaseShape, MoleAdapter
from .checkpoint import (check_plain_lora_fits, is_mole_adapter_dir, load_adapter,
                         served_as_mole)
from .config import CONFIG_NAME, AdapterLimits, read_config_json
from .errors import AdapterError

# Checkpoint architectures served by our Llama class: same layers and weight names. Qwen2
# differs only by its q/k/v biases, which vLLM's Llama attention reads from `qkv_bias`.
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ServedModel:
    """What an adapter is checked against: the served model and the server's limits. Only
    `architectures` is set for a model mole_serve does not serve MoLE adapters on."""

    architectures: tuple[str, ...]
    base: BaseShape | None = None
    limits: AdapterLimits = AdapterLimits()
    families: tuple[str, ...] = ()
    max_lora_rank: int | None = None  # plain LoRA's

    @property
    def serves_mole(self) -> bool:
        return self.base is not None


def load_served_adapter(path: str, name: str, served: ServedModel) -> MoleAdapter:
    """Read and check a MoLE adapter against the served base model and the server's limits."""
    if not served.serves_mole:
        raise AdapterError(name, "base model", f"a checkpoint of {list(LLAMA_FAMILY)}",
                           f"{list(served.architectures)}, which mole_serve does not serve "
                           "MoLE adapters on")
    adapter = load_adapter(path, name, base=served.base, limits=served.limits)
    if adapter.config.family is not None and adapter.config.family not in served.families:
        raise AdapterError(name, f"{CONFIG_NAME}:routing_strategy",
                           f"a strategy of the families this server was started for "
                           f"({list(served.families)}: --additional-config mole.families)",
                           adapter.config.routing_strategy)
    return adapter


def check_local_adapter(path: str, name: str, served: ServedModel) -> None:
    """Raise AdapterError for a bad local path, a bad MoLE dir, or a plain LoRA dir whose
    rank or shapes do not fit. A missing path that reads as a hub id passes: the caller
    resolves those."""
    local = os.path.expanduser(path)
    if served_as_mole(path, name):
        _check_mole_dir(local, name, served)
    elif os.path.isdir(local) and served.serves_mole:  # a base whose shapes we know
        check_plain_lora_fits(pathlib.Path(local), name, served.base, served.max_lora_rank)


def mole_dir_for_base(path: str, base_model_name: str) -> bool:
    """Whether a dir in the LoRA resolver cache is a MoLE adapter for the served model, on
    the terms of vLLM's filesystem resolver: its `base_model_name_or_path` names the model
    as given to vLLM (here also: the same dir by another path)."""
    if not is_mole_adapter_dir(path):
        return False
    try:
        named = read_config_json(path, os.path.basename(path)).get("base_model_name_or_path")
    except AdapterError:
        return False
    if not isinstance(named, str):
        return False
    same_dir = os.path.isdir(named) and os.path.isdir(base_model_name) and \
        os.path.samefile(named, base_model_name)
    return named == base_model_name or same_dir


# Per MoLE dir (real path): its files and the model it passed against, when it last passed.
_PASSED_MOLE_DIRS: dict[str, tuple[tuple, ServedModel]] = {}


def _check_mole_dir(path: str, name: str, served: ServedModel) -> None:
    """`load_served_adapter`, skipped for a dir that passed as its files are now against the
    same model and limits: a dir served under many names (`--lora-modules a=DIR b=DIR ...`)
    is read once."""
    before = _dir_state(path)
    real = os.path.realpath(path)
    if before is not None and _PASSED_MOLE_DIRS.get(real) == (before, served):
        return
    load_served_adapter(path, name, served)
    if before is not None and _dir_state(path) == before:
        _PASSED_MOLE_DIRS[real] = (before, served)


def _dir_state(path: str) -> tuple | None:
    """A dir's files: names, inodes, sizes, modification and change times (a copy that keeps
    the mtime still changes the ctime); None if it cannot be listed."""
    try:
        return tuple(sorted((entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                             stat.st_ctime_ns)
                            for entry in os.scandir(path) if entry.is_file()
                            for stat in (entry.stat(),)))
    except OSError:
        return None
