"""Evaluation: held-out loss / perplexity, and multiple-choice accuracy scored as MoE-PEFT
does (the logits of the answer-label tokens at the last prompt position, argmax)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, DataError, collate, prompt_and_answer


@torch.no_grad()
def heldout_loss(model, adapter: str, examples: list[Example], pad_id: int,
                 batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean CE over the labelled tokens and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = collate([examples[start:start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with model.rows([adapter] * batch["input_ids"].shape[0], batch["attention_mask"]):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                 labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += losses.item()
        count += int((labels != IGNORE).sum())
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def label_token(tokenizer, label: str) -> int:
    """The id MoE-PEFT scores for a label: the last sub-token of ' ' + label."""
    ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"label {label!r} tokenizes to nothing")
    return ids[-1]


@torch.no_grad()
def choice_accuracy(model, adapter: str, tokenizer, rows: list[dict[str, Any]]) -> float:
    """Rows: alpaca/chat prompt fields plus `choices` (labels, e.g. ["A", "B"]) and `answer`."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for number, row in enumerate(rows, start=1):
        where = f"choice data row {number}"
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(choices, list) or answer not in (choices or []):
            raise DataError(f"{where}: needs 'choices' (a list of labels) and an 'answer' "
                            "among them")
        prompt, _ = prompt_and_answer(dict(row, output=row.get("output", "")), tokenizer, where)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]],
                           device=device)
        with model.rows([adapter]):
            logits = model(input_ids=ids).logits[0, -1]
        candidates = torch.tensor([label_token(tokenizer, c) for c in choices], device=device)
        correct += int(choices[int(logits[candidates].argmax())] == answer)
    return correct / len(rows)
