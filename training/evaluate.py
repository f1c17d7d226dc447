"""Evaluation: held-out loss / perplexity, and multiple-choice accuracy scored as MoE-PEFT
does (the logits of the answer-label tokens at the last prompt position, argmax)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data import (IGNORE, DataError, Example, choice_prompt, collate, encode_answer,
                   encode_prompt)


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


def label_tokens(tokenizer, prompt: str, prompt_ids: list[int], labels: list[str],
                 where: str) -> list[int]:
    """The id scored per label: the first the trainer teaches for that label as the answer
    to this prompt. (MoE-PEFT's last id of ' ' + label fits its prompts ending in 'Answer:',
    not templates ending in a newline or a space, nor labels of several tokens.)"""
    ids = []
    for label in labels:
        answer = encode_answer(tokenizer, prompt, prompt_ids, label)
        if not answer:
            raise DataError(f"{where}: label {label!r} tokenizes to nothing")
        if answer[0] in ids:
            raise DataError(f"{where}: labels {labels[ids.index(answer[0])]!r} and {label!r} "
                            "start with the same token: the last prompt position cannot tell "
                            "them apart")
        ids.append(answer[0])
    return ids


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
        prompt = choice_prompt(row, tokenizer, where)
        prompt_ids = encode_prompt(tokenizer, prompt)
        items.append(ChoiceItem(prompt_ids, label_tokens(tokenizer, prompt, prompt_ids,
                                                         [str(c) for c in choices], where),
                                choices.index(answer)))
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
