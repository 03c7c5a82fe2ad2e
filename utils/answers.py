"""Reading what a model replied: the scorers every measurement in the course uses.

Shown in lesson 07 (JSON, numbers), used by 08, 09 (correct / abstained), 12 (integers, agreement) and 14.

A score is only as good as the parser under it: lesson 07 found "accuracy 0.00" from a case-sensitive
exact match where a normalised match gave 0.69. So each scorer here says exactly what it accepts:

* `normalize_text`: lower case, straight quotes, plain hyphens, single spaces.
* `mentions_any(reply, aliases)`: the reply contains one of the accepted answers (after normalising),
  matched on word boundaries, so "4" is not found inside "14".
* `is_abstention(reply)`: the reply declines ("I don't know", "not mentioned in the passages", ...).
* `first_integer`, `answer_integer`, `find_numbers`: numbers in a reply.
* `normalize_answer`, `agreement_rate`: comparing short free-form answers with each other.
* `extract_json`, `check_shape`: structured output.
"""

from __future__ import annotations

import itertools
import json
import re

from utils.checks import check_int, check_text, check_text_list


def normalize_text(text: str) -> str:
    """Lower case, curly quotes straightened, non-breaking hyphens plain, runs of spaces as one.

    Example: "It\u2019s  Paris" -> "it's paris".
    """
    check_text("text", text, allow_empty=True)
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u2011", "-")
    return " ".join(text.split())


def mentions_any(reply: str, aliases) -> bool:
    """Does the reply contain any accepted answer (normalised, whole words)?

    Example: mentions_any("The answer is 42.", ["42", "forty-two"]) -> True; ("It is 142", ["42"]) -> False.
    aliases must be a list of strings with a letter or digit each (one string alone is refused: its
    letters would each match; so is "" or "." which would match almost anything).
    """
    aliases = check_text_list("aliases", aliases)
    for i, alias in enumerate(aliases):
        if not any(c.isalnum() for c in alias):  # "." or "-" alone would be found in almost any reply
            raise ValueError(f"aliases[{i}] must contain a letter or a digit, got {alias!r}")
    plain = normalize_text(check_text("reply", reply, allow_empty=True))
    for alias in aliases:
        pattern = re.escape(normalize_text(alias))
        # word boundaries only where the alias starts/ends with a word character ("c++" still matches)
        left = r"(?<!\w)" if re.match(r"\w", alias.strip()) else ""
        right = r"(?!\w)" if re.search(r"\w$", alias.strip()) else ""
        if re.search(left + pattern + right, plain):
            return True
    return False


# Phrases by which a model declines to answer, matched on normalize_text(reply).
ABSTAIN_PHRASES = (
    "i don't know", "i dont know", "i do not know", "don't have information", "do not have information",
    "don't have any information", "do not have any information", "no information", "not aware of",
    "i'm not aware", "i am not aware", "not familiar with", "i'm not familiar", "couldn't find",
    "could not find", "cannot find", "can't find", "unable to find", "no record", "no known",
    "doesn't exist", "does not exist", "may not exist", "i'm not sure", "i am not sure",
    "not able to provide", "unable to provide", "cannot provide", "can't provide", "i don't have",
    "i do not have", "not enough information", "no reliable information", "unknown to me",
    "don't have access", "do not have access", "cannot answer", "can't answer", "unable to answer",
    "not mentioned", "does not mention", "doesn't mention", "not provided", "does not say", "doesn't say",
    "is unknown", "are unknown", "not specified", "not known", "not stated", "not given",
    "not in the passage",
)


def is_abstention(reply: str) -> bool:
    """Does the reply decline or say it does not know (any phrase of ABSTAIN_PHRASES)?

    Example: is_abstention("That is not mentioned in the passages.") -> True.
    """
    plain = normalize_text(check_text("reply", reply, allow_empty=True))
    return any(phrase in plain for phrase in ABSTAIN_PHRASES)


def first_integer(text: str) -> int | None:
    """The first integer in the text (commas between digit groups allowed), or None.

    Example: "It costs 1,200 dollars" -> 1200.
    """
    check_text("text", text, allow_empty=True)
    match = re.search(r"-?\d[\d,]*", text)
    if not match:
        return None
    digits = match.group().rstrip(",").replace(",", "")
    return int(digits) if digits.lstrip("-") else None


def answer_integer(text: str) -> int | None:
    """The number a reply gives as its answer: the first integer after the last '=' if there is one,
    else the first integer in the reply. Example: "17 + 25 = 42" -> 42 (not the echoed 17)."""
    check_text("text", text, allow_empty=True)
    if "=" in text:
        after = first_integer(text.rsplit("=", 1)[1])
        if after is not None:
            return after
    return first_integer(text)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def find_numbers(text: str) -> list[float]:
    """All numbers in `text`, in order. Example: "1,200 apples and 3.5 pears" -> [1200.0, 3.5]."""
    check_text("text", text, allow_empty=True)
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text) if m.replace(",", "").strip("-")]


def normalize_answer(text: str, max_words: int = 8) -> str:
    """First line, lower case, no punctuation, at most max_words words: to compare short answers.

    Example: "Paris, of course!\\nMore text" -> "paris of course".
    """
    check_text("text", text, allow_empty=True)
    max_words = check_int("max_words", max_words, low=1)
    line = normalize_text(text.strip().split("\n")[0] if text.strip() else "")
    words = re.sub(r"[^\w\s]", " ", line).split()
    return " ".join(words[:max_words])


def agreement_rate(answers: list[str]) -> float:
    """The fraction of pairs of answers that are equal. Example: ["a", "a", "b"] -> 0.333 (1 of 3 pairs)."""
    answers = check_text_list("answers", answers, allow_empty_items=True)
    if len(answers) < 2:
        raise ValueError("need at least two answers to measure agreement")
    pairs = list(itertools.combinations(answers, 2))
    return sum(a == b for a, b in pairs) / len(pairs)


def extract_json(text: str):
    """The first JSON object in `text` (a reply may wrap it in prose or ``` fences), or None.

    Example: 'Sure! {"a": 1} done' -> {"a": 1}.
    """
    check_text("text", text, allow_empty=True)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def check_shape(obj, fields: dict) -> list[str]:
    """What is wrong with `obj` for the shape `fields` (name -> int, str or a list of allowed values);
    [] when it fits. Example: check_shape({"n": "2"}, {"n": int}) -> ["n should be an integer, got '2'"]."""
    if not isinstance(fields, dict) or not fields:
        raise TypeError(f"fields must be a non-empty dict of name -> int, str or a list of values, got {fields!r}")
    for name, kind in fields.items():
        if kind is not int and kind is not str and not isinstance(kind, (list, tuple)):
            # anything else ("int", float, a dict) would silently check nothing
            raise TypeError(f"fields[{name!r}] must be int, str or a list of allowed values, got {kind!r}")
    if not isinstance(obj, dict):
        return [f"not a JSON object: {obj!r}"]
    problems = [f"missing key {k!r}" for k in fields if k not in obj]
    problems += [f"unexpected key {k!r}" for k in obj if k not in fields]
    for name, kind in fields.items():
        if name not in obj:
            continue
        value = obj[name]
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            problems.append(f"{name} should be an integer, got {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"{name} should be a string, got {value!r}")
        elif isinstance(kind, (list, tuple)) and value not in kind:
            problems.append(f"{name} should be one of {list(kind)}, got {value!r}")
    return problems
