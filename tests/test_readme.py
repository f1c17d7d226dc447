"""The README says only what runs. Every shell command in its code blocks is one this suite
knows: it must parse with the real parser (`vllm serve` with the plugin, the trainer's CLI,
the demo's options) and is run for real elsewhere:
- `make test`: CI (`.ci/run`); `make demo`, also with `ARGS="--base DIR --adapter NAME=DIR
  ..."`: tests/test_demo.py (the same script);
- `vllm serve ... --enable-mole-adapters ...`: tests/test_vllm_serve.py (same flags);
- `python -m mole_serve.train ...` (flags, `--config`): tests/test_training.py.
The Python example runs here on a tiny model. A new command in the README fails this test
until it is taught here (and tested)."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import torch

from mole_serve.config import MoleConfig
from tiny_model import TINY_SHAPE, make_tiny_llama
from vllm_helpers import make_mole_adapter, serve_arg_parser

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[list[str]]:
    """Each command of the bash blocks as argv, without env assignments and comments."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
                argv.pop(0)
            if argv:
                commands.append(argv)
    return commands


def check_make(argv: list[str]) -> None:
    target, *assignments = argv[1:]
    assert re.search(rf"^{target}:", (REPO / "Makefile").read_text(), flags=re.M)
    if target == "test":
        assert "make test" in (REPO / ".ci" / "run").read_text()
    for assignment in assignments:
        name, value = assignment.split("=", 1)
        assert name == "ARGS" and target == "demo", assignment
        from mole_serve.demo.cli import parse_args
        parse_args(shlex.split(value))


def check_vllm_serve(argv: list[str]) -> None:
    import huggingface_hub
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert argv[1] == "serve"
    args = serve_arg_parser().parse_args(argv[2:])
    args.model = args.model_tag
    with pytest.MonkeyPatch.context() as env:  # the flag sets up a metrics dir otherwise
        env.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp")
        # BASE_DIR is a placeholder: offline (as an engine test before this one may leave
        # the hub), vLLM would look it up in the hub cache
        env.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["mole"]["enabled"]
    assert [m.name for m in args.lora_modules] == ["mixlora", "dynmole", "peft"]


def check_train(argv: list[str]) -> None:
    from mole_serve.train import build_parser

    assert argv[:3] == ["python", "-m", "mole_serve.train"]
    build_parser().parse_args(argv[3:])


CHECKS = {"make": check_make, "vllm": check_vllm_serve, "python": check_train}


def test_every_shell_command_is_known_and_parses():
    commands = shell_commands()
    assert {c[0] for c in commands} <= set(CHECKS), [c for c in commands if c[0] not in CHECKS]
    assert ["make", "test"] in commands and ["make", "demo"] in commands
    for argv in commands:
        CHECKS[argv[0]](argv)


def test_python_example_runs(tmp_path):
    (example,) = code_blocks("python")
    model_dir = make_tiny_llama(tmp_path / "base")
    base = TINY_SHAPE
    make_mole_adapter(tmp_path / "math", MoleConfig("mixlora", 4, 8, 16, ("gate_proj",
                                                                          "up_proj"), top_k=2),
                      base, seed=0)
    example = example.replace('"adapters/math"', repr(str(tmp_path / "math")))
    scope = {"BASE_DIR": str(model_dir), "input_ids": torch.tensor([[1, 17, 305], [1, 600, 2]])}
    exec(compile(example, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.shape == (2, 3 + 32)
