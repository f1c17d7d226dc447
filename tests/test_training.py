"""The trainer: each strategy learns, the router losses do their job, adapters save and
reload exactly, two adapters trained in one batch equal each trained alone, and the
training forward equals the reference integration the server is checked against."""

import copy
import dataclasses
import json
import math
import pathlib
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mole_serve.checkpoint import load_adapter
from mole_serve.hf import attach_adapters
from mole_serve.routing import entropy_loss, route_config
from mole_serve.training.data import EVAL_SPLITS, IGNORE, DataError, load_records, tokenize
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
    fields = dict(r=4, lora_alpha=8, lr=1e-2, steps=12, batch_size=4,
                  data=str(world / ("reverse.jsonl" if "rev" in name else "upper.jsonl")),
                  **({} if strategy == "lora" else {"num_experts": 4}))
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
    config, cvs = model.adapters[name].config, []
    for layer_logits in log.logits[name]:          # one router call per layer
        weights, ids = route_config(layer_logits, config)
        counts = torch.bincount(ids[weights > 0], minlength=config.num_experts).float()
        cvs.append((counts.std(unbiased=False) / counts.mean()).item())
    return sum(cvs) / len(cvs)


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
    """Every strategy (rsLoRA scaling on one), one row each: the trained forward is what
    the reference integration computes from the saved dirs."""
    names = ["rev", "up", "rev-plain", "up-dynamic"]
    trainer = run(world, tmp_path, spec(world, "rev", "mixlora", steps=4),
                  spec(world, "up", "dynmole", steps=4),
                  spec(world, "rev-plain", "lora", steps=4, use_rslora=True),
                  spec(world, "up-dynamic", "mixlora-dynamic", steps=4))
    ids = torch.randint(4, 1000, (len(names), 9))
    trainer.model.eval()
    with torch.no_grad(), trainer.model.rows(names):
        expected = trainer.model(input_ids=ids).logits
    model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float32)
    for name in names:
        path = trainer.save_adapter(name, tmp_path / "saved" / name)
        again = trainer.save_adapter(name, tmp_path / "again" / name)
        assert (path / "adapter_model.safetensors").read_bytes() == \
            (again / "adapter_model.safetensors").read_bytes()
    adapters = [load_adapter(tmp_path / "saved" / n, n) for n in names]
    attachment = attach_adapters(model, adapters)
    with torch.no_grad(), attachment.use(names):
        ours = model(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base_logits = model(ids).logits
    assert all(not torch.allclose(ours[i], base_logits[i], atol=1e-4)
               for i in range(len(names))), "each adapter must change its row"
    with attachment.use(names):
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    with trainer.model.rows(names):
        trained_greedy = trainer.model.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy, trained_greedy)


@pytest.mark.parametrize("accumulation, cut", [(1, 3), (2, 3)],
                         ids=["at-a-step", "inside-an-accumulation-window"])
def test_checkpoint_resume_matches_an_uninterrupted_run(world, tmp_path, accumulation, cut):
    a = spec(world, "rev", "mixlora", steps=6 // accumulation, accumulation=accumulation)
    straight = run(world, tmp_path / "straight", a)
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path / "cut"),
                           adapters=[a], progress=False, save_every=cut)
    first = Trainer(options)
    for _ in range(cut):
        first.step()
    first.save_checkpoint()
    resumed = Trainer(dataclasses.replace(options, resume=True))
    assert resumed.micro_step == cut
    while not resumed.runs["rev"].done:
        resumed.step()
    assert resumed.runs["rev"].history == pytest.approx(straight.runs["rev"].history,
                                                        rel=1e-5)
    for key, value in straight.model.adapters["rev"].params.items():
        torch.testing.assert_close(resumed.model.adapters["rev"].params[key], value,
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_accumulation_steps_each_optimizer_once_per_window(world, tmp_path):
    """With accumulation 2 an adapter's weights move on every second micro-step only, and a
    second adapter with accumulation 1 in the same batch keeps its own pace."""
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path),
                           progress=False, adapters=[
                               spec(world, "rev", "mixlora", steps=2, accumulation=2),
                               spec(world, "up", "dynmole", steps=4)])
    trainer = Trainer(options)
    params = {name: trainer.model.adapters[name].params for name in ("rev", "up")}

    def snapshot(name):
        return {k: v.detach().clone() for k, v in params[name].items()}

    for micro_step in range(1, 5):
        before = {name: snapshot(name) for name in params}
        trainer.step()
        for name, moves in (("rev", micro_step % 2 == 0), ("up", True)):
            moved = any(not torch.equal(before[name][k], v) for k, v in params[name].items())
            assert moved == moves, (name, micro_step)
    assert [trainer.runs[n].steps for n in ("rev", "up")] == [2, 4]
    assert trainer.runs["rev"].scheduler.last_epoch == 2


