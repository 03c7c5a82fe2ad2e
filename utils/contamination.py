"""Test-set contamination: did the model see the test items while it was trained? Shown in lesson 15.

A model that was trained on a benchmark's test items scores well on them without being any better:
it remembers. Lesson 15 shows it by fine-tuning on half of a test set (that half's score jumps, the
other half's does not), then detects it the way model reports do: by **n-gram overlap** between the
training text and each test item.

* Split text into words (lower case, punctuation dropped): "What is 2 + 2?" -> what is 2 2.
* Collect every run of n consecutive words (an n-gram) of the training text into a set.
* A test item's overlap is the fraction of its own n-grams found in that set: 1.0 means every n-word
  run of the item appears somewhere in training.

The choice of n is a trade-off. Small n (3) finds common phrases ("what is the") everywhere: false
alarms. Large n (GPT-3 used 13 words) misses short items and lightly edited copies. Items shorter
than n words have no n-gram; they count as seen when all their words occur, in order and adjacent,
in one training text. A paraphrase of a test item shares few n-grams and is not found at all: overlap
finds copies, not leaked knowledge.
"""

from __future__ import annotations

import re

from utils.answers import normalize_text
from utils.checks import check_number, check_positive_int, check_text_list


def words(text: str) -> list[str]:
    """Lower-cased words of a text, punctuation dropped. Example: "It's 2 + 2, right?" -> ["it", "s", "2", "2", "right"]."""
    return re.findall(r"\w+", normalize_text(text))


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Every run of n consecutive words. Example: ("The cat sat down", 3) -> {("the", "cat", "sat"), ("cat", "sat", "down")}."""
    n = check_positive_int("n", n)
    tokens = words(text)
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def overlap_scores(test_texts, train_texts, n: int = 8) -> list[float]:
    """For each test text, the fraction of its word n-grams that occur in the training texts (0 to 1).

    Example: overlap_scores(["the cat sat on the mat"], ["we saw the cat sat on the mat today"], n=3) -> [1.0].
    A test text shorter than n words scores 1.0 if all its words occur adjacent in one training text, else 0.0.
    """
    test_texts = check_text_list("test_texts", test_texts)
    train_texts = check_text_list("train_texts", train_texts)
    n = check_positive_int("n", n)
    seen = set()  # every n-gram of the training data
    for text in train_texts:
        seen |= word_ngrams(text, n)
    padded_train = [f" {' '.join(words(text))} " for text in train_texts]  # for items shorter than n words
    scores = []
    for text in test_texts:
        grams = word_ngrams(text, n)
        if grams:
            scores.append(sum(gram in seen for gram in grams) / len(grams))
        else:  # too short for one n-gram: is the whole text a run of words in some training text?
            needle = f" {' '.join(words(text))} "
            scores.append(float(needle.strip() != "" and any(needle in train for train in padded_train)))
    return scores


def flag_contaminated(test_texts, train_texts, n: int = 8, threshold: float = 0.5) -> list[bool]:
    """True for each test text whose n-gram overlap with the training texts is at least `threshold`.

    Example: flag_contaminated(["the cat sat on the mat"], ["the cat sat on the mat"], n=3) -> [True].
    """
    threshold = check_number("threshold", threshold, low=0, high=1, low_open=True)
    return [score >= threshold for score in overlap_scores(test_texts, train_texts, n)]
