"""A tiny random Llama with its own offline tokenizer, and small synthetic tasks, for tests
and benchmarks that must not download anything."""

from __future__ import annotations

import json
import pathlib
import random

import torch

from mole_serve.adapter import BaseShape

VOCAB = 1000
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock",
         "star", "rain", "snow", "wind", "fire"]


def build_tokenizer():
    """A byte-level BPE with exactly VOCAB tokens, trained on a seeded synthetic corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(3000)] + WORDS
    corpus = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)


LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def build_sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (SentencePiece BPE: '▁' word starts, a '▁' prepended to the
    text, byte fallback) with Llama 2's chat template, trained on a seeded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = WORDS + ["Below", "is", "an", "instruction", "task", "Response", "Instruction",
                     "the", "A", "B", "capital", "Paris"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]
        + [f"<0x{i:02X}>" for i in range(256)]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>",
                                   chat_template=LLAMA2_CHAT_TEMPLATE)


# The shape `make_tiny_llama` builds with its defaults.
TINY_SHAPE = BaseShape(hidden=128, intermediate=256, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=32)


def make_tiny_llama(path: pathlib.Path, hidden: int = 128, intermediate: int = 256,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2) -> pathlib.Path:
    """A random fp32 Llama (head_dim 32, as vLLM's CPU attention needs) plus tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


def task_rows(task: str, count: int, seed: int) -> list[dict]:
    """Alpaca rows of a toy task: 'reverse' word order or 'upper'-case the words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
        text = " ".join(words)
        output = " ".join(reversed(words)) if task == "reverse" else text.upper()
        rows.append({"instruction": f"{task}: {text}", "output": output})
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
