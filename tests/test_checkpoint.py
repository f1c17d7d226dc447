"""Adapter dirs: write/read round trips (safetensors and the peers' .bin), the legacy m-LoRA
layout, DynMoLE keys, and one clear AdapterError per malformed input."""

import dataclasses
import json
import pickle
import re

import pytest
import torch

from conftest import ODD_BASE, random_adapters
from mole_serve.adapter import BaseShape
from mole_serve.checkpoint import (BIN_NAME, SAFETENSORS_NAME, is_mole_adapter_dir,
                                   load_adapter, save_adapter, served_as_mole,
                                   state_dict_items)
from mole_serve.config import CONFIG_NAME, AdapterLimits
from mole_serve.errors import AdapterError
from mole_serve.reference import FrozenFFN, ffn_literal


def assert_same_adapter(a, b):
    assert a.config == b.config
    left, right = dict(state_dict_items(a)), dict(state_dict_items(b))
    assert list(left) == list(right)
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("name", ["topk", "dynamic", "switch", "dynmole", "top1", "lora"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_round_trip(tmp_path, adapters, name, fmt):
    adapter = adapters[name]
    save_adapter(adapter, tmp_path, safetensors=fmt == "safetensors", bin=fmt == "bin")
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json",
                                                    SAFETENSORS_NAME if fmt == "safetensors"
                                                    else BIN_NAME}
    assert_same_adapter(load_adapter(tmp_path, name, base=ODD_BASE), adapter)
    assert_same_adapter(load_adapter(tmp_path, name), adapter)  # shapes inferred, no base


def test_saving_over_an_adapter_dir_leaves_none_of_its_weights(tmp_path, adapters):
    """MoE-PEFT reads the `.bin`, we read the safetensors first: a stale file of either
    beside a new config would be another adapter's weights."""
    save_adapter(adapters["topk"], tmp_path, bin=True)
    save_adapter(adapters["lora"], tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", SAFETENSORS_NAME}
    save_adapter(adapters["dynmole"], tmp_path, safetensors=False, bin=True)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", BIN_NAME}
    assert_same_adapter(load_adapter(tmp_path, "dynmole"), adapters["dynmole"])


def test_bf16_files_load_as_the_bf16_rounded_weights(tmp_path, adapters):
    adapter = adapters["dynmole"]
    save_adapter(adapter, tmp_path / "fp32")
    save_adapter(adapter, tmp_path / "bf16", dtype=torch.bfloat16)
    sizes = [(tmp_path / d / SAFETENSORS_NAME).stat().st_size for d in ("fp32", "bf16")]
    assert sizes[1] < 0.6 * sizes[0]
    loaded = dict(state_dict_items(load_adapter(tmp_path / "bf16", "dynmole", base=ODD_BASE)))
    for key, value in state_dict_items(adapter):
        assert torch.equal(loaded[key], value.bfloat16().float()), key


def test_modern_key_names(adapters):
    keys = [k for k, _ in state_dict_items(adapters["topk"])]
    assert keys[0] == "mixlora.layers.0.mlp.moe_gate.weight"
    assert "mixlora.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "mixlora.layers.0.mlp.down_proj.experts.3.lora_B.weight" in keys
    dyn = [k for k, _ in state_dict_items(adapters["dynmole"])]
    assert "dynmole.layers.0.self_attn.q_proj.moe_gate.weight" in dyn
    assert "dynmole.layers.1.mlp.up_proj.experts.5.lora_A.weight" in dyn
    lora = [k for k, _ in state_dict_items(adapters["lora"])]
    assert lora[:2] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in lora


def test_legacy_checkpoint_loads_to_the_same_numbers(tmp_path, adapters):
    """alpaca-mixlora-7b's m-LoRA layout: `mixtral`, w1/w2/w3, layers.L.gate, layers.L.experts."""
    modern = adapters["topk"]
    legacy_names = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"}
    tensors = {}
    for key, value in state_dict_items(modern):
        parts = key.split(".")
        if parts[3:5] == ["mlp", "moe_gate"]:
            key = f"mixlora.layers.{parts[2]}.gate.weight"
        elif parts[3] == "mlp":  # mixlora.layers.L.mlp.PROJ.experts.E.lora_X.weight
            key = (f"mixlora.layers.{parts[2]}.experts.{parts[6]}.{legacy_names[parts[4]]}."
                   f"{parts[7]}.weight")
        tensors[key] = value.clone()
    torch.save(tensors, tmp_path / BIN_NAME)
    raw = modern.config.to_dict()
    raw.update(routing_strategy="mixtral", target_modules=["q_proj", "k_proj", "v_proj",
                                                            "o_proj", "w1_proj", "w2_proj",
                                                            "w3_proj"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    legacy = load_adapter(tmp_path, "legacy", base=ODD_BASE)
    assert_same_adapter(legacy, modern)
    base = FrozenFFN(torch.randn(200, 96), torch.randn(200, 96), torch.randn(96, 200))
    x = torch.randn(9, 96)
    assert torch.equal(ffn_literal(x, base, legacy.layers[1], legacy.config),
                       ffn_literal(x, base, modern.layers[1], modern.config))


def test_bin_with_parameters_loads_with_weights_only(tmp_path, adapters):
    """MoE-PEFT saves nn.Parameter values; they must still load with weights_only=True."""
    save_adapter(adapters["topk"], tmp_path, safetensors=False, bin=True)
    tensors = torch.load(tmp_path / BIN_NAME, weights_only=True)
    torch.save({k: torch.nn.Parameter(v) for k, v in tensors.items()}, tmp_path / BIN_NAME)
    assert_same_adapter(load_adapter(tmp_path, "p"), adapters["topk"])


def test_bin_not_a_name_to_tensor_dict_is_refused(tmp_path, adapters):
    adapters["topk"].config.save(tmp_path)
    torch.save({0: torch.zeros(4, 96)}, tmp_path / BIN_NAME)
    with pytest.raises(AdapterError, match="adapter_model.bin: expected a dict of tensors by "
                                           "name, found a dict with other keys"):
        load_adapter(tmp_path, "p")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, adapters):
    adapters["topk"].config.save(tmp_path)
    with open(tmp_path / BIN_NAME, "wb") as f:
        pickle.dump({"mixlora.layers.0.mlp.moe_gate.weight": Evil()}, f, protocol=2)
    with pytest.raises(AdapterError, match="adapter 'evil': adapter_model.bin: expected a "
                                           "readable weights file"):
        load_adapter(tmp_path, "evil")


def write_tensors(tmp_path, adapter, edit):
    tensors = {k: v.clone() for k, v in state_dict_items(adapter)}
    edit(tensors)
    adapter.config.save(tmp_path)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / SAFETENSORS_NAME))


GATE = "mixlora.layers.1.mlp.moe_gate.weight"
EXPERT_B = "mixlora.layers.0.mlp.up_proj.experts.2.lora_B.weight"


@pytest.mark.parametrize("edit, item, expected, found", [
    (lambda t: t.pop(EXPERT_B), EXPERT_B, "present (tensor of shape [200, 8])",
     "missing (1 missing keys in all)"),
    (lambda t: t.update({"mixlora.layers.0.mlp.classifier.weight": torch.zeros(2)}),
     "mixlora.layers.0.mlp.classifier.weight", "no such tensor", "an unexpected key"),
    (lambda t: t.update({GATE: torch.zeros(4, 95)}), GATE, "shape [4, 96]", "shape [4, 95]"),
    (lambda t: t[EXPERT_B].__setitem__((0, 0), float("nan")), EXPERT_B, "finite values",
     "1 NaN/Inf values"),
    (lambda t: t[GATE].__setitem__((1, 1), float("inf")), GATE, "finite values",
     "1 NaN/Inf values"),
    (lambda t: t.update({GATE: torch.zeros(4, 96, dtype=torch.int32)}), GATE,
     "fp32, fp16, bf16 or fp64 weights", "torch.int32"),
    (lambda t: t.update({GATE: torch.zeros(4, 96, dtype=torch.float8_e4m3fn)}), GATE,
     "fp32, fp16, bf16 or fp64 weights", "torch.float8_e4m3fn"),
])
def test_malformed_tensors_name_the_tensor(tmp_path, adapters, edit, item, expected, found):
    write_tensors(tmp_path, adapters["topk"], edit)
    with pytest.raises(AdapterError) as info:
        load_adapter(tmp_path, "math", base=ODD_BASE)
    err = info.value
    assert (err.adapter, err.item) == ("math", item)
    assert expected in err.expected and found in err.found


def test_base_model_mismatch(tmp_path, adapters):
    save_adapter(adapters["topk"], tmp_path)
    wider = BaseShape(hidden=128, intermediate=200, num_layers=2, num_heads=4, num_kv_heads=1,
                      head_dim=32)
    with pytest.raises(AdapterError, match=r"expected shape \[4, 128\], found shape \[4, 96\]"):
        load_adapter(tmp_path, "math", base=wider)
    deeper = BaseShape(96, 200, 3, 3, 1, 32)
    with pytest.raises(AdapterError, match="mixlora.layers.2.mlp.moe_gate.weight: expected "
                                           "present"):
        load_adapter(tmp_path, "math", base=deeper)


@pytest.mark.parametrize("name, act_fn, refused", [
    ("topk", "gelu", True), ("topk", "relu", True), ("topk", "silu", False),
    ("topk", None, False), ("dynmole", "gelu", False),  # DynMoLE's experts are per linear
])
def test_experts_activation_must_be_the_base_models(tmp_path, adapters, name, act_fn, refused):
    """MixLoRA experts run the FFN with the adapter's act_fn in the peers, with the base's
    here: any other is refused where the base is known, not silently misread."""
    save_adapter(adapters[name], tmp_path)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    raw.pop("act_fn", None)
    if act_fn is not None:
        raw["act_fn"] = act_fn
    (tmp_path / CONFIG_NAME).write_text(json.dumps(raw))
    silu_base = dataclasses.replace(ODD_BASE, hidden_act="silu")
    load_adapter(tmp_path, "math")  # the base unknown: nothing to compare with
    load_adapter(tmp_path, "math", base=ODD_BASE)  # nor when the base's is not known
    if not refused:
        load_adapter(tmp_path, "math", base=silu_base)
        return
    with pytest.raises(AdapterError) as info:
        load_adapter(tmp_path, "math", base=silu_base)
    assert info.value.item == f"{CONFIG_NAME}:act_fn"
    assert "the base model's activation 'silu'" in info.value.expected
    assert info.value.found == repr(act_fn)


def test_equal_activation_names_are_accepted(tmp_path, adapters):
    save_adapter(adapters["topk"], tmp_path)
    raw = dict(json.loads((tmp_path / CONFIG_NAME).read_text()), act_fn="gelu_new")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(raw))
    load_adapter(tmp_path, "math",
                 base=dataclasses.replace(ODD_BASE, hidden_act="gelu_pytorch_tanh"))


