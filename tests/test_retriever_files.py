"""Retriever.save / Retriever.load with damaged or crafted folders: every part is checked against the
others (chunks, sources, vectors, dimension, embedder) before it is used. Toy embedder, fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_rag import DOCS, HashEmbedder
from utils.rag import Retriever, build_retriever


@pytest.fixture
def saved(tmp_path):
    retriever = build_retriever(DOCS, embedder=HashEmbedder(), cache=False, hybrid=True)
    return retriever, retriever.save(tmp_path / "kb")


def _edit_meta(folder, edit):
    meta = json.loads((folder / "chunks.json").read_text())
    edit(meta)
    (folder / "chunks.json").write_text(json.dumps(meta))


def test_round_trip_rebuilds_the_index_from_the_stored_vectors(saved):
    original, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["chunks.json", "embeddings.npy"]
    loaded = Retriever.load(folder, embedder=HashEmbedder())
    assert loaded.index.ntotal == len(loaded) == len(original) and loaded.index.d == loaded.dim == 64
    for query in ("room K2 lab", "economy flights", "password manager"):
        assert loaded.retrieve(query, k=3) == original.retrieve(query, k=3)


def test_hnsw_round_trip(tmp_path):
    original = build_retriever(DOCS, embedder=HashEmbedder(), index="hnsw", cache=False)
    loaded = Retriever.load(original.save(tmp_path / "kb"), embedder=HashEmbedder())
    assert loaded.index_kind == "hnsw" and loaded.retrieve("annual leave", k=2) == original.retrieve("annual leave", k=2)


@pytest.mark.parametrize("edit, error, match", [
    (lambda m: m["sources"].pop(), ValueError, "chunks but 3 sources: one source per chunk"),
    (lambda m: m.pop("sources"), ValueError, "missing the key 'sources'"),
    (lambda m: m.pop("dim"), ValueError, "missing the key 'dim'"),
    (lambda m: m.update(chunks="one string"), ValueError, "chunks must be a non-empty list of strings"),
    (lambda m: m.update(chunks=[1, 2, 3, 4]), ValueError, "chunks must be a non-empty list of strings"),
    (lambda m: m.update(dim=10**9), ValueError, r"dim must be an int in \[1, 16384\]"),
    (lambda m: m.update(dim=32), ValueError, r"needs float32 \(4, 32\)"),
    (lambda m: m.update(index="annoy"), ValueError, "index must be one of"),
    (lambda m: m.update(hybrid="no"), TypeError, "hybrid must be True or False"),
    (lambda m: m.update(embedder_fingerprint="abc"), ValueError, "sha256 hex string"),
    (lambda m: m.update(chunks=m["chunks"] * 2, sources=m["sources"] * 2), ValueError, r"needs float32 \(8, 64\)"),
])
def test_parts_that_disagree_are_refused(saved, edit, error, match):
    _, folder = saved
    _edit_meta(folder, edit)
    with pytest.raises(error, match=match):
        Retriever.load(folder, embedder=HashEmbedder())


def test_a_vector_file_whose_header_claims_more_than_it_holds_is_refused_before_reading(saved):
    """A 4 x 64 file relabelled as 4 x 16384 would make np.load allocate 256 kB... or 4 x 10**9 floats."""
    _, folder = saved
    path = folder / "embeddings.npy"
    raw = path.read_bytes()
    path.write_bytes(raw[:-4])  # one float short
    with pytest.raises(ValueError, match="truncated or padded"):
        Retriever.load(folder, embedder=HashEmbedder())
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError, match="not a .npy array file"):
        Retriever.load(folder, embedder=HashEmbedder())


@pytest.mark.parametrize("vectors, match", [
    (np.full((4, 64), np.nan, dtype=np.float32), "NaN or inf"),
    (np.ones((4, 64), dtype=np.float32), "length 1"),
    (np.ones((4, 64), dtype=np.float64) / 8, r"holds float64 \(4, 64\)"),
])
def test_vectors_that_are_not_finite_unit_float32_rows_are_refused(saved, vectors, match):
    _, folder = saved
    np.save(folder / "embeddings.npy", vectors)
    with pytest.raises(ValueError, match=match):
        Retriever.load(folder, embedder=HashEmbedder())


def test_pickled_object_arrays_are_never_loaded(saved):
    _, folder = saved
    np.save(folder / "embeddings.npy", np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds object"):
        Retriever.load(folder, embedder=HashEmbedder())


def test_another_embedder_is_refused(saved):
    class Narrower(HashEmbedder):
        dim = 48

    _, folder = saved
    with pytest.raises(ValueError, match="different embedding model"):
        Retriever.load(folder, embedder=Narrower())
    _edit_meta(folder, lambda m: m.update(embedder_fingerprint=None))  # saved without a fingerprint
    with pytest.raises(ValueError, match="makes 48-d vectors, but the stored ones are 64-d"):
        Retriever.load(folder, embedder=Narrower())


def test_missing_files_and_oversized_json(saved):
    _, folder = saved
    (folder / "embeddings.npy").unlink()
    with pytest.raises(FileNotFoundError, match="embeddings.npy is missing"):
        Retriever.load(folder, embedder=HashEmbedder())
    (folder / "chunks.json").write_text("[" * 100_000)
    np.save(folder / "embeddings.npy", np.zeros((1, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="not valid JSON"):
        Retriever.load(folder, embedder=HashEmbedder())
