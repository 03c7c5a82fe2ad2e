"""utils.rag refuses bad input with TypeError/ValueError instead of a silently wrong result (issue 16).

Each case was accepted before, or failed with an unrelated error deep inside numpy/faiss/Python."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.test_rag import DOCS, HashEmbedder
from utils import rag, retrieval_metrics
from utils.rag import Hit, Retriever, build_retriever

HIT = Hit("Employees get 27 days.", "leave", 0.7)
UNIT = np.eye(3, dtype=np.float32)  # three unit vectors


@pytest.fixture(scope="module")
def kb():
    return build_retriever(DOCS, embedder=HashEmbedder(), cache=False, hybrid=False)


class NoModel:
    def __call__(self, *args, **kwargs):
        raise AssertionError("the model was called")


BAD_CALLS = [
    # Hit
    ("Hit score NaN", lambda kb: Hit("t", "s", math.nan), ValueError, "score must be a finite number"),
    ("Hit score str", lambda kb: Hit("t", "s", "0.5"), TypeError, "score must be a number"),
    ("Hit text None", lambda kb: Hit(None, "s", 0.5), TypeError, "text must be a str"),
    # make_faiss_index / Retriever
    ("index of a list", lambda kb: rag.make_faiss_index([[1.0, 0.0]]), TypeError, "numpy array"),
    ("index of NaN", lambda kb: rag.make_faiss_index(np.full((2, 3), np.nan, np.float32)), ValueError, "NaN"),
    ("index of 1-D", lambda kb: rag.make_faiss_index(np.ones(3, np.float32)), ValueError, "shape"),
    ("not unit vectors", lambda kb: Retriever(["a", "b", "c"], ["s"] * 3, UNIT * 3, None), ValueError,
     "length 1"),
    ("chunks a str", lambda kb: Retriever("abc", ["s"] * 3, UNIT, None), TypeError, "chunks must be a list"),
    ("chunk None", lambda kb: Retriever(["a", None, "c"], ["s"] * 3, UNIT, None), TypeError,
     r"chunks\[1\] must be a str"),
    ("hybrid a str", lambda kb: Retriever(["a", "b", "c"], ["s"] * 3, UNIT, None, hybrid="no"), TypeError,
     "hybrid must be True or False"),
    ("embeddings of str", lambda kb: Retriever(["a", "b", "c"], ["s"] * 3, np.array([["x"]] * 3), None),
     TypeError, "numpy array of numbers"),
    # Retriever.search_vector / retrieve / retrieve_many
    ("NaN query vector", lambda kb: kb.search_vector(np.full(kb.dim, np.nan, np.float32)), ValueError, "NaN"),
    ("list query vector", lambda kb: kb.search_vector([0.0] * kb.dim), TypeError, "numpy array"),
    ("k a float", lambda kb: kb.retrieve("leave", k=2.0), TypeError, "k must be an int"),
    ("k a bool", lambda kb: kb.retrieve("leave", k=True), TypeError, "k must be an int"),
    ("k zero", lambda kb: kb.retrieve_many(["leave"], k=0), ValueError, "k must be a positive int"),
    ("queries a str", lambda kb: kb.retrieve_many("leave", k=1), TypeError, "queries must be a list"),
    ("query empty", lambda kb: kb.retrieve("  "), ValueError, "query must be a non-empty string"),
    ("query not str", lambda kb: kb.search_vector(kb.embed_query("leave"), query=5), TypeError,
     "query must be a str"),
    # chunk_corpus / build_retriever
    ("chunk_size 0 on empty docs", lambda kb: rag.chunk_corpus({}, "fixed", 0, 0), ValueError,
     "chunk_size must be a positive int"),
    ("overlap >= size", lambda kb: rag.chunk_corpus({"a": "b"}, "fixed", 10, 10), ValueError,
     "overlap must be smaller"),
    ("chunk_size a float", lambda kb: rag.chunk_corpus({"a": "b"}, "fixed", 10.5, 0), TypeError,
     "chunk_size must be an int"),
    ("unknown chunking", lambda kb: rag.chunk_corpus({}, "words"), ValueError, "chunking must be one of"),
    ("docs a list", lambda kb: rag.chunk_corpus(["text"]), TypeError, "docs must be a dict"),
    ("cache a str", lambda kb: build_retriever(DOCS, HashEmbedder(), cache="yes"), TypeError,
     "cache must be True or False"),
    # metrics
    ("ranking a str", lambda kb: retrieval_metrics.hit_at_k(["leave"], [{"leave"}], 1), TypeError,
     r"ranked_sources\[0\] must be a list"),
    ("gold a str", lambda kb: retrieval_metrics.mrr([["leave"]], ["leave"]), TypeError, r"gold\[0\] must be a set"),
    ("gold empty", lambda kb: retrieval_metrics.hit_at_k([["leave"]], [set()], 1), ValueError, r"gold\[0\] must be a non-empty"),
    ("k NaN", lambda kb: retrieval_metrics.mrr([["a"]], [{"a"}], k=math.nan), TypeError, "k must be an int"),
    ("question without gold", lambda kb: retrieval_metrics.evaluate_retrieval(kb, [{"question": "leave days"}]), TypeError,
     "gold source"),
    ("question a str", lambda kb: retrieval_metrics.evaluate_retrieval(kb, ["leave days"]), TypeError,
     r"questions\[0\] must be a dict"),
    ("questions a dict", lambda kb: retrieval_metrics.evaluate_retrieval(kb, {"question": "q", "source": "a"}), TypeError,
     "questions must be a list"),
    ("not a retriever", lambda kb: retrieval_metrics.evaluate_retrieval("kb", [{"question": "q", "source": "a"}]), TypeError,
     "retriever must be a Retriever"),
    # prompts and answers
    ("hits a Hit", lambda kb: rag.format_passages(HIT), TypeError, "hits must be a list"),
    ("hits of str", lambda kb: rag.grounded_messages("q?", ["27 days"]), TypeError, r"hits\[0\] must be a Hit"),
    ("guard a str", lambda kb: rag.format_passages([HIT], guard="no"), TypeError, "guard must be True or False"),
    ("questions a str", lambda kb: rag.answer_many("How much leave?", kb, NoModel(), None), TypeError,
     "questions must be a list"),
    ("min_score NaN", lambda kb: rag.answer("leave", kb, NoModel(), None, min_score=math.nan), ValueError,
     "min_score must be a finite number"),
    ("min_score > 1", lambda kb: rag.answer("leave", kb, NoModel(), None, min_score=1.5), ValueError,
     "min_score must be in"),
    ("min_score a str", lambda kb: rag.answer("leave", kb, NoModel(), None, min_score="0.2"), TypeError,
     "min_score must be a number"),
    ("k negative", lambda kb: rag.answer("leave", kb, NoModel(), None, k=-1), ValueError, "k must be a positive"),
    ("max_new_tokens 0 on the IDK path", lambda kb: rag.answer("zebra", kb, NoModel(), None, min_score=0.99,
                                                               max_new_tokens=0), ValueError, "max_new_tokens"),
    ("batch_size a float", lambda kb: rag.answer_many(["q"], kb, NoModel(), None, batch_size=2.0), TypeError,
     "batch_size must be an int"),
    ("filter a str", lambda kb: rag.answer("leave", kb, NoModel(), None, filter_injections="off"), TypeError,
     "filter_injections must be True or False"),
    ("question None", lambda kb: rag.answer(None, kb, NoModel(), None), TypeError, "question must be a str"),
    ("retriever a dict", lambda kb: rag.answer("leave", DOCS, NoModel(), None), TypeError,
     "retriever must be a Retriever"),
    ("citations of None", lambda kb: rag.citations(None), TypeError, "reply must be a str"),
]


@pytest.mark.parametrize("name, call, error, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_with_a_clear_error(kb, name, call, error, match):
    with pytest.raises(error, match=match):
        call(kb)


def test_good_input_still_works(kb):
    """The checks accept what the lessons pass: numpy ints and floats, tuples, empty hit lists."""
    assert len(kb.retrieve("leave", k=np.int64(2))) == 2
    assert Hit("t", "s", np.float32(0.5)).score == np.float32(0.5)
    assert retrieval_metrics.hit_at_k((["a", "b"], []), [["b"], {"c"}], 2) == 0.5  # tuples, a list of gold names, no hits
    assert rag.format_passages([]) == ""
    assert retrieval_metrics.evaluate_retrieval(kb, [{"question": "annual leave days", "sources": ["leave"]}], k=1)["hit@1"] == 1
    retriever = Retriever(("a", "b", "c"), ("s", "s", "t"), UNIT.astype(np.float64), None, hybrid=np.bool_(False))
    assert retriever.embeddings.dtype == np.float32 and retriever.hybrid is False