def test_schedules_warm_up_then_hold_or_decay():
    from mole_serve.training.trainer import _schedule
    options = AdapterSpec(name="a", data="unused", scheduler="constant", warmup_steps=3)
    constant = _schedule(options, total=10)
    assert [constant(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = _schedule(dataclasses.replace(options, scheduler="cosine"), total=11)
    factors = [cosine(s) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[3 + 4] == pytest.approx(0.5)          # half-way through the decay
    assert factors[11] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))


def test_adapters_override_the_runs_schedule_cutoff_and_prompt_masking(world, tmp_path):
    """MoE-PEFT gives each adapter its own LR scheduler: the run's scheduler, warm-up, cutoff
    and train-on-inputs are defaults an adapter may override, without touching its spec."""
    own = spec(world, "up", "mixlora", steps=3, scheduler="constant", warmup_steps=2,
               cutoff_len=108, train_on_inputs=True)
    inherits = spec(world, "rev", "mixlora", steps=3)
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path),
                           adapters=[inherits, own], progress=False, scheduler="cosine",
                           cutoff_len=112)  # prompts here are 98 to 105 tokens long
    trainer = Trainer(options)
    assert inherits.scheduler is None and own.cutoff_len == 108  # the caller's specs as given
    rev, up = trainer.runs["rev"], trainer.runs["up"]
    assert (rev.spec.scheduler, rev.spec.warmup_steps, rev.spec.cutoff_len,
            rev.spec.train_on_inputs) == ("cosine", 0, 112, False)
    assert max(len(e.input_ids) for e in up.examples) == 108
    assert max(len(e.input_ids) for e in rev.examples) == 112
    assert all(IGNORE not in e.labels for e in up.examples)
    assert all(e.labels[0] == IGNORE for e in rev.examples)
    lrs = {"rev": [], "up": []}
    for _ in range(3):
        for name in lrs:
            lrs[name].append(trainer.runs[name].optimizer.param_groups[0]["lr"])
        trainer.step()
    assert lrs["up"] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])       # warm-up, then hold
    assert lrs["rev"] == pytest.approx([1e-2, 0.75e-2, 0.25e-2])        # cosine from step 0
    for key, value in (("scheduler", "linear"), ("warmup_steps", -1), ("cutoff_len", 1)):
        bad = TrainOptions(base_model="b", output_dir="o",
                           adapters=[AdapterSpec(name="a", data="d", **{key: value})])
        with pytest.raises(ValueError, match=f"adapter 'a': {key}"):
            bad.validate()


def test_run_flags_next_to_a_config_file_set_run_defaults(world, tmp_path):
    from mole_serve.train import build_parser, options_from_args

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"base_model": "b", "output_dir": "o", "adapters": [
        {"name": "a", "data": "d"}, {"name": "c", "data": "d", "scheduler": "constant"}]}))
    args = build_parser().parse_args(["--config", str(config), "--scheduler", "cosine",
                                      "--cutoff-len", "64"])
    options = options_from_args(args)
    assert [(a.name, a.scheduler, a.cutoff_len) for a in options.adapter_specs()] == [
        ("a", "cosine", 64), ("c", "constant", 64)]
    assert dataclasses.replace(options, cutoff_len=32).adapter_specs()[0].cutoff_len == 32


def test_every_train_flag_says_what_it_sets_and_the_default_a_run_gets():
    from mole_serve.train import build_parser, options_from_args

    parser = build_parser()
    options = options_from_args(parser.parse_args(
        ["--base-model", "b", "--output-dir", "o", "--data", "d"]))
    spec = options.adapter_specs()[0]
    shown = 0
    for action in parser._actions:
        assert action.help, action.option_strings
        default = re.search(r"\(default: ([^)]*)\)$", action.help)
        if default and action.dest != "help":
            got = getattr(spec, action.dest) if hasattr(spec, action.dest) else \
                getattr(options, action.dest)
            assert str(got) == default.group(1), action.option_strings
            shown += 1
    assert shown >= 20


