"""utils.chunking: fixed windows, sections, paragraph packing, and bad sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils import chunking
from utils.chunking import check_chunk_sizes, chunk_spans, chunk_text

words = st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=12), min_size=0, max_size=80)
seps = st.sampled_from([" ", "  ", "\n", "\n\n"])


@st.composite
def texts(draw):
    ws = draw(words)
    return "".join(w + draw(seps) for w in ws)


@settings(max_examples=200, deadline=None)
@given(text=texts(), size=st.integers(1, 60), overlap_frac=st.floats(0, 0.9))
def test_chunks_cover_the_text_are_bounded_and_in_order(text, size, overlap_frac):
    overlap = min(int(size * overlap_frac), size - 1)
    spans = chunk_spans(text, size, overlap)
    covered = np.zeros(len(text), dtype=bool)
    for start, end in spans:
        assert 0 <= start < end <= len(text)
        assert end - start <= size, "no chunk is longer than chunk_size"
        covered[start:end] = True
    # every non-whitespace character is in some chunk: nothing of the text is lost
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    starts = [s for s, _ in spans]
    assert starts == sorted(set(starts)), "chunks move strictly forward"
    assert chunk_text(text, size, overlap) == [text[s:e] for s, e in spans]


def test_chunks_do_not_split_words_and_overlap_as_asked():
    text = " ".join(f"word{i:03d}" for i in range(200))  # 8-character words
    chunks = chunk_text(text, chunk_size=100, overlap=30)
    assert all(len(c) <= 100 for c in chunks)
    for c in chunks:
        assert all(len(w) == 7 for w in c.split()), f"a word was cut: {c!r}"
    spans = chunk_spans(text, 100, 30)
    shared = [prev_end - start for (_, prev_end), (start, _) in zip(spans, spans[1:])]
    assert all(20 <= s <= 38 for s in shared), shared  # ~30 characters, snapped to word starts
    assert chunk_spans(text, 100, 0)[1][0] >= chunk_spans(text, 100, 0)[0][1]  # overlap 0: disjoint


def test_chunk_text_small_example():
    assert chunk_text("one two three four five six", 10, 4) == [
        "one two", "two three", "three four", "four five", "five six"]
    assert chunk_text("", 10, 2) == [] and chunk_text("   \n ", 10, 2) == []
    assert chunk_text("abcdefghijklmnop", 5, 0) == ["abcde", "fghij", "klmno", "p"]  # no space: hard cut


def test_chunk_text_is_importable_from_rag_as_the_design_lists_it():
    from utils.rag import chunk_text as rag_chunk_text

    assert rag_chunk_text is chunk_text


@pytest.mark.parametrize("size, overlap, error, match", [
    (100, 100, ValueError, "overlap must be smaller than chunk_size"),
    (100, 150, ValueError, "overlap must be smaller than chunk_size"),
    (0, 0, ValueError, "chunk_size must be a positive int"),
    (-5, 0, ValueError, "chunk_size must be a positive int"),
    (10, -1, ValueError, "overlap must be an int >= 0"),
    (10.5, 0, TypeError, "chunk_size must be an int"),
    (10, 2.0, TypeError, "overlap must be an int"),
    (True, 0, TypeError, "chunk_size must be an int"),
])
def test_bad_chunk_sizes_are_refused(size, overlap, error, match):
    with pytest.raises(error, match=match):
        check_chunk_sizes(size, overlap)
    for chunker in (chunk_text, chunking.pack_paragraphs, chunking.chunk_sections):
        with pytest.raises(error, match=match):
            chunker("some text here", size, overlap)


def test_chunkers_refuse_non_text():
    for chunker in (chunk_text, chunking.pack_paragraphs):
        with pytest.raises(TypeError, match="text must be a str"):
            chunker(["a list"], 10, 0)
    with pytest.raises(TypeError, match="text must be a str"):
        chunking.split_sections(b"bytes")


def test_sections_keep_headings_and_never_mix_sections():
    doc = ("Intro line.\n\n## Leave\n\nYou get 27 days.\n\nCarry over 5.\n\n"
           "## Travel\n\nTrains first.\n\nFlights are economy.\n")
    assert [h for h, _ in chunking.split_sections(doc)] == ["", "Leave", "Travel"]
    chunks = chunking.chunk_sections(doc, chunk_size=60, title="hb")
    leave = [c for c in chunks if "27 days" in c]
    assert leave and leave[0].startswith("hb > Leave\n") and "Trains" not in leave[0]
    assert any(c.startswith("hb > Travel\n") and "economy" in c for c in chunks)
    rst = 'The "try" statement\n*******************\n\nBody one.\n\n"finally" clause\n================\n\nBody two.'
    assert chunking.split_sections(rst) == [('The "try" statement', "Body one."), ('"finally" clause', "Body two.")]
    chunks = chunking.chunk_sections(rst, 200, title="try")
    assert chunks == ['try > The "try" statement\nBody one.',
                      'try > The "try" statement > "finally" clause\nBody two.']


def test_a_heading_longer_than_the_chunk_still_gives_chunks():
    doc = "# " + "a very long heading " * 5 + "\n\nbody text here"
    chunks = chunking.chunk_sections(doc, chunk_size=20)
    assert chunks and all(c.startswith("a very long heading") for c in chunks)
    assert "body" in " ".join(chunks) and "here" in " ".join(chunks)


def test_paragraph_packing_keeps_every_paragraph_once():
    paras = [f"paragraph {i} " + "x" * (i * 7 % 50) for i in range(30)]
    chunks = chunking.pack_paragraphs("\n\n".join(paras), chunk_size=120)
    assert all(len(c) <= 120 for c in chunks)
    assert "\n\n".join(chunks).split("\n\n") == paras


def test_docstring_examples():
    assert chunking.split_sections("intro\n# Leave\n27 days") == [("", "intro"), ("Leave", "27 days")]
    assert chunking.pack_paragraphs("a b\n\nc d\n\ne f", 8) == ["a b\n\nc d", "e f"]
    assert chunking.chunk_document("a b c", "fixed", 3) == ["a b", "c"]


def test_chunk_document_dispatches_to_each_strategy():
    doc = "# T\n\n" + "\n\n".join(f"para {i} " + "y" * 30 for i in range(6))
    assert chunking.chunk_document(doc, "fixed", 80, 10) == chunk_text(doc, 80, 10)
    assert chunking.chunk_document(doc, "paragraphs", 80) == chunking.pack_paragraphs(doc, 80)
    assert chunking.chunk_document(doc, "sections", 80, title="d") == chunking.chunk_sections(doc, 80, title="d")
    with pytest.raises(ValueError, match="chunking must be one of"):
        chunking.chunk_document("text", "sentences", 100)
