"""`python scripts/demo.py` / `make demo`: serve a base model and MoLE adapters with
`vllm serve --enable-mole-adapters`, ask every adapter and the base model the same prompts
at once through the `openai` client, print the answers and the MoLE series of /metrics.

Without options it builds (once, cached in .demo/) a tiny Llama and two adapters trained on
embedded tasks, `reverse` (MixLoRA) and `upper` (DynMoLE), and checks their answers on
held-out prompts. `--base DIR` and `--adapter NAME=DIR` serve your own checkpoints instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ..checkpoint import is_mole_adapter_dir
from ..config import MoleConfig, read_config_json
from ..errors import AdapterError
from . import corpus
from .build import Recipe, build
from .server import (ServerError, VllmServer, default_env, exit_on_termination, local_http,
                     vllm_max_lora_rank)

BASE_NAME = "base"
# `vllm serve` flags the demo sets itself and relies on (where it polls, the names it asks)
OWN_FLAGS = ("--host", "--port", "--uds", "--served-model-name", "--lora-modules")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=pathlib.Path,
                   help="local Llama-family checkpoint dir (default: the embedded tiny model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve this adapter dir (MoLE or plain PEFT LoRA); repeatable; "
                        "default: the embedded 'reverse' and 'upper'")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt to send (repeatable; default: held-out word lists)")
    p.add_argument("--completions", action="store_true",
                   help="send prompts as raw completions instead of chat messages (the "
                        "default for a base whose tokenizer has no chat template)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--serve-args", default="",
                   help="extra `vllm serve` arguments, e.g. \"--max-model-len 2048\"")
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(".demo"),
                   help="cache of the embedded build, vLLM's cache and the server log")
    p.add_argument("--rebuild", action="store_true", help="rebuild the embedded model/adapters")
    p.add_argument("--pretrain-steps", type=int, default=Recipe.pretrain_steps)
    p.add_argument("--train-steps", type=int, default=Recipe.train_steps)
    p.add_argument("--report", type=pathlib.Path,
                   help="also write answers, checks, timings and the server's pgid as JSON")
    return p.parse_args(argv)


def parse_adapters(texts: list[str]) -> dict[str, pathlib.Path]:
    """`--adapter NAME=DIR` values; names must be unique and not the base model's."""
    adapters = {}
    for text in texts:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--adapter wants NAME=DIR, got {text!r}")
        if name == BASE_NAME or name in adapters:
            raise SystemExit(f"--adapter {name}: the name is taken "
                             f"({'the base model' if name == BASE_NAME else 'given twice'})")
        directory = pathlib.Path(path).expanduser()  # `make` runs sh, which leaves NAME=~/x
        if not (directory / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {name}: {directory} has no adapter_config.json")
        adapters[name] = directory
    return adapters


def has_chat_template(base: pathlib.Path) -> bool:
    """Whether `base`'s tokenizer carries a chat template (where transformers writes one)."""
    if (base / "chat_template.jinja").is_file() or (base / "chat_template.json").is_file():
        return True
    config = base / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def serve_args(base: pathlib.Path, adapters: dict[str, pathlib.Path], extra: str) -> list[str]:
    """Flags sized to the adapters: plain LoRA's rank bound (a value vLLM allows), MoLE's
    rank and expert bounds, one slot per adapter. `extra` comes last, so it overrides them
    (not the flags in OWN_FLAGS)."""
    extra_args = shlex.split(extra)
    clashing = [a for a in extra_args  # vLLM reads --served_model_name as --served-model-name
                if a.split("=")[0].replace("_", "-") in OWN_FLAGS]
    if clashing:
        raise SystemExit(f"demo: --serve-args may not set {', '.join(clashing)}: the demo sets "
                         f"{', '.join(OWN_FLAGS)} itself (--base and --adapter choose what is "
                         "served)")
    try:  # a MoLE dir the server would refuse stops the demo before the server starts
        mole = {n: MoleConfig.load(p, n) for n, p in adapters.items() if is_mole_adapter_dir(p)}
        plain = [read_config_json(p, n) for n, p in adapters.items() if n not in mole]
        # vLLM checks a PEFT adapter's largest rank, its rank_pattern's included, against one
        # of its allowed values; MoLE slots take the exact largest MoLE rank
        max_rank = vllm_max_lora_rank(max(
            (max([c.get("r", 8), *(c.get("rank_pattern") or {}).values()]) for c in plain),
            default=8))
    except (AdapterError, ValueError) as exc:
        raise SystemExit(f"demo: {exc}") from None
    mole_rank = max((c.r for c in mole.values()), default=None)
    experts = max((c.num_experts for c in mole.values()), default=1)
    args = ["--served-model-name", BASE_NAME, "--max-num-seqs", "16", "--enforce-eager"]
    if _is_cpu():
        args += ["--dtype", "float32", "--max-model-len", "256"]
    if adapters:
        args += ["--enable-mole-adapters", "--max-mole-experts", str(experts),
                 "--max-lora-rank", str(max_rank),
                 *(["--max-mole-rank", str(mole_rank)] if mole_rank else []),
                 "--max-loras", str(len(adapters)), "--max-cpu-loras", str(len(adapters)),
                 # the JSON form: vLLM reads a NAME=PATH with a comma in it as broken JSON
                 "--lora-modules", *(json.dumps({"name": n, "path": str(p.resolve())})
                                     for n, p in adapters.items())]
    return args + extra_args


def _is_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def ask_all(url: str, models: list[str], prompts: list[str], *, chat: bool,
            max_tokens: int) -> dict[tuple[str, str], str]:
    """Every (model, prompt) pair at once, greedy; answers stripped of surrounding space."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=300, http_client=local_http())

    def ask(job: tuple[str, str]) -> str:
        model, prompt = job
        if chat:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens, temperature=0.0)
            return (response.choices[0].message.content or "").strip()
        response = client.completions.create(model=model, prompt=prompt,
                                             max_tokens=max_tokens, temperature=0.0)
        return response.choices[0].text.strip()

    jobs = [(m, p) for p in prompts for m in models]
    pool = ThreadPoolExecutor(len(jobs))
    try:
        return dict(zip(jobs, pool.map(ask, jobs)))
    finally:  # on Ctrl-C or an error, do not wait for the other answers: stop the server
        pool.shutdown(wait=False, cancel_futures=True)


def mole_series(url: str, routed: bool) -> list[str]:
    """The MoLE lines of /metrics, without histogram buckets and creation stamps. With
    `routed` (MoLE adapters served) it waits a moment for the routing series: the engine
    exports them when it goes idle, just after the last answer."""
    deadline = time.monotonic() + (10 if routed else 0)
    with local_http() as client:
        while True:
            text = client.get(f"{url}/metrics", timeout=30).text
            if "mole_serve_expert_selections_total{" in text or time.monotonic() >= deadline:
                return [line for line in text.splitlines() if line.startswith("mole_serve_")
                        and "_bucket{" not in line and "_created" not in line]
            time.sleep(0.2)


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    timings: dict[str, float] = {}
    adapters = parse_adapters(args.adapter)
    embedded = args.base is None and not adapters
    prompts = list(args.prompt)
    base = args.base and args.base.expanduser()
    if base is not None and not (base / "config.json").is_file():
        raise SystemExit(f"--base {base}: not a checkpoint dir (no config.json)")
    if base is None:
        recipe = dataclasses.replace(Recipe(), pretrain_steps=args.pretrain_steps,
                                     train_steps=args.train_steps)
        built = build(args.workdir, recipe, rebuild=args.rebuild)
        base = built.base
        if not adapters:
            adapters = built.adapters
        prompts = prompts or built.held_out
        timings["build_s"] = time.monotonic() - started
    if not prompts:
        raise SystemExit("give at least one --prompt for your own base model")
    chat = not args.completions and (has_chat_template(base) or any(
        a.split("=")[0] == "--chat-template" for a in shlex.split(args.serve_args)))
    if not chat and not args.completions:
        print(f"{base} has no chat template: sending the prompts as raw completions")
    server = VllmServer(base, serve_args(base, adapters, args.serve_args),
                        log_path=args.workdir / "server.log",
                        env=default_env(args.workdir.resolve() / "vllm-cache"))
    print(f"starting: {shlex.join(server.command)}\n(log: {server.log_path})", flush=True)
    report = {"server_pgid": None, "results": [], "metrics": [], "seconds": timings}
    step = time.monotonic()
    with server:
        report["server_pgid"] = server.pgid
        timings["server_start_s"] = time.monotonic() - step
        print(f"server healthy at {server.url} after {timings['server_start_s']:.0f} s")
        step = time.monotonic()
        models = [BASE_NAME, *adapters]
        answers = ask_all(server.url, models, prompts, chat=chat, max_tokens=args.max_tokens)
        timings["requests_s"] = time.monotonic() - step
        report["metrics"] = mole_series(
            server.url, routed=any(is_mole_adapter_dir(p) for p in adapters.values()))
    timings["total_s"] = time.monotonic() - started
    report["results"] = [_result(m, p, answers[m, p], embedded) for p in prompts for m in models]
    _print_report(report, models, prompts, embedded)
    return report


def _result(model: str, prompt: str, answer: str, check: bool) -> dict:
    expected = corpus.TASKS[model](prompt.split()) if check and model in corpus.TASKS else None
    return {"model": model, "prompt": prompt, "answer": answer, "expected": expected,
            "correct": None if expected is None else answer == expected}


def _print_report(report: dict, models: list[str], prompts: list[str], embedded: bool) -> None:
    width = max(map(len, models))
    print(f"\n== {len(prompts)} prompts x {len(models)} models, sent concurrently, greedy ==")
    for prompt in prompts:
        print(f"prompt: {prompt!r}")
        for r in (r for r in report["results"] if r["prompt"] == prompt):
            mark = {True: "  ok", False: f"  WRONG (want {r['expected']!r})", None: ""}[
                r["correct"]]
            print(f"  {r['model']:<{width}} -> {r['answer']!r}{mark}")
    if embedded:
        scores = []
        for task in corpus.TASKS:
            checked = [r["correct"] for r in report["results"] if r["model"] == task]
            scores.append(f"{task} {sum(checked)}/{len(checked)}")
        print("tasks done right: " + ", ".join(scores))
    print("\n== MoLE series at /metrics ==")
    print("\n".join(report["metrics"]) or "(none)")
    t = report["seconds"]
    print("\n" + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in t.items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows through pipes and `make`
    exit_on_termination()
    import httpx
    import openai

    try:
        report = run(args)
    except ServerError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except (openai.APIError, httpx.HTTPError) as exc:
        print(f"demo: a request failed ({type(exc).__name__}): {exc}\n(the server log: "
              f"{args.workdir / 'server.log'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    return 0