def test_data_errors(world, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_records(empty)
    (tmp_path / "empty.json").write_text("\n")
    with pytest.raises(DataError, match=r"empty.json: empty file"):
        load_records(tmp_path / "empty.json")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match=r"row 1: missing field\(s\) \['output'\]"):
        tokenize(load_records(bad), tokenizer, cutoff=64, train_on_inputs=False, add_eos=True,
                 source="bad.jsonl")
    for row, found in (({"instruction": "x", "output": 5}, r"\['output'\] must be text, found "
                        r"\[5\]"),
                       ({"instruction": "x", "input": ["y"], "output": "z"}, r"\['input'\]"),
                       ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
                        r"message 1: needs a text 'role' and a 'content'"),
                       ({"messages": [{"content": "x"}, {"role": "assistant", "content": "a"}]},
                        r"message 1: needs a text 'role'")):
        with pytest.raises(DataError, match=f"row 1: .*{found}"):
            tokenize([row], tokenizer, cutoff=64, train_on_inputs=False, add_eos=True,
                     source="typed")
    # a null input is no input (as a datasets dir gives it to rows without one)
    assert tokenize([{"instruction": "x", "input": None, "output": "z"}], tokenizer,
                    cutoff=120, train_on_inputs=False, add_eos=True, source="null").examples
    long_answer = {"instruction": "reverse", "output": "red " * 40}
    long_prompt = {"instruction": "reverse: " + "red " * 40, "output": "x"}
    tokenized = tokenize([long_answer, long_prompt, long_answer], tokenizer, cutoff=120,
                         train_on_inputs=False, add_eos=True, source="long")
    assert (tokenized.truncated, tokenized.dropped) == (2, 1)
    assert all(len(e.input_ids) == 120 and e.labels[-1] != -100 for e in tokenized.examples)
    with pytest.raises(DataError, match="no row keeps an answer token within cutoff_len=120"):
        tokenize([long_prompt], tokenizer, cutoff=120, train_on_inputs=False, add_eos=True,
                 source="long")
    # an empty answer without EOS leaves nothing to learn either (a batch of them: NaN loss)
    empty_answer = {"instruction": "reverse: red", "output": ""}
    tokenized = tokenize([empty_answer, long_answer], tokenizer, cutoff=120,
                         train_on_inputs=False, add_eos=False, source="empty")
    assert (len(tokenized.examples), tokenized.truncated, tokenized.dropped) == (1, 1, 1)
    with pytest.raises(DataError, match="list of objects ending with an assistant turn"):
        tokenize([{"messages": [{"role": "user", "content": "x"}, "hi"]}], tokenizer,
                 cutoff=48, train_on_inputs=False, add_eos=True, source="chat")
    long = [long_answer]
    tokenizer.pad_token = None
    with pytest.raises(DataError, match=r"no pad token: .* \(--pad-token '</s>'\)"):
        tokenize(long, tokenizer, cutoff=16, train_on_inputs=False, add_eos=True, source="x")
    with pytest.raises(ValueError, match=r"--pad-token '<pad1>' is not in the tokenizer's "
                                         r"vocabulary \(its eos token '</s>' is\)"):
        run(world, tmp_path, spec(world, "rev", "mixlora"), pad_token="<pad1>")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.json")
    # JSON lines whatever the case of the extension
    assert load_records(write_jsonl(tmp_path / "ROWS.JSONL", [long_answer] * 2)) == [
        long_answer] * 2


def test_chat_rows_need_a_chat_template(world):
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    rows = [{"messages": [{"role": "user", "content": "red cat"},
                          {"role": "assistant", "content": "cat red"}]}]
    examples = tokenize(rows, tokenizer, cutoff=64, train_on_inputs=False, add_eos=True,
                        source="chat").examples
    assert examples and any(label != -100 for label in examples[0].labels)
    # a template that refuses a conversation (as Llama 2's and Mistral's do for unknown
    # roles) is a data error naming the row
    refusing = copy.copy(tokenizer)
    refusing.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                              "{{ raise_exception('roles must be user or assistant') }}"
                              "{% endif %}{{ m['content'] }}{% endfor %}")
    tool_turn = {"messages": [{"role": "tool", "content": "42"}, *rows[0]["messages"]]}
    with pytest.raises(DataError, match="row 1: the tokenizer's chat template refuses the "
                                        "messages: roles must be user or assistant"):
        tokenize([tool_turn], refusing, cutoff=64, train_on_inputs=False, add_eos=True,
                 source="chat")
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat rows need a tokenizer with a chat template"):
        tokenize(rows, tokenizer, cutoff=64, train_on_inputs=False, add_eos=True,
                 source="chat")


def test_datasets_dirs_load_like_jsonl(world, tmp_path):
    """`datasets.save_to_disk` output, a Dataset or a DatasetDict: its "train" split to train
    on, its "test" (else "validation") split to evaluate on."""
    import datasets
    rows = load_records(world / "reverse.jsonl")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:2]),
                          "train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "splits"))
    assert load_records(tmp_path / "plain") == rows
    assert load_records(tmp_path / "splits") == rows
    assert load_records(tmp_path / "splits", EVAL_SPLITS) == rows[:2]   # never "train"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows[:2]),
                          "extra": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"splits \['validation', 'extra'\] and none of "
                                        r"\['train'\]"):
        load_records(tmp_path / "no_train")
    assert load_records(tmp_path / "no_train", EVAL_SPLITS) == rows[:2]


def test_bf16_base_ffn_only_rslora_adapter(world, tmp_path):
    """A bf16 frozen base with fp32 adapter parameters, attention LoRA off, rsLoRA on."""
    trainer = run(world, tmp_path, spec(world, "rev", "mixlora", steps=2, attention=False,
                                        use_rslora=True), dtype="bfloat16")
    assert {p.dtype for p in trainer.model.model.parameters()} == {torch.bfloat16}
    params = trainer.model.adapters["rev"].params
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert not any(proj in key for key in params for proj in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj"))
    assert all(math.isfinite(loss) for loss in trainer.runs["rev"].history)
    saved = load_adapter(trainer.save_adapter("rev", tmp_path / "saved"), "rev")
    assert saved.config.use_rslora and saved.config.scaling == pytest.approx(8 / 2)
    assert set(saved.config.target_modules) == {"gate_proj", "up_proj", "down_proj"}


def test_prompt_is_masked_unless_train_on_inputs(world):
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    rows = task_rows("upper", 2, seed=3)
    masked = tokenize(rows, tokenizer, cutoff=128, train_on_inputs=False, add_eos=True,
                      source="t").examples
    full = tokenize(rows, tokenizer, cutoff=128, train_on_inputs=True, add_eos=True,
                    source="t").examples
    answer = tokenizer(rows[0]["output"], add_special_tokens=False)["input_ids"]
    labelled = [t for t in masked[0].labels if t != -100]
    assert labelled == answer + [tokenizer.eos_token_id]
    assert full[0].labels == full[0].input_ids
    chat = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "red dog"}]}]
    example = tokenize(chat, tokenizer, cutoff=128, train_on_inputs=False, add_eos=False,
                       source="chat").examples
    assert tokenizer.decode([t for t in example[0].labels if t != -100]) == "red dog\n"


