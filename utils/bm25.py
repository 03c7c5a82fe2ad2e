"""BM25 (lesson 09): the classic keyword ranking, written out, for the retriever's hybrid mode.

A chunk scores high for a query when it contains the query's words, more so when those words are
rare in the collection (idf) and when the chunk is short (a match in 40 words says more than a
match in 400). For every distinct query term t and a document d of len(d) tokens:

    score(q, d) = sum_t  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * len(d) / avg_len))

    tf(t, d)  how often t occurs in d; the fraction saturates: the 10th occurrence adds little (k1)
    b         how much a long document is penalised (0: not at all, 1: fully by its length)
    idf(t)    log(1 + (N - n_t + 0.5) / (n_t + 0.5)), N documents of which n_t contain t

The idf is Lucene's form, always positive. The `rank_bm25` library (BM25Okapi) uses
log((N - n_t + 0.5) / (n_t + 0.5)), which is negative for a term in more than half the documents,
and replaces those negative values by epsilon * (the mean idf over the vocabulary); it also counts
a query term twice if the query repeats it. tests/test_bm25.py checks that everything else gives
the library's scores exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from .checks import check_number, check_text, check_text_list

_TOKEN = re.compile(r"[a-z0-9_]+|[<>=!/*@%&|^~]+")  # words, and operators such as << // ** @ ==
_STOPWORDS = frozenset(
    "a an the is are was were be been do does did i my me you your it its of to in on at for with "
    "and or but if how what which who whom when where why can could should would will shall may "
    "this that these those there here as by from so than then into about".split())


def bm25_tokens(text: str) -> list[str]:
    """Lower-case word and operator tokens (`__len__`, `<<` and `//` are one token each), minus
    stop words. Shown in lesson 09.

    Example: bm25_tokens("How does len() call __len__?") -> ['len', 'call', '__len__']
    """
    return [t for t in _TOKEN.findall(check_text("text", text, allow_empty=True).lower()) if t not in _STOPWORDS]


class BM25:
    """Okapi BM25 over a list of texts (the formula in this module's docstring). Shown in lesson 09.

    bm25 = BM25(chunks); bm25.scores("nonlocal variable") -> one score per chunk, shape (n,)
    """

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        texts = check_text_list("texts", texts, allow_empty_items=True)
        self.k1 = check_number("k1", k1, low=0)
        self.b = check_number("b", b, low=0, high=1)
        docs = [Counter(bm25_tokens(t)) for t in texts]  # term -> tf, one Counter per text
        self.n = len(docs)
        self.lengths = np.array([sum(d.values()) for d in docs], dtype=np.float32)  # (n,) tokens per text
        avg_len = max(float(self.lengths.mean()), 1.0)  # >= 1: a corpus of empty texts divides by 1, not 0
        self.norm = self.k1 * (1 - self.b + self.b * self.lengths / avg_len)  # (n,) the length part of the denominator
        # an inverted index: term -> (ids of the texts that contain it, its tf in each), so a query
        # only touches the texts that share a word with it
        postings: dict[str, list[tuple[int, int]]] = {}
        for i, d in enumerate(docs):
            for term, tf in d.items():
                postings.setdefault(term, []).append((i, tf))
        self.postings = {t: (np.array([i for i, _ in p]), np.array([tf for _, tf in p], dtype=np.float32))
                         for t, p in postings.items()}
        self.idf = {t: math.log(1 + (self.n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in postings.items()}

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every text for `query`, shape (n,); 0 for a text sharing no term with it."""
        scores = np.zeros(self.n, dtype=np.float32)
        for term in set(bm25_tokens(query)):  # each distinct query term counts once
            if term in self.postings:
                ids, tf = self.postings[term]  # (m,) each: the m texts containing the term
                scores[ids] += self.idf[term] * tf * (self.k1 + 1) / (tf + self.norm[ids])
        return scores
