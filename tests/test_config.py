"""adapter_config.json parsing: every flavour the peers write, round trips, and clear errors."""

import json

import pytest

from mole_serve.config import AdapterLimits, MoleConfig
from mole_serve.errors import AdapterError

MOE_PEFT = {"bias": "none", "peft_type": "MIXLORA", "r": 8, "lora_alpha": 16,
            "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "down_proj", "up_proj"],
            "routing_strategy": "mixlora", "num_experts": 4, "act_fn": "silu", "top_k": 2,
            "base_model_name_or_path": "/host_data/Llama-2-7b-hf", "task_type": "CAUSAL_LM"}

LEGACY = {"bias": "none", "peft_type": "MIXLORA", "r": 16, "lora_alpha": 32,
          "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "w1_proj", "w2_proj", "w3_proj"],
          "routing_strategy": "mixtral", "num_experts": 8, "act_fn": "silu", "top_k": 2,
          "base_model_name_or_path": "/host_data/Llama-2-7b-hf", "task_type": "CAUSAL_LM"}

DYNMOLE = {"bias": "none", "peft_type": "DYNMOLE", "r": 24, "lora_alpha": 48,
           "lora_dropout": 0.05, "target_modules": ["gate_proj", "down_proj", "up_proj"],
           "routing_strategy": "dynmole", "num_experts": 6, "top_p": 0.75, "keep_top_k": 2,
           "entropy_threshold": 0.9, "entropy_index": 1.1, "entropy_type": "tsallis",
           "entropy_eps": 1e-5}


def test_moe_peft_config_round_trips_exactly():
    config = MoleConfig.from_dict(MOE_PEFT)
    assert (config.routing_strategy, config.top_k, config.scaling) == ("mixlora", 2, 2.0)
    assert config.to_dict() == MOE_PEFT
    assert list(config.to_dict()) == list(MOE_PEFT)  # MoE-PEFT's field order


def test_dynamic_config_fields():
    raw = dict(MOE_PEFT, routing_strategy="mixlora-dynamic", top_p=0.8, temperature=0.5)
    del raw["top_k"]
    config = MoleConfig.from_dict(raw)
    assert (config.top_p, config.temperature, config.max_experts_per_token) == (0.8, 0.5, 4)
    assert config.to_dict() == raw


def test_legacy_names_are_read_as_modern():
    config = MoleConfig.from_dict(LEGACY)
    assert config.routing_strategy == "mixlora"
    assert config.ffn_targets == ("gate_proj", "up_proj", "down_proj")
    assert config.to_dict()["routing_strategy"] == "mixlora"


def test_dynmole_config_and_early_threshold_refused():
    config = MoleConfig.from_dict(DYNMOLE)
    assert config.is_per_linear and config.keep_top_k == 2 and config.entropy_index == 1.1
    assert config.to_dict()["peft_type"] == "DYNMOLE"
    assert MoleConfig.from_dict(config.to_dict()) == config
    early = {k: v for k, v in DYNMOLE.items() if k != "entropy_threshold"}
    with pytest.raises(AdapterError, match="broadcast_threshhold: expected 'entropy_threshold'"):
        MoleConfig.from_dict(dict(early, broadcast_threshhold=1.8))


def test_rslora_scaling_and_unknown_fields_survive():
    config = MoleConfig.from_dict(dict(MOE_PEFT, use_rslora=True, router_aux_loss_coef=0.01))
    assert config.scaling == pytest.approx(16 / 8 ** 0.5)
    out = config.to_dict()
    assert out["use_rslora"] is True and out["router_aux_loss_coef"] == 0.01


def test_act_fn_absent_means_the_base_models_and_stays_absent():
    """The peers read a missing act_fn as the base FFN's own: not as "silu"."""
    config = MoleConfig.from_dict({k: v for k, v in MOE_PEFT.items() if k != "act_fn"})
    assert config.act_fn is None and "act_fn" not in config.to_dict()
    assert MoleConfig.from_dict(MOE_PEFT).to_dict()["act_fn"] == "silu"


def test_expert_lora_repeating_the_top_level_is_accepted():
    config = MoleConfig.from_dict(dict(MOE_PEFT, use_rslora=True, expert_lora={
        "r": 8, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.05}))
    assert config.use_rslora and config.scaling == pytest.approx(16 / 8 ** 0.5)


def test_save_and_load(tmp_path):
    config = MoleConfig.from_dict(DYNMOLE)
    config.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["routing_strategy"] == \
        "dynmole"
    assert MoleConfig.load(tmp_path) == config