def test_answers_are_tokenized_as_the_continuation_of_the_prompt():
    """A SentencePiece tokenizer (Llama 2, Mistral) starts a text tokenized alone with a
    word-start '▁' that the same text never has after the prompt's newline: the trainer
    teaches the tokens the model must generate after the prompt, not those."""
    from mole_serve.training.data import ALPACA
    from tiny_model import build_sentencepiece_tokenizer

    tokenizer = build_sentencepiece_tokenizer()
    row = {"instruction": "capital", "output": "Paris"}
    alone = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    example = tokenize([row], tokenizer, cutoff=128, train_on_inputs=False, add_eos=True,
                       source="t").examples[0]
    joint = tokenizer(ALPACA.format(instruction="capital") + "Paris")["input_ids"]
    assert example.input_ids == joint + [tokenizer.eos_token_id] != alone
    prompt = len(tokenizer(ALPACA.format(instruction="capital"))["input_ids"])
    assert example.labels == [IGNORE] * prompt + example.input_ids[prompt:]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris"}]
    chat = tokenize([{"messages": messages}], tokenizer, cutoff=128, train_on_inputs=False,
                    add_eos=True, source="t").examples[0]
    assert chat.input_ids == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                                       add_special_tokens=False)["input_ids"]
    # a choice label is scored by that first trained id: Llama 2's template writes ' ' + it
    from mole_serve.training.evaluate import choice_items

    question = {"messages": messages[:1], "choices": ["Paris", "A"], "answer": "A"}

    def first_trained(label):
        row = {"messages": messages[:1] + [{"role": "assistant", "content": label}]}
        example = tokenize([row], tokenizer, cutoff=128, train_on_inputs=False, add_eos=True,
                           source="t").examples[0]
        return next(t for t in example.labels if t != IGNORE)

    trained = [first_trained(label) for label in ("Paris", "A")]
    assert tokenizer.convert_ids_to_tokens(trained) == ["▁Paris", "▁A"]
    assert choice_items([question], tokenizer, "mc")[0].label_ids == trained


def test_cli_trains_two_adapters_from_a_yaml_file(world, tmp_path, capsys):
    from mole_serve.train import main
    from mole_serve.training.report import COLUMNS

    config = tmp_path / "run.yaml"
    config.write_text(
        f"base_model: {world / 'base'}\noutput_dir: {tmp_path / 'out'}\nprogress: true\n"
        f"write_bin: true\nadapters:\n"
        f"  - {{name: rev, data: {world / 'reverse.jsonl'}, strategy: mixlora, num_experts: 4,"
        f" r: 4, lora_alpha: 8, steps: 2, batch_size: 4, eval_data: {world / 'reverse.jsonl'}}}\n"
        f"  - {{name: up, data: {world / 'upper.jsonl'}, strategy: dynmole, num_experts: 3,"
        f" r: 4, lora_alpha: 8, steps: 2, batch_size: 4, lr: 2e-4}}\n")  # YAML: lr as text
    assert main(["--config", str(config)]) == 0
    out = tmp_path / "out"
    for name in ("rev", "up"):
        assert {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"} <= {
            p.name for p in (out / name).iterdir()}
        load_adapter(out / name, name)
    assert (out / "loss.png").stat().st_size > 1000
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 4
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["adapter"]) for r in logged] == [(1, "rev"), (1, "up"), (2, "rev"),
                                                            (2, "up")]
    assert all(set(r) == set(COLUMNS) and len(r["load"]) in (3, 4) for r in logged)
    bar = capsys.readouterr().err
    assert "train" in bar and "tok/s load max/min" in bar and "loss" in bar
    assert "perplexity" in json.loads((out / "eval.json").read_text())["rev"]
    with pytest.raises(SystemExit, match="unknown run option"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"base_model": "x", "output_dir": "y", "lerning_rate": 1}))
        main(["--config", str(bad)])


def test_config_file_errors_name_the_file_or_the_adapter(tmp_path):
    from mole_serve.train import main

    cases = {"list.yaml": ("- a\n", "list.yaml: expected a mapping of run options"),
             "broken.yaml": ("a: [1\n", "broken.yaml: invalid YAML"),
             "broken.json": ("{a: 1}", "broken.json: invalid JSON"),
             "nodata.yaml": ("base_model: b\noutput_dir: o\nadapters:\n  - {name: x}\n",
                             r"adapter 1 \(x\): missing \['data'\]"),
             # read as YAML whatever the case of its extension
             "NODATA.YML": ("base_model: b\noutput_dir: o\nadapters:\n  - {name: x}\n",
                            r"adapter 1 \(x\): missing \['data'\]")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit, match=f"mole-train: .*{message}"):
            main(["--config", str(tmp_path / name)])
    with pytest.raises(SystemExit, match="missing.yaml: No such file"):
        main(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match=r"missing \['data'\] \(--data for one adapter"):
        main(["--base-model", "b", "--output-dir", "o", "--steps", "5"])


