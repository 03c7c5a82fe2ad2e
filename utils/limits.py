"""Measuring what a language model cannot do (lesson 12): probes, scorers and error bars.

* `generate_batch(model, tokenizer, prompts, ...)`: many chat prompts at once (left padding),
  greedy or sampled: the workhorse of every measurement.
* Scorers: `is_abstention` (did the model say it does not know?), `first_integer`,
  `answer_integer`, `mentions_any`, `normalize_answer`, `agreement_rate`.
* Probes built at run time: `arithmetic_problems` (n-digit addition/multiplication) and
  `haystack_prompt` (a needle sentence hidden at a chosen depth of filler text).
* `wilson_interval(k, n)`: the 95% confidence interval of a rate measured on n examples. With
  n = 20, a measured 50% means "somewhere between 30% and 70%": report it.
"""

from __future__ import annotations

import itertools
import random
import re

import torch

from utils.prompting import wilson_interval  # noqa: F401  (lesson 07's; re-exported for lesson 12)

# Phrases by which a model declines to answer. Matching is on lower-cased text with straight quotes.
ABSTAIN_PHRASES = (
    "i don't know", "i do not know", "don't have information", "do not have information",
    "don't have any information", "do not have any information", "no information", "not aware of",
    "i'm not aware", "i am not aware", "not familiar with", "i'm not familiar", "couldn't find",
    "could not find", "cannot find", "can't find", "unable to find", "no record", "no known",
    "doesn't exist", "does not exist", "may not exist", "i'm not sure", "i am not sure",
    "not able to provide", "unable to provide", "cannot provide", "can't provide", "i don't have",
    "i do not have", "not enough information", "no reliable information", "unknown to me",
    "don't have access", "do not have access", "cannot answer", "can't answer", "not mentioned",
    "does not mention", "doesn't mention", "not provided", "does not say", "doesn't say",
    "is unknown", "are unknown", "not specified", "not known",
)


def rate_with_ci(flags) -> str:
    """'45% [26%, 66%] (9/20)' for a list of booleans."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.0%} [{lo:.0%}, {hi:.0%}] ({k}/{n})"


# ----------------------------------------------------------------------------------------------
# Generation, batched


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """The chat-template text of one user turn (plus an optional system prompt), ready to generate."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                   system: str | None = None, chat: bool = True, batch_size: int = 16,
                   seed: int | None = None) -> list[str]:
    """Generate a reply for every prompt, `batch_size` prompts per forward pass (left-padded).

    chat=True wraps each prompt in the chat template (with `system`); chat=False continues the raw
    text. temperature=0 is greedy; otherwise sampling, reproducible when `seed` is given.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    texts = [chat_prompt(tokenizer, p, system) if chat else p for p in prompts]
    if seed is not None:
        _ = torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens go on the right
    replies = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0} if temperature > 0 \
                else {"do_sample": False}
            out = model.generate(**batch, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
            new = out[:, batch["input_ids"].shape[1]:]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return replies


# ----------------------------------------------------------------------------------------------
# Scorers


def _plain(text: str) -> str:
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


def is_abstention(text: str) -> bool:
    """Does the reply decline or say it does not know (any phrase of ABSTAIN_PHRASES)?"""
    plain = _plain(text)
    return any(phrase in plain for phrase in ABSTAIN_PHRASES)


def mentions_any(text: str, aliases) -> bool:
    """Case-insensitive: does the text contain any of the accepted answers?"""
    plain = _plain(text)
    return any(_plain(a) in plain for a in aliases)


def first_integer(text: str) -> int | None:
    """The first integer in the text (commas between digit groups allowed), or None."""
    match = re.search(r"-?\d[\d,]*", text)
    if not match:
        return None
    digits = match.group().rstrip(",").replace(",", "")
    return int(digits) if digits.lstrip("-") else None


def answer_integer(text: str) -> int | None:
    """The number a reply gives as its answer: the first integer after the last '=' if there is one
    ("17 + 25 = 42" -> 42, not the echoed 17), else the first integer in the reply."""
    if "=" in text:
        after = first_integer(text.rsplit("=", 1)[1])
        if after is not None:
            return after
    return first_integer(text)


def normalize_answer(text: str, max_words: int = 8) -> str:
    """Lower-case, first line, no punctuation, at most max_words words: to compare short answers."""
    line = _plain(text).strip().split("\n")[0]
    words = re.sub(r"[^\w\s]", " ", line).split()
    return " ".join(words[:max_words])


def agreement_rate(answers: list[str]) -> float:
    """The fraction of pairs of answers that are equal (1.0: every sample said the same thing)."""
    if len(answers) < 2:
        raise ValueError("need at least two answers to measure agreement")
    pairs = list(itertools.combinations(answers, 2))
    return sum(a == b for a, b in pairs) / len(pairs)


# ----------------------------------------------------------------------------------------------
# Probes built at run time


def arithmetic_problems(op: str, digits: int, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n problems (a, b, answer) with two `digits`-digit operands; op is '+' or '*'."""
    if op not in ("+", "*"):
        raise ValueError(f"op must be '+' or '*', got {op!r}")
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(f"{op}{digits}-{seed}")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    problems = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        problems.append((a, b, a + b if op == "+" else a * b))
    return problems


def haystack_prompt(tokenizer, filler_ids: list[int], needle: str, question: str, context_tokens: int,
                    depth: float) -> str:
    """A long-context probe: `context_tokens` tokens of filler with `needle` inserted at `depth`
    (0 = start, 1 = end) at a sentence boundary, followed by the question."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle_len = len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
    budget = context_tokens - needle_len
    if budget < 1 or budget > len(filler_ids):
        raise ValueError(f"context_tokens={context_tokens} does not fit: needle {needle_len} tokens, "
                         f"filler {len(filler_ids)} tokens")
    filler = tokenizer.decode(filler_ids[:budget])
    cut = int(depth * len(filler))
    if 0 < cut < len(filler):  # move the cut to the end of a sentence (or line) near it
        ends = [m.end() for m in re.finditer(r"[.!?;]\s|\n", filler)]
        cut = min(ends, key=lambda e: abs(e - cut)) if ends else cut
    document = filler[:cut].rstrip() + " " + needle + " " + filler[cut:].lstrip()
    return f"{document.strip()}\n\nQuestion: {question}"
