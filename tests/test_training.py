"""The trainer: each strategy learns, the router losses do their job, adapters save and
reload exactly, two adapters trained in one batch equal each trained alone, and the
training forward equals the reference integration the server is checked against."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mole_serve.checkpoint import load_adapter
from mole_serve.hf import attach_adapters
from mole_serve.routing import entropy_loss, load_balance_loss
from mole_serve.training.data import DataError, load_records, tokenize
from mole_serve.training.options import AdapterSpec, TrainOptions
from mole_serve.training.trainer import Trainer
from tiny_model import make_tiny_llama, task_rows, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_llama(root / "base", hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)
    write_jsonl(root / "reverse.jsonl", task_rows("reverse", 48, seed=0))
    write_jsonl(root / "upper.jsonl", task_rows("upper", 48, seed=1))
    return root


def spec(world, name, strategy, **kw) -> AdapterSpec:
    fields = dict(num_experts=4, r=4, lora_alpha=8, lr=1e-2, steps=12, batch_size=4,
                  data=str(world / ("reverse.jsonl" if "rev" in name else "upper.jsonl")))
    fields.update(kw)
    return AdapterSpec(name=name, strategy=strategy, **fields)


def run(world, tmp_path, *specs, **kw) -> Trainer:
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path),
                           adapters=list(specs), progress=False, **kw)
    trainer = Trainer(options)
    while any(not r.done for r in trainer.runs.values()):
        trainer.step()
    return trainer


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic", "dynmole", "lora"])
def test_each_strategy_lowers_the_loss(world, tmp_path, strategy):
    trainer = run(world, tmp_path, spec(world, "rev", strategy, steps=20))
    history = trainer.runs["rev"].history
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3


def imbalance(trainer, name) -> float:
    """Coefficient of variation of the expert load over a pass on the training data."""
    model = trainer.model
    model.eval()
    run_ = trainer.runs[name]
    from mole_serve.training.data import collate
    batch = collate([run_.examples[:24]], trainer.tokenizer.pad_token_id)
    with torch.no_grad(), model.rows([name] * 24, batch["attention_mask"]) as log:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # E * sum_e f_e P_e: top_k when perfectly balanced, larger when not
    return load_balance_loss(log.of(name), model.adapters[name].config).item()


def test_load_balance_loss_lowers_imbalance(world, tmp_path):
    common = dict(router_init_range=1.0, steps=20, lr=1e-2)
    without = run(world, tmp_path / "a", spec(world, "rev", "mixlora", balance_coef=0.0,
                                              **common))
    with_ = run(world, tmp_path / "b", spec(world, "rev", "mixlora", balance_coef=1.0,
                                            **common))
    assert imbalance(with_, "rev") < imbalance(without, "rev")


def test_entropy_loss_lowers_router_entropy(world, tmp_path):
    def mean_entropy(trainer):
        model, run_ = trainer.model, trainer.runs["up"]
        from mole_serve.training.data import collate
        batch = collate([run_.examples[:24]], trainer.tokenizer.pad_token_id)
        model.eval()
        with torch.no_grad(), model.rows(["up"] * 24, batch["attention_mask"]) as log:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return entropy_loss(log.of("up"), model.adapters["up"].config).item()

    common = dict(steps=20, lr=1e-2, balance_coef=0.0)
    without = run(world, tmp_path / "a", spec(world, "up", "dynmole", entropy_coef=0.0,
                                              **common))
    with_ = run(world, tmp_path / "b", spec(world, "up", "dynmole", entropy_coef=1.0,
                                            **common))
    assert mean_entropy(with_) < mean_entropy(without) - 0.01


def test_joint_training_equals_training_alone(world, tmp_path):
    """MoE-PEFT-style multi-adapter batches must not couple adapters (fp32, dropout on)."""
    a, b = spec(world, "rev", "mixlora", steps=6), spec(world, "up", "dynmole", steps=4)
    joint = run(world, tmp_path / "joint", a, b)
    for alone_spec in (a, b):
        alone = run(world, tmp_path / alone_spec.name, alone_spec)
        for key, value in alone.model.adapters[alone_spec.name].params.items():
            torch.testing.assert_close(joint.model.adapters[alone_spec.name].params[key], value,
                                       rtol=1e-4, atol=1e-5, msg=key)


def test_gradient_checkpointing_gives_the_same_training(world, tmp_path):
    """Recomputed forwards must see the same adapter rows and dropout masks (p = 0.05)."""
    a, b = spec(world, "rev", "mixlora", steps=3), spec(world, "up", "dynmole", steps=3)
    plain = run(world, tmp_path / "plain", a, b)
    checkpointed = run(world, tmp_path / "ckpt", a, b, gradient_checkpointing=True)
    assert checkpointed.model.model.is_gradient_checkpointing
    for name in ("rev", "up"):
        for key, value in plain.model.adapters[name].params.items():
            torch.testing.assert_close(checkpointed.model.adapters[name].params[key], value,
                                       rtol=1e-5, atol=1e-6, msg=key)


def test_saved_adapter_reloads_to_identical_logits(world, tmp_path):
    trainer = run(world, tmp_path, spec(world, "rev", "mixlora", steps=4),
                  spec(world, "up", "dynmole", steps=4))
    ids = torch.randint(4, 1000, (2, 9))
    trainer.model.eval()
    with torch.no_grad(), trainer.model.rows(["rev", "up"]):
        expected = trainer.model(input_ids=ids).logits
    model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32)
    for name in ("rev", "up"):
        path = trainer.save_adapter(name, tmp_path / "saved" / name)
        reloaded = trainer.save_adapter(name, tmp_path / "again" / name)
        assert (path / "adapter_model.safetensors").read_bytes() == \
            (reloaded / "adapter_model.safetensors").read_bytes()
    adapters = [load_adapter(tmp_path / "saved" / n, n) for n in ("rev", "up")]
    attachment = attach_adapters(model, adapters)
    with torch.no_grad(), attachment.use(["rev", "up"]):
        ours = model(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with attachment.use(["rev", "up"]):
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    with trainer.model.rows(["rev", "up"]):
        trained_greedy = trainer.model.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, trained_greedy)


def test_checkpoint_resume_matches_an_uninterrupted_run(world, tmp_path):
    a = spec(world, "rev", "mixlora", steps=6)
    straight = run(world, tmp_path / "straight", a)
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path / "cut"),
                           adapters=[a], progress=False, save_every=3)
    first = Trainer(options)
    for _ in range(3):
        first.step()
    first.save_checkpoint()
    resumed = Trainer(dataclasses.replace(options, resume=True))
    assert resumed.micro_step == 3
    while not resumed.runs["rev"].done:
        resumed.step()
    for key, value in straight.model.adapters["rev"].params.items():
        torch.testing.assert_close(resumed.model.adapters["rev"].params[key], value,
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_data_errors(world, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_records(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match=r"row 1: missing text field\(s\) \['output'\]"):
        tokenize(load_records(bad), tokenizer, cutoff=64, train_on_inputs=False, add_eos=True,
                 source="bad.jsonl")
    long = [{"instruction": "reverse: " + "red " * 40, "output": "x"}] * 3
    examples, truncated = tokenize(long, tokenizer, cutoff=16, train_on_inputs=False,
                                   add_eos=True, source="long")
    assert truncated == 3 and all(len(e.input_ids) == 16 for e in examples)
    tokenizer.pad_token = None
    with pytest.raises(DataError, match="no pad token"):
        tokenize(long, tokenizer, cutoff=16, train_on_inputs=False, add_eos=True, source="x")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.json")


def test_prompt_is_masked_unless_train_on_inputs(world):
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    rows = task_rows("upper", 2, seed=3)
    masked, _ = tokenize(rows, tokenizer, cutoff=128, train_on_inputs=False, add_eos=True,
                         source="t")
    full, _ = tokenize(rows, tokenizer, cutoff=128, train_on_inputs=True, add_eos=True,
                       source="t")
    answer = tokenizer(rows[0]["output"], add_special_tokens=False)["input_ids"]
    labelled = [t for t in masked[0].labels if t != -100]
    assert labelled == answer + [tokenizer.eos_token_id]
    assert full[0].labels == full[0].input_ids
    chat = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "red dog"}]}]
    example, _ = tokenize(chat, tokenizer, cutoff=128, train_on_inputs=False, add_eos=False,
                          source="chat")
    assert tokenizer.decode([t for t in example[0].labels if t != -100]) == "red dog\n"


def test_cli_trains_two_adapters_from_a_yaml_file(world, tmp_path):
    from mole_serve.train import main

    config = tmp_path / "run.yaml"
    config.write_text(
        f"base_model: {world / 'base'}\noutput_dir: {tmp_path / 'out'}\nprogress: false\n"
        f"write_bin: true\nadapters:\n"
        f"  - {{name: rev, data: {world / 'reverse.jsonl'}, strategy: mixlora, num_experts: 4,"
        f" r: 4, lora_alpha: 8, steps: 2, batch_size: 4, eval_data: {world / 'reverse.jsonl'}}}\n"
        f"  - {{name: up, data: {world / 'upper.jsonl'}, strategy: dynmole, num_experts: 3,"
        f" r: 4, lora_alpha: 8, steps: 2, batch_size: 4}}\n")
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    for name in ("rev", "up"):
        assert {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"} <= {
            p.name for p in (out / name).iterdir()}
        load_adapter(out / name, name)
    assert (out / "loss.png").stat().st_size > 1000
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 4
    assert "perplexity" in json.loads((out / "eval.json").read_text())["rev"]
    with pytest.raises(SystemExit, match="unknown run option"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"base_model": "x", "output_dir": "y", "lerning_rate": 1}))
        main(["--config", str(bad)])


def test_choice_accuracy_scores_label_tokens_at_the_last_prompt_position(world):
    """MoE-PEFT's rule: argmax over the logits of ' A', ' B', ... at the last prompt token."""
    import contextlib

    from mole_serve.training.evaluate import choice_accuracy, label_token

    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    favourite = label_token(tokenizer, "B")

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        @contextlib.contextmanager
        def rows(self, names):
            self.seen.append(names)
            yield

        def forward(self, input_ids):
            logits = torch.zeros(1, input_ids.shape[1], 1000)
            logits[0, -1, favourite] = 5.0      # only the last position matters
            logits[0, :-1, label_token(tokenizer, "A")] = 9.0
            return type("Out", (), {"logits": logits})()

    rows = [{"instruction": "pick", "choices": ["A", "B", "C"], "answer": "B"},
            {"instruction": "pick", "choices": ["A", "B", "C"], "answer": "A"},
            {"instruction": "pick", "input": "x", "choices": ["A", "B"], "answer": "B"},
            {"instruction": "pick", "choices": ["A", "C"], "answer": "C"}]
    stub = Stub()
    assert choice_accuracy(stub, "rev", tokenizer, rows) == 0.5
    assert stub.seen == [["rev"]] * 4
    with pytest.raises(DataError, match="needs 'choices'"):
        choice_accuracy(stub, "rev", tokenizer, [{"instruction": "x", "answer": "A"}])


def test_module_entry_point_with_flags(world, tmp_path):
    """The README's one-adapter command, run as `python -m mole_serve.train`."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "mole_serve.train", "--base-model", str(world / "base"),
         "--data", str(world / "reverse.jsonl"), "--name", "math", "--strategy", "mixlora",
         "--num-experts", "4", "--r", "4", "--lora-alpha", "8", "--top-k", "2", "--steps", "2",
         "--batch-size", "4", "--output-dir", str(tmp_path / "out"), "--write-bin",
         "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter 'math' written to" in done.stdout
    adapter = load_adapter(tmp_path / "out" / "math", "math")
    assert adapter.config.top_k == 2 and adapter.config.num_experts == 4
    assert (tmp_path / "out" / "math" / "adapter_model.bin").exists()
