"""Probes of what a language model cannot do (lesson 12), built at run time so they cannot leak
into any training set:

* `arithmetic_problems(op, digits, n)`: n-digit addition or multiplication with known answers.
* `haystack_prompt(...)`: a needle sentence hidden at a chosen depth of filler text (long context).

Replies are generated with `utils.generation.generate_batch`, read with `utils.answers`
(`is_abstention`, `mentions_any`, `answer_integer`, `agreement_rate`) and reported with their
Wilson intervals from `utils.stats`: with n = 20, a measured 50% means "somewhere between 30% and 70%".
"""

from __future__ import annotations

import random
import re

from utils.checks import check_choice, check_int, check_number, check_positive_int

# ----------------------------------------------------------------------------------------------
# Probes built at run time


def arithmetic_problems(op: str, digits: int, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n problems (a, b, answer) with two `digits`-digit operands; op is '+' or '*'. Shown in lesson 12.

    Example: arithmetic_problems("+", 2, 1) -> [(a, b, a + b)] with 10 <= a, b <= 99 (seeded).
    """
    check_choice("op", op, ("+", "*"))
    digits = check_int("digits", digits, low=1, high=30)
    n = check_positive_int("n", n)
    check_int("seed", seed)
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
    (0 = start, 1 = end) at a sentence boundary, followed by the question. Shown in lesson 12."""
    depth = check_number("depth", depth, low=0, high=1)
    context_tokens = check_positive_int("context_tokens", context_tokens)
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