def test_a_warm_up_longer_than_the_run_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="warmup_steps 5 must be below its 4 optimizer steps"):
        run(world, tmp_path, spec(world, "rev", "mixlora", steps=4, warmup_steps=5))


def test_the_log_records_the_lr_each_step_used(world, tmp_path):
    trainer = run(world, tmp_path, spec(world, "rev", "mixlora", steps=4, warmup_steps=2,
                                        lr=0.3))
    assert [row["lr"] for row in trainer.log.rows] == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_choice_accuracy_scores_label_tokens_at_the_last_prompt_position(world):
    """MoE-PEFT's rule (argmax over the labels' logits at the last prompt token), each label's
    id being the first the trainer teaches for it as the answer to that prompt."""
    import contextlib

    from mole_serve.training.evaluate import choice_accuracy, choice_items

    tokenizer = AutoTokenizer.from_pretrained(world / "base")

    def first_trained(row, output):
        example = tokenize([dict(row, output=output)], tokenizer, cutoff=128,
                           train_on_inputs=False, add_eos=False, source="t").examples[0]
        return next(t for t in example.labels if t != IGNORE)

    favourite = first_trained({"instruction": "pick"}, "B")

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
            logits[0, :-1, first_trained({"instruction": "pick"}, "A")] = 9.0
            return type("Out", (), {"logits": logits})()

    rows = [{"instruction": "pick", "choices": ["A", "B", "C"], "answer": "B"},
            {"instruction": "pick", "choices": ["A", "B", "C"], "answer": "A"},
            {"instruction": "pick", "input": "x", "choices": ["A", "B"], "answer": "B"},
            {"instruction": "pick", "choices": ["A", "C"], "answer": "C"},
            # chat rows: the conversation up to the question, with the generation prompt
            {"messages": [{"role": "user", "content": "pick"}], "choices": ["A", "B"],
             "answer": "B"}]
    stub = Stub()
    items = choice_items(rows, tokenizer, "mc.jsonl")
    assert choice_accuracy(stub, "rev", items) == 0.6
    assert stub.seen == [["rev"]] * 5
    assert items[0].label_ids == [first_trained(rows[0], c) for c in "ABC"]
    chat_answer = first_trained({"messages": rows[-1]["messages"] + [
        {"role": "assistant", "content": "B"}]}, "")
    assert items[-1].label_ids[1] == chat_answer   # no space merged in after "assistant: "
    chat_prompt = tokenizer.apply_chat_template(rows[-1]["messages"], tokenize=False,
                                                add_generation_prompt=True)
    assert items[-1].prompt_ids == tokenizer(chat_prompt)["input_ids"]
    with pytest.raises(DataError, match="mc.jsonl: row 1: needs 'choices'"):
        choice_items([{"instruction": "x", "answer": "A"}], tokenizer, "mc.jsonl")
    with pytest.raises(DataError, match="'x1' and 'x2' start with the same token"):
        choice_items([{"instruction": "x", "choices": ["x1", "x2"], "answer": "x1"}], tokenizer,
                     "mc.jsonl")