def test_limits_and_missing_files(tmp_path, adapters):
    save_adapter(adapters["dynmole"], tmp_path)
    with pytest.raises(AdapterError, match="max rank 4"):
        load_adapter(tmp_path, "d", limits=AdapterLimits(max_rank=4))
    with pytest.raises(AdapterError, match="max experts 4"):
        load_adapter(tmp_path, "d", limits=AdapterLimits(max_experts=4))
    (tmp_path / SAFETENSORS_NAME).unlink()
    with pytest.raises(AdapterError, match="found neither file"):
        load_adapter(tmp_path, "d")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing", "d")


def test_truncated_safetensors(tmp_path, adapters):
    save_adapter(adapters["switch"], tmp_path)
    data = (tmp_path / SAFETENSORS_NAME).read_bytes()
    (tmp_path / SAFETENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="readable weights file"):
        load_adapter(tmp_path, "s")


def test_other_seed_differs():
    """Guard for the round-trip tests: two seeds must give different adapters."""
    a, b = random_adapters(seed=7)["topk"], random_adapters(seed=8)["topk"]
    assert not torch.equal(a.layers[0].router, b.layers[0].router)


def test_is_mole_adapter_dir(tmp_path, adapters):
    for name in ("topk", "dynmole", "lora"):
        save_adapter(adapters[name], tmp_path / name)
    assert is_mole_adapter_dir(tmp_path / "topk") and is_mole_adapter_dir(tmp_path / "dynmole")
    assert not is_mole_adapter_dir(tmp_path / "lora")      # vLLM loads plain LoRA itself
    assert not is_mole_adapter_dir(tmp_path / "missing")


