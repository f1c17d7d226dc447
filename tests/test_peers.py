"""Our reference against the peers' own code (DESIGN §9): MoE-PEFT 2.0.2 and mixlora 0.2.3.

The peers run in their own venv (.venv-peers, transformers 4.46.3, built by `make setup`):
they create random adapters with their own code and compute logits with their own inference
path; we load the same dirs and must give the same logits (fp32, relative error <= 1e-5).
Then the other way: adapters we write load in both peers and give our logits.
"""

import json
import pathlib
import subprocess

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import rel_err
from mole_serve.adapter import BaseShape, init_adapter
from mole_serve.checkpoint import load_adapter, save_adapter
from mole_serve.config import MoleConfig
from mole_serve.hf import attach_adapters

REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEER_TOOL = REPO / "tests" / "peers" / "peer_tool.py"
TOLERANCE = 1e-5

pytestmark = pytest.mark.peers

# name -> (library, strategy, extra create flags)
PEER_ADAPTERS = {
    "moe-peft-topk": ("moe-peft", "mixlora", []),
    "moe-peft-dynamic": ("moe-peft", "mixlora-dynamic", []),
    "moe-peft-dynamic-temperature": ("moe-peft", "mixlora-dynamic", ["--temperature", "0.5",
                                                                     "--top-p", "0.3"]),
    "moe-peft-ffn-top1-rslora": ("moe-peft", "mixlora", [
        "--targets", "gate_proj,up_proj,down_proj", "--num-experts", "3", "--top-k", "1",
        "--rslora", "--r", "4", "--alpha", "8"]),
    "moe-peft-switch": ("moe-peft", "mixlora-switch", []),
    "mixlora-topk": ("mixlora", "mixlora", []),
    "mixlora-e3-top3-rslora": ("mixlora", "mixlora", ["--num-experts", "3", "--top-k", "3",
                                                      "--rslora"]),
}


def peer(*args: str) -> None:
    if not PEERS_PYTHON.exists():
        pytest.fail(f"{PEERS_PYTHON} is missing: run `make setup` (it builds the peers venv)")
    done = subprocess.run([str(PEERS_PYTHON), str(PEER_TOOL), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"peer_tool {args[0]} failed:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    peer("base", str(root / "base"))
    model = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32,
                                             attn_implementation="eager").eval()
    inputs = torch.load(root / "base" / "input_ids.pt", weights_only=True)["input_ids"]
    return root, model, inputs


def our_logits(world, adapters, rows) -> torch.Tensor:
    _, model, inputs = world
    attachment = attach_adapters(model, adapters)
    try:
        with torch.no_grad(), attachment.use(rows):
            return model(inputs).logits
    finally:
        attachment.detach()


@pytest.mark.parametrize("name", list(PEER_ADAPTERS))
def test_peer_adapter_gives_peer_logits(world, name):
    root, model, _ = world
    lib, strategy, flags = PEER_ADAPTERS[name]
    out = root / name
    peer("create", "--lib", lib, "--base", str(root / "base"), "--out", str(out),
         "--strategy", strategy, *flags)
    reference = torch.load(out / "peer_logits.pt", weights_only=True)
    adapter = load_adapter(out, name, base=BaseShape.from_hf_config(model.config))
    assert adapter.config.routing_strategy == strategy
    logits = our_logits(world, [adapter], name)
    assert rel_err(logits, reference["logits"]) <= TOLERANCE
    assert rel_err(reference["base_logits"], reference["logits"]) > 1e-2  # adapter matters
    # a batch mixing the adapter with the base model changes neither row
    mixed = our_logits(world, [adapter], [name, None])
    assert rel_err(mixed[0], reference["logits"][0]) <= TOLERANCE
    assert rel_err(mixed[1], reference["base_logits"][1]) <= TOLERANCE


# (strategy, config overrides, peers that must load it)
OURS = {
    "topk-attention": ("mixlora", {}, ["moe-peft", "mixlora"]),
    "topk-ffn-rslora": ("mixlora", {"target_modules": ("gate_proj", "up_proj", "down_proj"),
                                    "use_rslora": True, "top_k": 3}, ["moe-peft", "mixlora"]),
    "dynamic": ("mixlora-dynamic", {"top_p": 0.6}, ["moe-peft"]),
    "switch": ("mixlora-switch", {}, ["moe-peft"]),
}


@pytest.mark.parametrize("name", list(OURS))
def test_our_adapter_loads_in_the_peers(world, name):
    root, model, _ = world
    strategy, overrides, libs = OURS[name]
    fields = dict(num_experts=4, r=8, lora_alpha=16, lora_dropout=0.05,
                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"))
    fields.update(overrides, base_model_name_or_path=str(root / "base"))
    config = MoleConfig(strategy, **fields)
    adapter = init_adapter(config, BaseShape.from_hf_config(model.config), name,
                           generator=torch.Generator().manual_seed(11), b_std=0.05,
                           router_std=0.5)
    out = save_adapter(adapter, root / f"ours-{name}", bin=True)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "MIXLORA"
    ours = our_logits(world, [load_adapter(out, name)], name)
    for lib in libs:
        peer("logits", "--lib", lib, "--base", str(root / "base"), "--adapter", str(out),
             "--out", str(root / f"{name}.{lib}.pt"))
        theirs = torch.load(root / f"{name}.{lib}.pt", weights_only=True)["logits"]
        assert rel_err(ours, theirs) <= TOLERANCE, lib


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic"])
def test_trained_adapter_loads_in_the_peers(tmp_path, strategy):
    """What `mole_serve.train` writes (with --write-bin) gives our logits in MoE-PEFT and,
    for top-k routing, in mixlora."""
    from mole_serve.training.options import AdapterSpec, TrainOptions
    from mole_serve.training.trainer import Trainer
    from tiny_model import make_tiny_llama, task_rows, write_jsonl

    base = make_tiny_llama(tmp_path / "base", hidden=64, intermediate=128, layers=2, heads=2,
                           kv_heads=1)
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
               base / "input_ids.pt")
    data = write_jsonl(tmp_path / "rev.jsonl", task_rows("reverse", 16, seed=0))
    trainer = Trainer(TrainOptions(
        base_model=str(base), output_dir=str(tmp_path / "out"), write_bin=True, progress=False,
        adapters=[AdapterSpec("rev", str(data), strategy, num_experts=4, r=4, lora_alpha=8,
                              lr=1e-2, steps=3, batch_size=4)]))
    adapter_dir = trainer.train()["rev"]
    trainer.model.eval()
    with torch.no_grad(), trainer.model.rows(["rev", "rev"]):
        ours = trainer.model(input_ids=ids).logits
    for lib in ["moe-peft", "mixlora"] if strategy == "mixlora" else ["moe-peft"]:
        peer("logits", "--lib", lib, "--base", str(base), "--adapter", str(adapter_dir),
             "--out", str(tmp_path / f"{lib}.pt"))
        theirs = torch.load(tmp_path / f"{lib}.pt", weights_only=True)["logits"]
        assert rel_err(ours, theirs) <= TOLERANCE, lib
