"""utils.bm25: the hand-written BM25 against the pinned library (rank-bm25 0.2.2, BM25Okapi).

The two differ in exactly two documented ways (utils/bm25.py's docstring), and in nothing else:
  1. idf: ours is Lucene's log(1 + (N - n + 0.5) / (n + 0.5)); BM25Okapi's is log((N - n + 0.5) / (n + 0.5)),
     with negative values (terms in more than half the texts) replaced by epsilon * (mean idf);
  2. a query term repeated in the query counts once for us, once per occurrence for BM25Okapi.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from utils.bm25 import BM25, bm25_tokens
from utils.chunking import split_sections
from utils.data import load_jsonl, load_text


@pytest.fixture(scope="module")
def handbook():
    """Course text: the 15 sections of lesson 09's handbook, and its first 20 questions."""
    texts = [f"{heading}\n{body}" for heading, body in split_sections(load_text("09_handbook.md"))]
    questions = [q["question"] for q in load_jsonl("09_handbook_questions.jsonl")][:20]
    return texts, questions


def test_scores_are_rank_bm25s_once_the_idf_is_the_same(handbook):
    texts, questions = handbook
    ours = BM25(texts, k1=1.5, b=0.75)
    library = BM25Okapi([bm25_tokens(t) for t in texts], k1=1.5, b=0.75)
    assert library.avgdl == pytest.approx(float(ours.lengths.mean()))
    library.idf = dict(ours.idf)  # difference 1 removed: the library now uses Lucene's idf too
    for question in questions:
        terms = list(dict.fromkeys(bm25_tokens(question)))  # difference 2 removed: each term once
        expected = library.get_scores(terms)
        assert expected.max() > 0, question  # the question shares words with the handbook
        np.testing.assert_allclose(ours.scores(question), expected, rtol=1e-5, atol=1e-6)


def test_the_idf_difference_exactly(handbook):
    texts, _ = handbook
    ours = BM25(texts)
    library = BM25Okapi([bm25_tokens(t) for t in texts])  # k1=1.5, b=0.75, epsilon=0.25: both defaults
    n_docs = len(texts)
    floored = 0
    for term, (ids, _) in ours.postings.items():
        okapi = math.log((n_docs - len(ids) + 0.5) / (len(ids) + 0.5))
        assert ours.idf[term] == pytest.approx(math.log1p(math.exp(okapi)))  # log(1 + x) vs log(x)
        if okapi < 0:  # in more than half the texts: the library floors it
            assert library.idf[term] == pytest.approx(library.epsilon * library.average_idf)
            floored += 1
        else:
            assert library.idf[term] == pytest.approx(okapi)
        assert ours.idf[term] > 0  # Lucene's form never needs a floor
    assert floored > 0, "the handbook has terms in more than half its sections: the floor is exercised"


def test_a_repeated_query_term_counts_once_here_and_twice_in_the_library():
    texts = ["the cat sat on the mat", "a dog barked", "cats and dogs", "nothing here"]
    ours = BM25(texts)
    library = BM25Okapi([bm25_tokens(t) for t in texts])
    np.testing.assert_array_equal(ours.scores("cat cat"), ours.scores("cat"))
    np.testing.assert_allclose(library.get_scores(["cat", "cat"]), 2 * library.get_scores(["cat"]))


def test_bm25_prefers_rare_terms_short_texts_and_saturates_repeats():
    bm25 = BM25(["cat mat", "cat sat mat hat door rug", "cat cat mat hat door rug", "dog", "dog rug"])
    scores = bm25.scores("cat")
    assert scores[3] == 0 and scores[4] == 0
    assert scores[0] > scores[1] > 0  # the same one "cat" in 2 tokens beats it in 6: length normalisation
    assert scores[1] < scores[2] < 2 * scores[1]  # a second "cat" adds, but less than the first (k1)
    assert bm25.idf["dog"] > bm25.idf["cat"]  # in two texts vs in three: the rarer term weighs more
    assert bm25.scores("zebra").tolist() == [0] * 5


def test_tokens_keep_operators_and_dunder_names_and_drop_stop_words():
    assert bm25_tokens("How does len() call __len__?") == ["len", "call", "__len__"]
    assert bm25_tokens("What is x << 3 equivalent to?") == ["x", "<<", "3", "equivalent"]


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        BM25("one text, not a list")
    with pytest.raises(ValueError, match="texts must be a non-empty list"):
        BM25([])
    with pytest.raises(ValueError, match="b must be in"):
        BM25(["a b"], b=1.5)
    with pytest.raises(ValueError, match="k1 must be in"):
        BM25(["a b"], k1=-1)
    with pytest.raises(TypeError, match="text must be a str"):
        BM25(["a b"]).scores(None)
