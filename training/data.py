"""Training data: alpaca rows or chat messages -> token ids with the prompt masked out.

Alpaca rows (`instruction`, optional `input`, `output`) use MoE-PEFT's alpaca template; chat
rows (`messages`) use the tokenizer's chat template. Loss covers the answer only unless
`train_on_inputs` (MoE-PEFT trains on the whole sequence).
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch

IGNORE = -100

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


class DataError(ValueError):
    """A dataset the trainer cannot use; names the file, the row and the problem."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def load_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Rows of a .json (list), .jsonl file or a `datasets.save_to_disk` dir."""
    path = pathlib.Path(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a dataset dir needs the `datasets` package") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        rows = [dict(r) for r in loaded]
    elif not path.is_file():
        raise DataError(f"{path}: no such file")
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON ({exc})") from None
    else:
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, found {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def prompt_and_answer(row: dict[str, Any], tokenizer, where: str) -> tuple[str, str]:
    """Split a row into the prompt text (masked) and the answer text (trained on)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, found {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or messages[-1].get("role") != "assistant"):
            raise DataError(f"{where}: 'messages' must be a list ending with an assistant turn")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat rows need a tokenizer with a chat template")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template renders the prompt differently "
                            "inside the full conversation")
        return prompt, full[len(prompt):]
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if missing:
        raise DataError(f"{where}: missing text field(s) {missing} (alpaca rows need "
                        "'instruction' and 'output'; chat rows need 'messages')")
    template = ALPACA_WITH_INPUT if row.get("input") else ALPACA
    return template.format(instruction=row["instruction"], input=row.get("input", "")), \
        row["output"]


def tokenize(rows: list[dict[str, Any]], tokenizer, *, cutoff: int, train_on_inputs: bool,
             add_eos: bool, source: str) -> tuple[list[Example], int]:
    """Token ids and labels per row; returns (examples, number of truncated rows)."""
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token: set one (e.g. --pad-token '<pad>' or "
                        "tokenizer.pad_token = tokenizer.eos_token) before training")
    examples, truncated = [], 0
    for number, row in enumerate(rows, start=1):
        prompt, answer = prompt_and_answer(row, tokenizer, f"{source}: row {number}")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + answer_ids
        labels = ids if train_on_inputs else [IGNORE] * len(prompt_ids) + answer_ids
        if len(ids) > cutoff:
            truncated += 1
            ids, labels = ids[:cutoff], labels[:cutoff]
        examples.append(Example(list(ids), list(labels)))
    return examples, truncated


def batches(examples: list[Example], batch_size: int, seed: int, *, shuffle: bool = True
            ) -> Iterator[list[Example]]:
    """Endless epochs of micro-batches, reshuffled per epoch with a seeded RNG."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        if shuffle:
            rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def collate(groups: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the rows of several adapters' micro-batches into one batch."""
    rows = [e for group in groups for e in group]
    length = max(len(e.input_ids) for e in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(
            e.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