def test_module_entry_point_with_flags(world, tmp_path):
    """The README's one-adapter command, run as `python -m mole_serve.train`."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "mole_serve.train", "--base-model", str(world / "base"),
         "--data", str(world / "reverse.jsonl"), "--name", "math", "--strategy", "mixlora",
         "--num-experts", "4", "--r", "4", "--lora-alpha", "8", "--top-k", "2", "--steps", "2",
         "--batch-size", "4", "--output-dir", str(tmp_path / "out"), "--write-bin",
         "--no-progress", "--device", "cpu", "--target-modules", "q_proj", "gate_proj",
         "up_proj", "down_proj", "--router-init-range", "0.05"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter 'math' written to" in done.stdout
    adapter = load_adapter(tmp_path / "out" / "math", "math")
    assert adapter.config.top_k == 2 and adapter.config.num_experts == 4
    assert set(adapter.config.target_modules) == {"q_proj", "gate_proj", "up_proj", "down_proj"}
    assert (tmp_path / "out" / "math" / "adapter_model.bin").exists()


def test_console_script_reports_bad_data_without_a_traceback(world, tmp_path):
    """`mole-train` (the installed console script) on a row without `output`."""
    import subprocess
    import sys

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}])
    script = pathlib.Path(sys.executable).parent / "mole-train"
    done = subprocess.run(
        [str(script), "--base-model", str(world / "base"), "--data", str(bad),
         "--output-dir", str(tmp_path / "out"), "--steps", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "mole-train: " in done.stderr and "missing field(s) ['output']" in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_through_train_logs_each_micro_step_once(world, tmp_path):
    """A run cut after micro-step 3 with a checkpoint at 2, resumed with `train()`: the
    re-run micro-step 3 is logged once; a checkpoint cut off while saving (no state file), a
    dir not named by a step and a log line cut off by the kill are passed over."""
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path),
                           adapters=[spec(world, "rev", "mixlora", steps=4)], progress=False,
                           save_every=2)
    first = Trainer(options)
    for _ in range(3):
        first.step()
        if first.micro_step % 2 == 0:
            first.save_checkpoint()
    first.log.close()
    (tmp_path / "checkpoint-3" / "rev").mkdir(parents=True)  # cut off before its state
    (tmp_path / "checkpoint-final").mkdir()                    # not one of ours
    with open(tmp_path / "log.jsonl", "a") as log:             # a line cut off by a kill
        log.write('{"step": 4, "adap')
    resumed = Trainer(dataclasses.replace(options, resume=True))
    assert resumed.micro_step == 2
    resumed.train()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3, 4]
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 4


def test_bad_eval_data_fails_before_training_and_adapters_are_saved_first(world, tmp_path,
                                                                         monkeypatch):
    bad_choices = write_jsonl(tmp_path / "choices.jsonl", [{"instruction": "x", "answer": "A"}])
    with pytest.raises(DataError, match=r"choices.jsonl: row 1: needs 'choices'"):
        run(world, tmp_path / "a", spec(world, "rev", "mixlora", choice_data=str(bad_choices)))
    with pytest.raises(DataError, match="no such file"):
        run(world, tmp_path / "b", spec(world, "rev", "mixlora",
                                        eval_data=str(tmp_path / "missing.jsonl")))
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path / "c"),
                           adapters=[spec(world, "rev", "mixlora", steps=1)], progress=False)
    trainer = Trainer(options)

    def failing_evaluation():
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer, "evaluate", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.train()
    load_adapter(tmp_path / "c" / "rev", "rev")  # the trained adapter is on disk already


def test_run_file_values_are_typed(world):
    """YAML reads `lr: 2e-4` as text: numbers written as text become numbers, other type
    errors name the option."""
    from mole_serve.training.options import options_from_dict

    raw = {"base_model": "b", "output_dir": "o", "warmup_steps": "2", "adapters": [
        {"name": "a", "data": "d", "lr": "2e-4", "balance_coef": "1e-3", "top_p": None,
         "target_modules": ["q_proj", "up_proj"]}]}
    options = options_from_dict(raw)
    assert options.warmup_steps == 2 and options.adapters[0].lr == 2e-4
    assert options.adapters[0].balance_coef == 1e-3 and options.adapters[0].top_p is None
    for key, value in (("lr", "fast"), ("lr", "nan"), ("steps", 2.5), ("attention", "yes"),
                       ("target_modules", "q_proj")):
        with pytest.raises(ValueError, match=f"adapter 'a': {key} must be"):
            options_from_dict({**raw, "adapters": [{"name": "a", "data": "d", key: value}]})
    with pytest.raises(ValueError, match="run: seed must be int"):
        options_from_dict({**raw, "seed": "x"})
    with pytest.raises(ValueError, match="'adapters' must be a list of objects"):
        options_from_dict({**raw, "adapters": {"name": "a", "data": "d"}})


@pytest.mark.parametrize("change, message", [
    ({"top_k": 9, "num_experts": 8}, r"top_k must be in \[1, num_experts=8\], got 9"),
    ({"strategy": "dynmole", "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"r": 0}, "r must be >= 1, got 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
    ({"target_modules": ["q_proj", "gate", "up"]}, "target_modules must be names among"),
    ({"strategy": "mixlora-switch"}, "expert capacity and jitter are not trained here"),
    ({"lr": -1.0}, "lr must be > 0"), ({"steps": 0}, "steps must be >= 1"),
    ({"epochs": 0.0}, "epochs must be > 0"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"lora_dropout": 0.0, "write_bin": True}, "assert lora_dropout > 0 when they load"),
    ({"strategy": "dynmole", "temperature": 0.5},
     "temperature applies to mixlora-dynamic only, not to dynmole"),
    ({"strategy": "mixlora", "top_p": 0.5}, "top_p applies to mixlora-dynamic / dynmole only"),
    ({"strategy": "mixlora-dynamic", "top_k": 3}, "top_k applies to mixlora only"),
    ({"strategy": "mixlora", "entropy_threshold": 0.5}, "entropy_threshold applies to dynmole"),
    ({"target_modules": ["q_proj"], "attention": False}, "not both"),
    ({"strategy": "mixlora", "router_init_range": -1.0}, "router_init_range must be >= 0"),
    ({"strategy": "lora", "num_experts": 4}, "num_experts applies to mixlora / "),
    ({"strategy": "lora", "balance_coef": 0.5}, "balance_coef applies to mixlora / "),
    ({"strategy": "lora", "router_init_range": 3.0}, "router_init_range applies to mixlora / "),
    ({"strategy": "mixlora", "target_modules": ["q_proj", "v_proj"]},
     r"mixlora's experts are FFNs: target_modules must include one of \['gate_proj'"),
])
def test_adapter_options_are_refused_before_the_base_model_loads(change, message):
    """Named as the option the user gave, from `validate`, not from deep in the trainer."""
    change = dict(change)
    write_bin = change.pop("write_bin", False)
    options = TrainOptions(base_model="not-loaded", output_dir="o", write_bin=write_bin,
                           adapters=[AdapterSpec(name="a", data="d", **change)])
    with pytest.raises(ValueError, match=f"adapter 'a': .*{message}"):
        options.validate()


@pytest.mark.parametrize("name", ["math.v2", "../x", "", "/tmp/abs", "-a"])
def test_adapter_names_are_plain_dir_and_module_names(name):
    options = TrainOptions(base_model="not-loaded", output_dir="o",
                           adapters=[AdapterSpec(name=name, data="d")])
    with pytest.raises(ValueError, match="adapter names must be letters, digits, '_' and '-'"):
        options.validate()


def test_run_options_and_bases_that_cannot_work_are_named(world, tmp_path):
    from mole_serve.train import main

    with pytest.raises(SystemExit, match="mole-train: --output-dir is required"):
        main(["--base-model", "b", "--data", "d"])
    with pytest.raises(ValueError, match="save_every must be >= 0"):
        TrainOptions(base_model="b", output_dir="o", save_every=-1,
                     adapters=[AdapterSpec(name="a", data="d")]).validate()
    with pytest.raises(SystemExit, match="mole-train: adapter 'adapter': lr must be a finite "
                                         "number, got nan"):
        main(["--base-model", "b", "--output-dir", "o", "--data", "d", "--lr", "nan"])
    (tmp_path / "empty").mkdir()
    data = str(world / "reverse.jsonl")
    for base, message in ((tmp_path / "missing", "is no directory, nor a cached hub id"),
                          (tmp_path / "empty", "no config.json")):
        with pytest.raises(SystemExit, match=f"mole-train: base_model {base}.*{message}"):
            main(["--base-model", str(base), "--output-dir", str(tmp_path / "o"), "--data",
                  data, "--no-progress"])


def test_saved_config_names_the_base_by_its_absolute_path(world, tmp_path, monkeypatch):
    """mixlora loads the base from base_model_name_or_path, wherever it runs."""
    monkeypatch.chdir(world)
    trainer = run(world, tmp_path, spec(world, "rev", "mixlora", steps=1))
    options = dataclasses.replace(trainer.options, base_model="base")
    config = options.adapter_specs()[0].mole_config(options.base_model)
    assert config.base_model_name_or_path == str(world / "base")
    assert config.act_fn is None  # the base's: init_adapter records it
    saved = trainer.save_adapter("rev", tmp_path / "saved")
    written = json.loads((saved / "adapter_config.json").read_text())
    assert written["act_fn"] == "silu"  # the base's, which mixlora cannot infer


def test_resume_refuses_a_different_run(world, tmp_path):
    a = spec(world, "rev", "mixlora", steps=4)
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path),
                           adapters=[a], progress=False)
    first = Trainer(options)
    first.step()
    first.save_checkpoint()
    other = dataclasses.replace(options, resume=True, adapters=[spec(world, "up", "mixlora")])
    with pytest.raises(ValueError, match=r"holds adapters \['rev'\], this run trains "
                                         r"\['up'\]"):
        Trainer(other)
    reordered = dataclasses.replace(options, resume=True, seed=7)
    with pytest.raises(ValueError, match="adapter 'rev' changed since .*checkpoint-1: seed 42 "
                                         "-> 7; resume it as it was trained"):
        Trainer(reordered)
    # the saved scheduler would have kept the old lr: refused, like a new accumulation
    new_lr = dataclasses.replace(options, resume=True,
                                 adapters=[dataclasses.replace(a, lr=1e-5, accumulation=2)])
    with pytest.raises(ValueError, match=r"lr 0.01 -> 1e-05; accumulation 1 -> 2"):
        Trainer(new_lr)
    edited = write_jsonl(tmp_path / "edited.jsonl", task_rows("reverse", 48, seed=9))
    with pytest.raises(ValueError, match=r"examples \(sha256 of the token ids\)"):
        Trainer(dataclasses.replace(options, resume=True,
                                    adapters=[dataclasses.replace(a, data=str(edited))]))
    longer = Trainer(dataclasses.replace(options, resume=True,  # more steps, another eval
                                         adapters=[dataclasses.replace(a, steps=6)]))
    assert longer.micro_step == 1
    longer.step()
    longer.save_checkpoint()
    with pytest.raises(ValueError, match=r"adapter 'rev' is at optimizer step 2 in "
                                         r".*checkpoint-2, past this run's 1: give steps >= 2"):
        Trainer(dataclasses.replace(options, resume=True,
                                    adapters=[dataclasses.replace(a, steps=1)]))
    # a fresh run would leave them for a later --resume to take as its own
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(up to "
                                         r"checkpoint-2\): --resume continues it"):
        Trainer(options)
    from mole_serve.train import main  # the CLI says so without a traceback
    with pytest.raises(SystemExit, match=r"mole-train: --resume: .* holds adapters \['rev'\]"):
        main(["--base-model", str(world / "base"), "--data", str(world / "upper.jsonl"),
              "--name", "up", "--output-dir", str(tmp_path), "--resume", "--steps", "1",
              "--no-progress", "--device", "cpu"])


def test_a_diverging_run_stops_naming_the_adapter_and_writes_nothing(world, tmp_path):
    options = TrainOptions(base_model=str(world / "base"), output_dir=str(tmp_path),
                           adapters=[spec(world, "rev", "mixlora", lr=1e6, max_grad_norm=0.0,
                                          steps=8)], progress=False)
    with pytest.raises(ValueError, match=r"adapter 'rev': the loss is \S+ .* at micro-step "
                                         r"\d: training diverged"):
        Trainer(options).train()
    assert not (tmp_path / "rev").exists()
    # weights the last optimizer step made non-finite (no forward after it): no adapter of
    # the run is written, nor a checkpoint
    trainer = Trainer(dataclasses.replace(options, output_dir=str(tmp_path / "b"), adapters=[
        spec(world, "rev", "mixlora", steps=1), spec(world, "up", "mixlora", steps=1)]))
    for run in trainer.runs.values():
        run.steps = run.total_steps
    with torch.no_grad():
        next(trainer.model.adapters["up"].parameters()).fill_(math.inf)
    for write in (trainer.train, trainer.save_checkpoint):
        with pytest.raises(ValueError, match="adapter 'up': weights are no longer finite"):
            write()
    assert not any((tmp_path / "b").glob("*/adapter_config.json"))
    assert not list((tmp_path / "b").glob("checkpoint-*"))


def test_device_option(world, monkeypatch):
    from mole_serve.training.trainer import training_device

    options = TrainOptions(base_model="b", output_dir="o",
                           adapters=[AdapterSpec(name="a", data="d")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(options) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(options) == torch.device("cuda")  # the GPU when there is one
    assert training_device(dataclasses.replace(options, device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:0': this torch sees no CUDA device"):
        dataclasses.replace(options, device="cuda:0").validate()
    with pytest.raises(ValueError, match="device 'gpu0'"):
        dataclasses.replace(options, device="gpu0").validate()


def test_one_bos_and_one_eos_when_the_chat_template_writes_them(world):
    """Llama-style tokenizers add BOS and chat templates write BOS/EOS themselves: the
    trained sequence must hold each once."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    chat = {"messages": [{"role": "user", "content": "red cat"},
                         {"role": "assistant", "content": "cat red"}]}
    alpaca = {"instruction": "reverse", "input": "red cat", "output": "cat red"}
    ids = {}
    for kind, row in (("chat", chat), ("alpaca", alpaca)):
        ids[kind] = tokenize([row], tokenizer, cutoff=256, train_on_inputs=False, add_eos=True,
                             source="t").examples[0].input_ids
        assert ids[kind][0] == bos and ids[kind].count(bos) == 1, kind
        assert ids[kind].count(eos) == 1, kind
    assert ids["alpaca"][-1] == eos
    after_eos = ids["chat"][ids["chat"].index(eos) + 1:]  # the template's end of turn
    assert tokenizer.decode(after_eos) == "\n"


