"""`make demo` end to end at full size (about 2 minutes from scratch on the CPU box): the
embedded base and adapters are built, served by a real `vllm serve`, each adapter does its
task on held-out prompts, and no process of the server's group is left afterwards, also when
the demo is interrupted."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mole_serve.demo.server import live_group_members

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_command(workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/demo.py", "--workdir", str(workdir), *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A demo run from nothing: build, serve, ask, report."""
    root = tmp_path_factory.mktemp("demo")
    report = root / "report.json"
    done = subprocess.run(demo_command(root / "work", "--report", str(report)), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"workdir": root / "work", "stdout": done.stdout,
            "report": json.loads(report.read_text())}


def test_each_adapter_does_its_task_on_held_out_prompts(first_run):
    results = first_run["report"]["results"]
    for task in ("reverse", "upper"):
        checks = [r["correct"] for r in results if r["model"] == task]
        assert len(checks) == 8 and sum(checks) >= 6, (task, results)
    assert len([r for r in results if r["model"] == "base"]) == 8
    assert "tasks done right" in first_run["stdout"]


def test_metrics_are_printed_and_the_server_group_is_gone(first_run):
    report = first_run["report"]
    for series in ("mole_serve_adapter_loads_total", "mole_serve_expert_selections_total",
                   "mole_serve_routing_entropy_count", "mole_serve_experts_per_token_sum"):
        assert any(line.startswith(series) for line in report["metrics"]), series
    assert "== MoLE series at /metrics ==" in first_run["stdout"]
    assert live_group_members(report["server_pgid"]) == []


