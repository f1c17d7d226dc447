"""The demo's embedded data: a small word list, the tokenizer built from it, the base model's
pre-training text and the two adapter tasks.

Everything is generated from WORDS with seeded RNGs, so a build is reproducible and the
repository carries a few hundred bytes of text instead of a dataset. The tokenizer is built
here rather than taken from tests/tiny_model.py: that one is trained on random letter strings,
so upper-case words fall apart into byte tokens, and the demo wants every word, in both cases,
to be one token (upper-casing is then a token-to-token map a small adapter can learn).
"""

from __future__ import annotations

import random
from typing import Callable

WORDS = ("red", "blue", "green", "gold", "pink", "gray", "cat", "dog", "fox", "owl", "bee",
         "cow", "sun", "moon", "star", "rain", "snow", "wind", "fire", "sea", "tree", "leaf",
         "rock", "hill", "lake", "road", "ship", "boat", "bell", "lamp", "book", "door",
         "cake", "milk", "salt", "rice", "king", "frog", "bird", "fish")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

TASKS: dict[str, Callable[[list[str]], str]] = {
    "reverse": lambda words: " ".join(reversed(words)),
    "upper": lambda words: " ".join(words).upper(),
}


# A fixed length lets a 2-layer model learn to copy in a few hundred steps; variable lengths
# need induction heads, which took 10x longer to form.
WORDS_PER_PROMPT = 3


def prompt_words(rng: random.Random) -> list[str]:
    """Distinct words: the input of every task."""
    return rng.sample(WORDS, WORDS_PER_PROMPT)


def chat_text(user: str, assistant: str) -> str:
    """What CHAT_TEMPLATE renders for one exchange."""
    return f"user: {user}\nassistant: {assistant}\n"


def pretraining_texts(count: int, seed: int) -> list[str]:
    """Chats whose answer echoes the word list, in lower or upper case, or reverses it when
    the user adds "backwards".

    This gives the base what a real LLM brings to fine-tuning: the prompt format, the
    vocabulary in both cases and circuits that copy words from the prompt, in order or
    backwards on request. Bare word lists are echoed; the adapters learn to reverse them
    unasked, or to upper-case them, which the base never saw done.
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = prompt_words(rng)
        if rng.random() < 0.5:
            words = [w.upper() for w in words]
        line = " ".join(words)
        if rng.random() < 0.4:
            texts.append(chat_text(f"{line} backwards", TASKS["reverse"](words)))
        else:
            texts.append(chat_text(line, line))
    return texts


def task_rows(task: str, count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Chat rows of `task` whose user turn is the bare word list (the adapter is the
    instruction), skipping the word lists in `exclude` (held-out prompts)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        words = prompt_words(rng)
        if " ".join(words) not in exclude:
            rows.append({"messages": [{"role": "user", "content": " ".join(words)},
                                      {"role": "assistant", "content": TASKS[task](words)}]})
    return rows


def held_out_prompts(count: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(prompt_words(rng)) for _ in range(count)]


def build_tokenizer():
    """A byte-level BPE over the pre-training text in which each word (both cases, with and
    without a leading space) is a single token; raises if one is not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = pretraining_texts(4000, seed=0)
    corpus += [word for word in WORDS + tuple(w.upper() for w in WORDS)] * 2  # line starts
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                      chat_template=CHAT_TEMPLATE)
    for word in WORDS + tuple(w.upper() for w in WORDS):
        for text in (word, " " + word):
            ids = wrapped(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise RuntimeError(f"demo tokenizer: {text!r} is {len(ids)} tokens, not 1")
    return wrapped
