"""Retrieval metrics (lesson 09): hit@k, MRR and a one-call evaluation of a retriever.

A retriever is good when the passage that answers a question comes back near the top:

    hit_at_k   did any gold source appear in the first k results?  (averaged over questions)
    mrr        1 / rank of the first gold source, 0 if it is missing  (averaged over questions)

    evaluate_retrieval(retriever, [{"question": "...", "source": "gold-name"}], k=5)
        -> {"hit@1": ..., "hit@5": ..., "mrr": ..., "ms_per_query": ...}
"""

from __future__ import annotations

import time

from .checks import check_positive_int, check_text, check_text_list


def _gold_set(question, i: int) -> set[str]:
    """The gold sources of one labelled question: {"question": ..., "source": "a"} or "sources": [...]."""
    if not isinstance(question, dict):
        raise TypeError(f"questions[{i}] must be a dict with 'question' and 'source' (or 'sources'), "
                        f"got {type(question).__name__}")
    check_text(f"questions[{i}]['question']", question.get("question"))
    gold = question.get("sources", question.get("source"))
    if isinstance(gold, str):
        gold = [gold]
    return set(check_text_list(f"questions[{i}]['source(s)'] (its gold source names)", gold))


def _check_rankings(ranked_sources, gold) -> tuple[list[list[str]], list[set[str]]]:
    """One ranking (a list of source names) and one non-empty set of gold names per question."""
    for name, rows in (("ranked_sources", ranked_sources), ("gold", gold)):
        if not isinstance(rows, (list, tuple)):
            raise TypeError(f"{name} must be a list with one entry per question, got {type(rows).__name__}")
    if len(ranked_sources) != len(gold) or not gold:
        raise ValueError("need one ranking per question, and at least one question")
    rankings, gold_sets = [], []
    for i, (ranking, names) in enumerate(zip(ranked_sources, gold)):
        # a str would be read letter by letter: "leave"[:1] == "l"
        if not isinstance(ranking, (list, tuple)):
            raise TypeError(f"ranked_sources[{i}] must be a list of source names, got {type(ranking).__name__}")
        rankings.append(check_text_list(f"ranked_sources[{i}]", ranking, allow_empty_items=True)
                        if ranking else [])
        if not isinstance(names, (set, frozenset, list, tuple)):
            raise TypeError(f"gold[{i}] must be a set of source names, got {type(names).__name__}")
        gold_sets.append(set(check_text_list(f"gold[{i}]", list(names), allow_empty_items=True)))
    return rankings, gold_sets


def hit_at_k(ranked_sources: list[list[str]], gold: list[set[str]], k: int) -> float:
    """Fraction of questions with at least one gold source among the first k retrieved.

    Example: hit_at_k([["a", "b"], ["c", "a"]], [{"a"}, {"a"}], 1) -> 0.5
    """
    k = check_positive_int("k", k)
    ranked_sources, gold = _check_rankings(ranked_sources, gold)
    return sum(bool(set(r[:k]) & g) for r, g in zip(ranked_sources, gold)) / len(gold)


def mrr(ranked_sources: list[list[str]], gold: list[set[str]], k: int = 10) -> float:
    """Mean reciprocal rank: 1/rank of the first gold source (0 if none in the first k).

    Example: mrr([["a", "b"], ["c", "a"]], [{"a"}, {"a"}]) -> 0.75  (1/1 and 1/2)
    """
    k = check_positive_int("k", k)
    ranked_sources, gold = _check_rankings(ranked_sources, gold)
    total = 0.0
    for ranking, g in zip(ranked_sources, gold):
        for rank, source in enumerate(ranking[:k], 1):
            if source in g:
                total += 1 / rank
                break
    return total / len(gold)


def evaluate_retrieval(retriever, questions: list[dict], k: int = 5) -> dict[str, float]:
    """hit@1, hit@k, MRR@10 and milliseconds per query (one query at a time, as a service sees them).

    `retriever` is a utils.rag.Retriever (anything with .retrieve(query, k) -> hits with .source).
    Each question is a dict with "question" and its gold "source" (or a list of "sources").
    Shown in lesson 09."""
    k = check_positive_int("k", k)
    if not isinstance(questions, (list, tuple)):
        raise TypeError(f"questions must be a list of {{'question': ..., 'source': ...}} dicts, "
                        f"got {type(questions).__name__}")
    if not questions:
        raise ValueError("questions must be a non-empty list of {'question': ..., 'source': ...} dicts")
    if not callable(getattr(retriever, "retrieve", None)):
        raise TypeError(f"retriever must be a Retriever (something with .retrieve), got {type(retriever).__name__}")
    gold = [_gold_set(q, i) for i, q in enumerate(questions)]
    ranked, start = [], time.perf_counter()
    for q in questions:
        ranked.append([h.source for h in retriever.retrieve(q["question"], k=max(k, 10))])
    ms = (time.perf_counter() - start) * 1000 / len(questions)
    return {"hit@1": hit_at_k(ranked, gold, 1), f"hit@{k}": hit_at_k(ranked, gold, k),
            "mrr": mrr(ranked, gold, 10), "ms_per_query": ms}