def test_second_run_reuses_the_build(first_run):
    done = subprocess.run(demo_command(first_run["workdir"], "--prompt", "red cat moon"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing the demo build" in done.stdout
    assert re.search(r"reverse\s+-> 'moon cat red'", done.stdout), done.stdout[-2000:]


def test_ctrl_c_while_the_server_starts_stops_its_process_group(first_run):
    # A shell's background job inherits SIGINT ignored (and Python then keeps it so):
    # give the demo the disposition of a terminal's foreground command.
    demo = subprocess.Popen(demo_command(first_run["workdir"], "--prompt", "x"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "starting:" not in demo.stdout.readline():
        pass
    time.sleep(3)  # vllm serve is importing; it takes 30 s or more to become healthy
    server_pids = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                   if _parent(pid) == demo.pid]
    assert server_pids, "the demo did not start vllm serve"
    demo.send_signal(signal.SIGINT)
    output = demo.communicate(timeout=120)[0]
    assert demo.returncode == 130, output[-3000:]
    assert all(live_group_members(pid) == [] for pid in server_pids)


def _parent(pid: int) -> int | None:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_own_base_and_adapter_dirs_by_path(first_run, tmp_path):
    """`make demo ARGS="--base DIR --adapter NAME=DIR --prompt ..."` as the README writes it:
    the user's dirs under the user's names; a base without a chat template gets raw
    completions; a dir that is no adapter stops before anything starts."""
    work = first_run["workdir"]
    base = tmp_path / "base"
    shutil.copytree(work / "base", base)
    (base / "chat_template.jinja").unlink()   # a base model's tokenizer: no chat template
    adapter = tmp_path / "runs" / "mixlora_r=8,e=4"  # vLLM's --lora-modules NAME=PATH splits
    shutil.copytree(work / "adapters" / "reverse", adapter)  # at commas: the JSON form
    report = tmp_path / "report.json"
    done = subprocess.run(demo_command(
        tmp_path / "own", "--base", str(base), "--adapter", f"mine={adapter}",
        "--prompt", "red cat moon", "--report", str(report)),
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "has no chat template: sending the prompts as raw completions" in done.stdout
    results = json.loads(report.read_text())["results"]
    assert [(r["model"], r["correct"]) for r in results] == [("base", None), ("mine", None)]
    assert re.search(r"mine\s+-> '", done.stdout), done.stdout[-2000:]
    assert not (tmp_path / "own" / "base").exists(), "nothing embedded is built"

    refused = subprocess.run(demo_command(tmp_path / "own", "--adapter", f"x={tmp_path}"),
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "has no adapter_config.json" in refused.stderr


def test_adapter_names_are_unique_and_not_the_base_models(tmp_path, monkeypatch):
    from mole_serve.demo.cli import parse_adapters

    (tmp_path / "adapter_config.json").write_text("{}")
    assert parse_adapters([f"a={tmp_path}"]) == {"a": tmp_path}
    monkeypatch.setenv("HOME", str(tmp_path.parent))  # `make` runs sh: NAME=~/x stays as is
    assert parse_adapters([f"a=~/{tmp_path.name}"]) == {"a": tmp_path}
    for given in ([f"base={tmp_path}"], [f"a={tmp_path}", f"b={tmp_path}", f"a={tmp_path}"]):
        with pytest.raises(SystemExit, match="the name is taken"):
            parse_adapters(given)


def test_serve_args_fit_the_adapters_and_keep_the_demos_own_flags(tmp_path):
    """vLLM checks a PEFT adapter's rank_pattern against --max-lora-rank too; the flags the
    demo polls and asks by cannot be overridden from --serve-args."""
    from mole_serve.demo.cli import serve_args

    peft = tmp_path / "runs" / "lora_r=8,q=64"
    peft.mkdir(parents=True)
    (peft / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 64}}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))

    def max_rank(args):
        return args[args.index("--max-lora-rank") + 1]

    assert max_rank(serve_args(tmp_path, {"plain": plain}, "")) == "16"
    args = serve_args(tmp_path, {"p": peft, "plain": plain}, "--max-model-len 128")
    assert max_rank(args) == "64"
    assert json.loads(args[args.index("--lora-modules") + 1]) == {"name": "p",
                                                                  "path": str(peft)}
    assert args[-2:] == ["--max-model-len", "128"]
    assert "--max-mole-rank" not in args
    # a MoLE adapter's rank sizes MoLE slots exactly, apart from vLLM's allowed LoRA ranks
    mole = tmp_path / "mole"
    mole.mkdir()
    config = {"peft_type": "MIXLORA", "routing_strategy": "mixlora", "r": 24, "lora_alpha": 48,
              "num_experts": 4, "top_k": 2, "target_modules": ["gate_proj", "down_proj"]}
    (mole / "adapter_config.json").write_text(json.dumps(config))
    args = serve_args(tmp_path, {"plain": plain, "mole": mole}, "")
    assert (max_rank(args), args[args.index("--max-mole-rank") + 1]) == ("16", "24")
    assert args[args.index("--max-mole-experts") + 1] == "4"
    # a MoLE dir the server would refuse stops the demo before it starts a server
    (mole / "adapter_config.json").write_text(json.dumps({**config, "top_k": 5}))
    with pytest.raises(SystemExit, match="adapter 'mole'.*top_k"):
        serve_args(tmp_path, {"mole": mole}, "")
    for extra in ("--port 8000", "--served-model-name=x", "--lora_modules a=b"):
        with pytest.raises(SystemExit, match=f"--serve-args may not set {extra.split()[0]}"):
            serve_args(tmp_path, {"p": peft}, extra)


def test_the_build_is_redone_on_request_or_for_another_recipe(tmp_path, monkeypatch):
    """`make demo ARGS=--rebuild` builds again; an unchanged build reuses the cache."""
    import torch

    from mole_serve.demo import build as demo_build
    from mole_serve.demo.cli import parse_args

    made = []

    def pretrain_base(path, recipe):
        made.append("base")
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")

    def train_adapters(base, out, recipe):
        made.append("adapters")
        for name in demo_build.ADAPTER_SHAPES:
            (out / name).mkdir(parents=True)
            (out / name / "adapter_config.json").write_text("{}")

    monkeypatch.setattr(demo_build, "pretrain_base", pretrain_base)
    monkeypatch.setattr(demo_build, "train_adapters", train_adapters)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # this process's
    recipe, quiet = demo_build.Recipe(), lambda message: None
    demo_build.build(tmp_path, recipe, log=quiet)
    demo_build.build(tmp_path, recipe, log=quiet)
    assert made == ["base", "adapters"]
    demo_build.build(tmp_path, recipe, rebuild=parse_args(["--rebuild"]).rebuild, log=quiet)
    demo_build.build(tmp_path, dataclasses.replace(recipe, seed=1), log=quiet)
    assert made == ["base", "adapters"] * 3
    # ... and for other adapter shapes, other code, or a part of the build gone
    monkeypatch.setitem(demo_build.ADAPTER_SHAPES, "upper", dict(strategy="mixlora"))
    demo_build.build(tmp_path, recipe, log=quiet)
    assert {"corpus.py", "trainer.py", "data.py", "checkpoint.py"} <= {
        path.name for path in demo_build.build_sources()}
    source = tmp_path / "corpus.py"
    source.write_text("WORDS = []\n")
    monkeypatch.setattr(demo_build, "build_sources", lambda: [source])
    demo_build.build(tmp_path, recipe, log=quiet)
    demo_build.build(tmp_path, recipe, log=quiet)
    source.write_text("WORDS = ['sun']\n")
    demo_build.build(tmp_path, recipe, log=quiet)
    shutil.rmtree(tmp_path / "adapters" / "upper")
    demo_build.build(tmp_path, recipe, log=quiet)
    assert made == ["base", "adapters"] * 7