def test_served_as_mole_sorts_paths_and_names_what_is_wrong(tmp_path, adapters, monkeypatch):
    for name in ("topk", "lora"):
        save_adapter(adapters[name], tmp_path / name)
    assert served_as_mole(str(tmp_path / "topk"), "a")
    assert not served_as_mole(str(tmp_path / "lora"), "a")      # vLLM's loader
    monkeypatch.chdir(tmp_path)
    assert not served_as_mole("org/hub-name", "a")               # maybe a hub id: vLLM's call
    assert served_as_mole("topk", "a")                           # relative and present
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / CONFIG_NAME).write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / CONFIG_NAME).write_text("[1]")
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / CONFIG_NAME).write_text('{"peft_type": "PREFIX_TUNING"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "untyped").mkdir()            # a LoRA config without peft_type: vLLM's
    (tmp_path / "untyped" / CONFIG_NAME).write_text('{"r": 8, "lora_alpha": 16}')
    assert not served_as_mole("untyped", "a")
    cases = {str(tmp_path / "gone"): ("path", "does not exist"),
             "./gone": ("path", "does not exist"),
             "adapters/math/gone": ("path", "does not exist"),   # no hub id has two slashes
             "ädapter": ("path", "does not exist"),
             "org/name.git": ("path", "does not exist"),
             "~/surely-not-an-adapter-dir": ("path", "does not exist"),
             str(tmp_path / "topk" / CONFIG_NAME): ("path", "is a file"),
             "bad_json": (CONFIG_NAME, "valid JSON"),
             "list": (CONFIG_NAME, "a JSON object"),
             "prefix": (f"{CONFIG_NAME}:peft_type", "'PREFIX_TUNING'"),
             "empty": (CONFIG_NAME, "no such file")}
    for path, (item, words) in cases.items():
        with pytest.raises(AdapterError, match=re.escape(words)) as caught:
            served_as_mole(path, "a")
        assert caught.value.item == item, path


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_plain_lora_check_names_rank_and_shape_faults_only(tmp_path, weights):
    """What the server refuses with a 400 before vLLM's own loader would answer a bare 500;
    a LoRA that fits passes (whatever else it holds is vLLM's to judge)."""
    from mole_serve.adapter import init_adapter
    from mole_serve.checkpoint import check_plain_lora_fits
    from mole_serve.config import MoleConfig

    base = BaseShape(128, 256, 2, 4, 2, 32)

    def plain(path, shape, rank):
        config = MoleConfig("lora", num_experts=1, r=rank, lora_alpha=2 * rank,
                            target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"))
        return save_adapter(init_adapter(config, shape, "p"), tmp_path / path,
                            bin=weights == "bin", safetensors=weights == "safetensors")

    check_plain_lora_fits(plain("fits", base, 8), "p", base, max_rank=8)
    with pytest.raises(AdapterError, match=r"adapter_config.json:r: expected <= the server's "
                                           r"max rank 8, found 16"):
        check_plain_lora_fits(plain("rank", base, 16), "p", base, max_rank=8)
    deeper = BaseShape(128, 256, 3, 4, 2, 32)  # layers the base lacks: vLLM skips them
    check_plain_lora_fits(plain("deep", deeper, 8), "p", base, max_rank=8)
    (tmp_path / "pt").mkdir()  # weights we do not read (adapter_model.pt): vLLM's to judge
    (tmp_path / "pt" / "adapter_config.json").write_text(
        (tmp_path / "fits" / "adapter_config.json").read_text())
    check_plain_lora_fits(tmp_path / "pt", "p", base, max_rank=8)
    wider = BaseShape(128, 320, 2, 4, 2, 32)
    with pytest.raises(AdapterError, match=r"mlp\.\w+_proj\.lora_[AB]\.weight: expected shape "
                                           r"\[(8, 256|256, 8)\], found shape \[(8, 320|320, 8)"):
        check_plain_lora_fits(plain("wide", wider, 8), "p", base, max_rank=8)
