"""Which adapter dirs a server admits (`mole_serve.admission`), without vLLM: the served
model and limits are given as a `ServedModel`, as `vllm_compat.served_model` reads them."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from mole_serve import admission
from mole_serve.adapter import BaseShape
from mole_serve.admission import ServedModel
from mole_serve.config import AdapterLimits, MoleConfig
from mole_serve.errors import AdapterError
from vllm_helpers import make_mole_adapter, make_peft_lora

BASE = BaseShape(hidden=32, intermediate=64, num_layers=1, num_heads=2, num_kv_heads=2,
                 head_dim=16)
OURS = ("MoleLlamaForCausalLM",)
SERVER = ServedModel(OURS, BASE, AdapterLimits(max_rank=8, max_experts=4),
                     ("mixlora", "dynmole"), max_lora_rank=8)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("admission")
    for strategy in ("mixlora", "dynmole"):
        make_mole_adapter(root / strategy, MoleConfig(
            strategy, num_experts=4, r=8, lora_alpha=16, top_k=2, target_modules=("gate_proj",)),
            BASE, seed=1)
    make_peft_lora(root / "peft-r16", BASE, seed=2, rank=16)
    return root


def test_a_fitting_adapter_is_admitted_and_each_limit_names_its_refusal(adapters):
    adapter = admission.load_served_adapter(str(adapters / "mixlora"), "m", SERVER)
    assert adapter.config.num_experts == 4
    refusals = {
        r"'m': base model: expected a checkpoint of \['LlamaForCausalLM'.*found "
        r"\['GPT2LMHeadModel'\], which mole_serve does not serve MoLE adapters on":
            ServedModel(("GPT2LMHeadModel",)),
        r"'m': adapter_config.json:routing_strategy: expected a strategy of the families this "
        r"server was started for \(\['dynmole'\]": ServedModel(
            OURS, BASE, SERVER.limits, ("dynmole",), 8),
        "'m': adapter_config.json:num_experts: expected <= the server's max experts 3, "
        "found 4": ServedModel(OURS, BASE, AdapterLimits(8, 3), SERVER.families, 8),
        "'m': adapter_config.json:r: expected <= the server's max rank 4, found 8":
            ServedModel(OURS, BASE, AdapterLimits(4, 4), SERVER.families, 8),
        r"'m': mixlora.layers.0.mlp.moe_gate.weight: expected shape \[4, 48\]": ServedModel(
            OURS, dataclasses.replace(BASE, hidden=48), SERVER.limits, SERVER.families, 8),
    }
    for message, served in refusals.items():
        with pytest.raises(AdapterError, match=message):
            admission.load_served_adapter(str(adapters / "mixlora"), "m", served)


def test_requested_paths_and_plain_lora_dirs_are_checked_against_the_server(adapters,
                                                                           tmp_path):
    admission.check_local_adapter("org/on-the-hub", "h", SERVER)  # the caller resolves it
    admission.check_local_adapter(str(adapters / "dynmole"), "d", SERVER)
    with pytest.raises(AdapterError, match="does not exist"):
        admission.check_local_adapter(str(tmp_path / "missing"), "x", SERVER)
    with pytest.raises(AdapterError, match="cannot be read: File name too long"):
        admission.check_local_adapter(str(tmp_path / ("x" * 300)), "x", SERVER)
    (tmp_path / "file").write_text("")
    with pytest.raises(AdapterError, match="is a file"):
        admission.check_local_adapter(str(tmp_path / "file"), "x", SERVER)
    with pytest.raises(AdapterError, match=r"'p': adapter_config.json:r: expected <= the "
                                           r"server's max rank 8, found 16"):
        admission.check_local_adapter(str(adapters / "peft-r16"), "p", SERVER)
    wide = ServedModel(OURS, BASE, SERVER.limits, SERVER.families, max_lora_rank=16)
    admission.check_local_adapter(str(adapters / "peft-r16"), "p", wide)
    # a plain LoRA on a model that is not ours is vLLM's to judge
    admission.check_local_adapter(str(adapters / "peft-r16"), "p", ServedModel(("GPT2",)))


def test_a_mole_dir_is_checked_once_while_it_stays_the_same(adapters, monkeypatch, tmp_path):
    """A dir served under many names (`--lora-modules a=DIR b=DIR ...`) is read once at the
    API server; a changed dir, another model or limits, or one that failed, is read again."""
    checked = []
    load = admission.load_served_adapter

    def counted_load(path, name, served):
        checked.append(name)
        return load(path, name, served)

    monkeypatch.setattr(admission, "load_served_adapter", counted_load)
    monkeypatch.setattr(admission, "_PASSED_MOLE_DIRS", {})
    adapter = tmp_path / "dynmole"  # a copy: its files change below
    shutil.copytree(adapters / "dynmole", adapter)

    def check(name: str, served: ServedModel = SERVER) -> None:
        admission.check_local_adapter(str(adapter), name, served)

    for name in ("a", "b", "c"):
        check(name)
    assert checked == ["a"]
    config = adapter / "adapter_config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    check("d")
    check("d2")
    assert checked == ["a", "d"]
    check("x", ServedModel(OURS, BASE, AdapterLimits(16, 8), SERVER.families, 8))  # limits
    assert checked == ["a", "d", "x"]
    mixlora_only = ServedModel(OURS, BASE, SERVER.limits, ("mixlora",), 8)
    for _ in range(2):
        with pytest.raises(AdapterError, match="families"):
            check("bad", mixlora_only)
    check("s")  # the dir passed against other limits since
    check("s2")
    assert checked == ["a", "d", "x", "bad", "bad", "s"]
    weights = adapter / "adapter_model.safetensors"
    stat, before = weights.stat(), admission._dir_state(str(adapter))
    while admission._dir_state(str(adapter)) == before:  # coarse clocks: until the ctime moves
        weights.write_bytes(weights.read_bytes())  # rewritten as a copy keeping the mtime is
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only the ctime tells
    check("e")
    assert checked[-1] == "e"
    for name in ("f", "g"):  # a model we refuse MoLE adapters on: never passes
        with pytest.raises(AdapterError, match="does not serve MoLE adapters on"):
            check(name, ServedModel(("GPT2",)))
    assert checked[-2:] == ["f", "g"]


def test_a_resolver_cache_dir_is_taken_for_the_base_it_names(adapters, tmp_path):
    """On the terms of vLLM's filesystem resolver: the dir's `base_model_name_or_path` is the
    model as given to vLLM, or the same dir by another path; plain LoRA dirs are vLLM's."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (tmp_path / "link").symlink_to(base_dir)
    for name, named in (("by-path", str(base_dir)), ("by-id", "org/base"), ("unnamed", None)):
        config = MoleConfig("mixlora", num_experts=2, r=2, lora_alpha=4,
                            target_modules=("gate_proj",), base_model_name_or_path=named)
        make_mole_adapter(tmp_path / name, config, BASE, seed=3)
    assert admission.mole_dir_for_base(str(tmp_path / "by-path"), str(base_dir))
    assert admission.mole_dir_for_base(str(tmp_path / "by-path"), str(tmp_path / "link"))
    assert admission.mole_dir_for_base(str(tmp_path / "by-id"), "org/base")
    assert not admission.mole_dir_for_base(str(tmp_path / "by-id"), str(base_dir))
    assert not admission.mole_dir_for_base(str(tmp_path / "unnamed"), str(base_dir))
    assert not admission.mole_dir_for_base(str(tmp_path / "missing"), "org/base")
    assert not admission.mole_dir_for_base(str(tmp_path / ("x" * 300)), "org/base")
    assert not admission.mole_dir_for_base(str(adapters / "peft-r16"), "org/base")
