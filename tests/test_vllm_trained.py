"""Adapters written by `mole_serve.training` serve in vLLM exactly as they were trained: the
engine's greedy tokens equal the training model's own greedy generation (the trainer's
forward, not the reference integration), for MixLoRA and DynMoLE adapters in one batch."""

from __future__ import annotations

import pytest

from mole_serve.training.options import AdapterSpec, TrainOptions
from mole_serve.training.trainer import Trainer
from tiny_model import make_tiny_llama, task_rows, write_jsonl
from vllm_helpers import greedy_tokens, offline_llm

PROMPTS = [[1, 17, 305, 44, 912, 8], [1, 600, 2, 77], [1, 5, 5, 5, 400, 123, 250, 31, 999]]
MAX_TOKENS = 8
STRATEGIES = {"rev": "mixlora", "up": "dynmole"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_trained")
    make_tiny_llama(root / "base")
    write_jsonl(root / "reverse.jsonl", task_rows("reverse", 32, seed=0))
    write_jsonl(root / "upper.jsonl", task_rows("upper", 32, seed=1))
    specs = [AdapterSpec(name=name, strategy=strategy, num_experts=4, r=8, lora_alpha=16,
                         lr=2e-2, steps=6, batch_size=4,
                         data=str(root / ("reverse.jsonl" if name == "rev" else "upper.jsonl")))
             for name, strategy in STRATEGIES.items()]
    trainer = Trainer(TrainOptions(base_model=str(root / "base"), output_dir=str(root / "out"),
                                   adapters=specs, progress=False))
    while any(not r.done for r in trainer.runs.values()):
        trainer.step()
    trainer.model.eval()
    expected = {}
    for name in (None, *STRATEGIES):
        for i, prompt in enumerate(PROMPTS):
            with trainer.model.rows([name]):
                expected[(name, i)] = greedy_tokens(trainer.model.model, prompt, MAX_TOKENS)
    for name in STRATEGIES:
        trainer.save_adapter(name, root / "out" / name)
    return root, expected


def test_trained_adapters_serve_with_the_trained_greedy_tokens(trained):
    root, expected = trained
    for name in STRATEGIES:  # each adapter's served tokens must show that adapter
        assert any(expected[(name, i)] != expected[(None, i)] for i in range(len(PROMPTS))), \
            f"training {name} changed nothing"
    with offline_llm(root / "base") as llm:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        requests = {name: LoRARequest(name, i + 1, str(root / "out" / name))
                    for i, name in enumerate(STRATEGIES)}
        jobs = [(name, i) for i in range(len(PROMPTS)) for name in (None, *STRATEGIES)]
        outputs = llm.generate(
            [{"prompt_token_ids": PROMPTS[i]} for _, i in jobs],
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
            lora_request=[requests[n] if n else None for n, _ in jobs], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [expected[j] for j in jobs]