def test_router_init_range_reads_as_moe_peft_does():
    """MixLoRA's FFN router N(0, range) (switch: 1.0 by default); DynMoLE's per-linear
    routers Kaiming-uniform with a = sqrt(range), nn.Linear's init at the default 5.0."""
    from mole_serve.adapter import BaseShape, init_adapter
    from mole_serve.config import MoleConfig

    base = BaseShape(256, 512, 1, 4, 4, 64)
    g = torch.Generator().manual_seed(0)

    def router_std(strategy, proj=None, **kw):
        config = MoleConfig(strategy, num_experts=8, r=4, lora_alpha=8,
                            target_modules=("gate_proj", "up_proj", "down_proj"))
        layer = init_adapter(config, base, generator=g, **kw).layers[0]
        return float((layer.routers[proj] if proj else layer.router).std())

    assert router_std("mixlora") == pytest.approx(0.02, rel=0.1)
    assert router_std("mixlora", router_init_range=0.5) == pytest.approx(0.5, rel=0.1)
    assert router_std("mixlora-switch") == pytest.approx(1.0, rel=0.1)
    bound = 1 / math.sqrt(256)  # uniform(-bound, bound): std = bound / sqrt(3)
    assert router_std("dynmole", "gate_proj") == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert router_std("dynmole", "gate_proj", router_init_range=0.0) == pytest.approx(
        math.sqrt(6 / 256) / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_gradient_clipping_is_an_option(world, tmp_path, monkeypatch, max_grad_norm):
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm: clipped.append(norm))
    run(world, tmp_path, spec(world, "rev", "mixlora", steps=2, max_grad_norm=max_grad_norm))
    assert clipped == ([max_grad_norm] * 2 if max_grad_norm else [])


@pytest.mark.parametrize("change", [{"mlp_bias": True}, {"hidden_act": "quick_gelu"}])
def test_bases_whose_mlp_the_reference_cannot_compute_are_refused(change):
    """The trainer computes the frozen MLP itself (the server's math): a biased MLP (whose
    bias the expert mix would weight) or an activation it lacks is refused, not guessed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mole_serve.training.modules import MoleTrainingModel
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=300, **change))
    with pytest.raises(ValueError, match="is not one the reference computes"):
        MoleTrainingModel(model, [])