@pytest.mark.parametrize("change, item, expected", [
    ({"routing_strategy": "hash"}, "routing_strategy", "one of"),
    ({"routing_strategy": ["mixlora"]}, "routing_strategy", "one of"),
    ({"expert_lora": [4]}, "expert_lora", "a JSON object"),
    ({"act_fn": ["silu"]}, "act_fn", "one of"),
    ({"target_modules": "q_proj"}, "target_modules", "a list of module names"),
    ({"use_dora": True}, "use_dora", "false"),
    ({"use_dora": "false"}, "use_dora", "true or false"),  # the peers read it as true
    ({"use_rslora": "false"}, "use_rslora", "true or false"),
    ({"lora_alpha": 16.5}, "lora_alpha", "an integer"),
    ({"lora_alpha": "16"}, "lora_alpha", "an integer"),
    ({"r": 0}, "r", ">= 1"),
    ({"top_k": 5}, "top_k", "in [1, num_experts=4]"),
    ({"num_experts": 0}, "num_experts", ">= 1"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules", "names among"),
    ({"peft_type": "LORA"}, "peft_type", "'MIXLORA'"),
    ({"act_fn": "swish2"}, "act_fn", "one of"),
    ({"lora_dropout": float("nan")}, "lora_dropout", "a finite number"),
    ({"expert_lora": {"r": 4}}, "expert_lora.r", "equal to top-level r"),
    # the peers read a key set in expert_lora alone as the experts' own (rsLoRA, DoRA)
    ({"expert_lora": {"use_rslora": True}}, "expert_lora.use_rslora",
     "equal to top-level use_rslora (False)"),
    ({"expert_lora": {"use_dora": True}}, "expert_lora.use_dora", "false"),
])
def test_bad_configs_name_the_field(change, item, expected):
    with pytest.raises(AdapterError) as info:
        MoleConfig.from_dict(dict(MOE_PEFT, **change), adapter="math")
    err = info.value
    assert err.adapter == "math" and err.item == f"adapter_config.json:{item}"
    assert expected in err.expected
    assert "adapter 'math'" in str(err) and item in str(err)


PLAIN = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none",
         "target_modules": ["q_proj", "v_proj"], "init_lora_weights": True}


@pytest.mark.parametrize("change, item, expected", [
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern", "one rank and alpha"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "empty"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "empty"),
    ({"layers_to_transform": [0]}, "layers_to_transform", "every layer adapted"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "the base's layers"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens", "Activated LoRA"),
    ({"use_bdlora": {"block": 2}}, "use_bdlora", "block-diagonal"),
    ({"lora_bias": True}, "lora_bias", "LoRA bias"),
    ({"use_qalora": True}, "use_qalora", "QALoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out", "false"),
    ({"bias": "all"}, "bias", "'none'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "leaves the base"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights", "leaves the base"),
])
def test_plain_lora_options_that_change_the_math_are_refused(change, item, expected):
    """The PEFT features vLLM's loader refuses, and per-layer selections: served or attached
    as a plain LoRA on every layer of the unmodified base they would compute another model."""
    with pytest.raises(AdapterError) as info:
        MoleConfig.from_dict(dict(PLAIN, **change), adapter="plain")
    assert info.value.item == f"adapter_config.json:{item}" and expected in info.value.expected


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_plain_lora_inits_that_leave_the_base_unchanged_load(init):
    assert MoleConfig.from_dict(dict(PLAIN, init_lora_weights=init)).is_plain_lora


def test_missing_required_field():
    raw = {k: v for k, v in MOE_PEFT.items() if k != "num_experts"}
    with pytest.raises(AdapterError, match="num_experts: expected present, found missing"):
        MoleConfig.from_dict(raw, adapter="math")


def test_bad_dynmole_values():
    with pytest.raises(AdapterError, match="keep_top_k: expected >= 1"):
        MoleConfig.from_dict(dict(DYNMOLE, keep_top_k=0))
    assert MoleConfig.from_dict(dict(DYNMOLE, keep_top_k=7)).keep_top_k == 7  # as DynMoLE
    with pytest.raises(AdapterError, match="entropy_threshold: expected > 0"):
        MoleConfig.from_dict(dict(DYNMOLE, entropy_threshold=0.0))
    with pytest.raises(AdapterError, match="entropy_type"):
        MoleConfig.from_dict(dict(DYNMOLE, entropy_type="renyi"))
    with pytest.raises(AdapterError, match="top_p"):
        MoleConfig.from_dict(dict(DYNMOLE, top_p=1.5))
    with pytest.raises(AdapterError, match="entropy_eps: expected > 0"):
        MoleConfig.from_dict(dict(DYNMOLE, entropy_eps=0.0))


def test_limits_exclude_rank_and_experts():
    with pytest.raises(AdapterError, match="r: expected <= the server's max rank 4, found 8"):
        MoleConfig.from_dict(MOE_PEFT, "math", AdapterLimits(max_rank=4))
    with pytest.raises(AdapterError, match="num_experts: expected <= the server's max experts 2"):
        MoleConfig.from_dict(MOE_PEFT, "math", AdapterLimits(max_experts=2))
    MoleConfig.from_dict(MOE_PEFT, "math", AdapterLimits(max_rank=8, max_experts=4))


def test_unreadable_config_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="expected valid JSON"):
        MoleConfig.load(tmp_path, "math")
    with pytest.raises(AdapterError, match="no such file"):
        MoleConfig.load(tmp_path / "nope", "math")


def test_written_types_are_what_the_peers_assert():
    """MoE-PEFT asserts float top_p/temperature/lora_dropout and int r/lora_alpha."""
    config = MoleConfig("mixlora-dynamic", num_experts=4, r=8, lora_alpha=16,
                        target_modules=("gate_proj",), top_p=1, temperature=0, lora_dropout=0)
    out = config.to_dict()
    for key in ("top_p", "temperature", "lora_dropout"):
        assert type(out[key]) is float, key
    assert type(out["r"]) is int and type(out["lora_alpha"]) is int
