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


TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("test", "validation")


def load_records(path: str | pathlib.Path, splits: tuple[str, ...] = TRAIN_SPLITS
                 ) -> list[dict[str, Any]]:
    """Rows of a .json (list), .jsonl file or a `datasets.save_to_disk` dir; of a dir with
    several splits, the first of `splits` it has (training data: "train"; evaluation data:
    "test", else "validation", never the training split)."""
    path = pathlib.Path(path)
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a dataset dir needs the `datasets` package") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            found = [split for split in splits if split in loaded] or (
                list(loaded) if len(loaded) == 1 else [])
            if not found:
                raise DataError(f"{path}: a dataset with splits {list(loaded)} and none of "
                                f"{list(splits)}: save the split to use on its own")
            loaded = loaded[found[0]]
        rows = [dict(r) for r in loaded]
    elif not path.is_file():
        raise DataError(f"{path}: no such file")
    elif path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON ({exc})") from None
    else:
        text = path.read_text()
        if not text.strip():
            raise DataError(f"{path}: empty file (no rows)")
        try:
            rows = json.loads(text)
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
    if row.get("messages") is not None:  # (a datasets dir gives other rows messages=None)
        messages = row["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) for m in messages)
                or messages[-1].get("role") != "assistant"):
            raise DataError(f"{where}: 'messages' must be a list of objects ending with an "
                            "assistant turn")
        for number, message in enumerate(messages, start=1):
            content = message.get("content")  # parts lists are the template's to render
            if not isinstance(message.get("role"), str) or not (
                    isinstance(content, (str, list)) or message.get("tool_calls")):
                raise DataError(f"{where}: message {number}: needs a text 'role' and a "
                                "'content' (text or a list of parts; none only beside "
                                f"'tool_calls'), found {message!r:.80}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: chat rows need a tokenizer with a chat template")
        from jinja2 import TemplateError
        try:
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                                   add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError as exc:  # a template's raise_exception, e.g. an unknown role
            raise DataError(f"{where}: the tokenizer's chat template refuses the messages: "
                            f"{exc}") from None
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template renders the prompt differently "
                            "inside the full conversation")
        return prompt, full[len(prompt):]
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (alpaca rows need "
                        "'instruction' and 'output'; chat rows need 'messages')")
    untyped = [k for k in ("instruction", "input", "output")  # a null input: none
               if not isinstance(row.get(k, ""), str) and (k, row[k]) != ("input", None)]
    if untyped:
        raise DataError(f"{where}: field(s) {untyped} must be text, found "
                        f"{[row[k] for k in untyped]!r:.80}")
    template = ALPACA_WITH_INPUT if row.get("input") else ALPACA
    return template.format(instruction=row["instruction"], input=row.get("input", "")), \
        row["output"]


def with_answer(row: dict[str, Any], answer: str) -> dict[str, Any]:
    """A multiple-choice row as a training row answered `answer`: alpaca fields with that
    `output`, or chat `messages` up to the question (a trailing assistant turn is left out)
    and an assistant turn saying it."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        asked = messages[:-1] if messages[-1].get("role") == "assistant" else messages
        return dict(row, messages=asked + [{"role": "assistant", "content": answer}])
    return dict(row, output=answer) if isinstance(row, dict) else row


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's BOS, unless the text (a chat template's rendering)
    already starts with it: one BOS either way."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos))
                     )["input_ids"]


def encode_answer(tokenizer, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """The answer's ids as the model generates them after the prompt's ids (the prompt alone
    is what vLLM tokenizes). Not the answer tokenized alone: a SentencePiece tokenizer (Llama
    2, Mistral) starts it with a word-start '▁' that no continuation has. The joint text's ids
    where the prompt's are their prefix; where the two merge at the seam, the answer's ids
    after a newline (that a byte-level BPE keeps apart), or else alone."""
    joint = encode_prompt(tokenizer, prompt + answer)
    if joint[:len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    anchored = tokenizer("\n" + answer, add_special_tokens=False)["input_ids"]
    if anchored[:len(newline)] == newline:
        return anchored[len(newline):]
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


@dataclass
class Tokenized:
    examples: list[Example]
    truncated: int   # rows cut to `cutoff` that still keep answer tokens
    dropped: int     # rows left with no answer token (the prompt fills `cutoff`, or the
                     # answer is empty): nothing to learn, and a NaN loss in a batch of them


def tokenize(rows: list[dict[str, Any]], tokenizer, *, cutoff: int, train_on_inputs: bool,
             add_eos: bool, source: str) -> Tokenized:
    """Token ids and labels per row, cut to `cutoff` tokens."""
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token: give one of its tokens, e.g. its eos "
                        f"token (--pad-token {tokenizer.eos_token!r})")
    result = Tokenized([], 0, 0)
    eos = tokenizer.eos_token_id
    for number, row in enumerate(rows, start=1):
        prompt, answer = prompt_and_answer(row, tokenizer, f"{source}: row {number}")
        prompt_ids = encode_prompt(tokenizer, prompt)
        answer_ids = encode_answer(tokenizer, prompt, prompt_ids, answer)
        if add_eos and eos is not None and eos not in answer_ids:  # a template wrote it
            answer_ids = answer_ids + [eos]
        ids = prompt_ids + answer_ids
        labels = ids if train_on_inputs else [IGNORE] * len(prompt_ids) + answer_ids
        cut = len(ids) > cutoff
        ids, labels = ids[:cutoff], labels[:cutoff]
        if all(label == IGNORE for label in labels[1:]):  # the loss reads labels[1:]
            result.dropped += 1
            continue
        result.truncated += cut
        result.examples.append(Example(list(ids), list(labels)))
    if not result.examples:
        raise DataError(f"{source}: no row keeps an answer token within cutoff_len={cutoff} "
                        "(every prompt fills it or every answer is empty)")
    return result


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
