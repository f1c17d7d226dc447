"""Evaluation: held-out loss / perplexity, and multiple-choice accuracy scored as MoE-PEFT
does (the logits of the answer-label tokens at the last prompt position, argmax)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data import (IGNORE, DataError, Example, collate, encode_answer, encode_prompt,
                   prompt_and_answer, with_answer)


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


def label_tokens(tokenizer, row: dict[str, Any], labels: list[str], where: str
                 ) -> tuple[list[int], list[int]]:
    """The row's prompt ids, and the id scored per label: the first one training teaches for
    the row answered with that label (the answer as its template renders it: Llama 2's chat
    template puts a space before it). MoE-PEFT's last id of ' ' + label fits its prompts
    ending in 'Answer:', not templates ending in a newline or a space, nor longer labels."""
    prompt_ids, ids = None, []
    for label in labels:
        prompt, answer = prompt_and_answer(with_answer(row, label), tokenizer, where)
        if prompt_ids is None:  # the same prompt for every label
            prompt_ids = encode_prompt(tokenizer, prompt)
        first = encode_answer(tokenizer, prompt, prompt_ids, answer)[:1]
        if not first:
            raise DataError(f"{where}: label {label!r} tokenizes to nothing")
        if first[0] in ids:
            raise DataError(f"{where}: labels {labels[ids.index(first[0])]!r} and {label!r} "
                            "start with the same token: the last prompt position cannot tell "
                            "them apart")
        ids.append(first[0])
    return prompt_ids, ids


@dataclass
class ChoiceItem:
    prompt_ids: list[int]
    label_ids: list[int]   # one scored token per choice
    answer: int            # index of the right choice


def choice_items(rows: list[dict[str, Any]], tokenizer, source: str) -> list[ChoiceItem]:
    """Multiple-choice rows, checked and tokenized before training starts. Rows: alpaca or
    chat prompt fields plus `choices` (labels, e.g. ["A", "B"]) and `answer`."""
    items = []
    for number, row in enumerate(rows, start=1):
        where = f"{source}: row {number}"
        choices = row.get("choices") if isinstance(row, dict) else None
        answer = row.get("answer") if isinstance(row, dict) else None
        if not isinstance(choices, list) or answer not in choices:
            raise DataError(f"{where}: needs 'choices' (a list of labels) and an 'answer' "
                            "among them")
        prompt_ids, label_ids = label_tokens(tokenizer, row, [str(c) for c in choices], where)
        items.append(ChoiceItem(prompt_ids, label_ids, choices.index(answer)))
    return items


@torch.no_grad()
def choice_accuracy(model, adapter: str, items: list[ChoiceItem]) -> float:
    """Share of rows whose right label has the highest logit at the last prompt position."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for item in items:
        with model.rows([adapter]):
            logits = model(input_ids=torch.tensor([item.prompt_ids], device=device)).logits[0, -1]
        scores = logits[torch.tensor(item.label_ids, device=device)]
        correct += int(int(scores.argmax()) == item.answer)
    return correct / len(items)
