"""utils.vectordb: index kinds, recall, filtering, persistence, memory arithmetic, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from utils import vectordb as vdb


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin-wait for each other on a busy machine: on 2 shared cores the IVF-PQ
    training below took 13 s with 2 threads and 0.5 s with 1. Tiny indexes gain nothing from threads."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = vdb.normalize(rng.standard_normal((20, 32)))  # clustered, like real embeddings
    xb = vdb.normalize(centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 32)))
    xq = vdb.normalize(centres[rng.integers(0, 20, 50)] + 0.3 * rng.standard_normal((50, 32)))
    return xb, xq


def exact_neighbours(xb, xq, k):
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]


def test_recall_at_k_by_hand():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 0, 0, 0]])
    assert vdb.recall_at_k(found, truth, 4) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert vdb.recall_at_k(found, truth, 1) == pytest.approx((0 + 1) / 2)  # only the first column counts
    assert vdb.recall_at_k(truth, truth, 4) == 1.0


def test_small_helpers_docstring_examples():
    np.testing.assert_allclose(vdb.normalize([[3, 4]]), [[0.6, 0.8]])
    assert vdb.check_vectors([0.6, 0.8]).shape == (1, 2)
    assert vdb.flat_bytes(1_000, 384) == 1_536_000 == vdb.memory_estimate(1_000, 384, "flat")


def test_flat_is_exact_and_approximate_indexes_are_close(data):
    xb, xq = data
    truth = exact_neighbours(xb, xq, 10)
    flat, _ = vdb.build_index("flat", xb)
    _, ids = vdb.search(flat, xq, 10)
    assert vdb.recall_at_k(ids, truth, 10) == 1.0
    hnsw, _ = vdb.build_index("hnsw", xb, M=16, ef_construction=40)
    vdb.set_search_params(hnsw, ef_search=64)
    assert vdb.recall_at_k(vdb.search(hnsw, xq, 10)[1], truth, 10) >= 0.9
    ivf, _ = vdb.build_index("ivf", xb, nlist=16)
    vdb.set_search_params(ivf, nprobe=1)
    low = vdb.recall_at_k(vdb.search(ivf, xq, 10)[1], truth, 10)
    vdb.set_search_params(ivf, nprobe=16)  # every cell scanned: exact again
    assert vdb.recall_at_k(vdb.search(ivf, xq, 10)[1], truth, 10) == 1.0
    assert low < 1.0
    pq, _ = vdb.build_index("ivfpq", xb, nlist=16, m=8, nbits=6)
    vdb.set_search_params(pq, nprobe=16)
    assert 0.3 < vdb.recall_at_k(vdb.search(pq, xq, 10)[1], truth, 10) < 1.0  # compression loses a bit
    assert vdb.index_bytes(pq) < vdb.index_bytes(flat) / 2  # ...and saves memory


def test_filtered_search_only_returns_allowed_ids(data):
    xb, xq = data
    allowed = np.arange(0, len(xb), 10)  # 10% of the vectors pass the filter
    for kind in ("flat", "hnsw", "ivf"):
        index, _ = vdb.build_index(kind, xb, nlist=16)
        _, ids = vdb.filtered_search(index, xq, 5, allowed, ef_search=128, nprobe=16)
        assert set(ids.ravel().tolist()) <= set(allowed.tolist()) | {-1}, kind
    _, ids = vdb.filtered_search(vdb.build_index("flat", xb)[0], xq, 5, allowed)
    truth = allowed[exact_neighbours(xb[allowed], xq, 5)]
    np.testing.assert_array_equal(ids, truth)  # exact among the allowed ones


def test_persistence_round_trip(tmp_path, data):
    xb, xq = data
    index, _ = vdb.build_index("hnsw", xb, M=8)
    meta = [{"source": "a" if i % 2 else "b", "row": i} for i in range(len(xb))]
    vdb.save_index(index, tmp_path / "idx", meta)
    loaded, loaded_meta = vdb.load_index(tmp_path / "idx")
    assert loaded.ntotal == len(xb) and loaded_meta == meta
    np.testing.assert_array_equal(vdb.search(loaded, xq, 5)[1], vdb.search(index, xq, 5)[1])
    with pytest.raises(ValueError, match="one entry per vector"):
        vdb.save_index(index, tmp_path / "bad", meta[:10])
    with pytest.raises(FileNotFoundError):
        vdb.load_index(tmp_path / "missing")


def test_bad_input_is_refused(data):
    xb, xq = data
    index, _ = vdb.build_index("flat", xb)
    with pytest.raises(ValueError, match="only 32-d vectors are allowed"):
        vdb.search(index, np.ones((1, 16), dtype=np.float32), 5)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive int"):
            vdb.search(index, xq, k)
        with pytest.raises(ValueError, match="k must be a positive int"):
            vdb.filtered_search(index, xq, k, [1, 2, 3])
    with pytest.raises(TypeError, match="k must be an int"):
        vdb.search(index, xq, 2.5)
    with pytest.raises(ValueError, match="k must be a positive int"):
        vdb.recall_at_k(np.zeros((1, 3)), np.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        vdb.memory_estimate(10, 8, "annoy")
    hnsw, _ = vdb.build_index("hnsw", xb[:100], M=4)
    with pytest.raises(ValueError, match="ef_search must be a positive int"):
        vdb.set_search_params(hnsw, ef_search=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        vdb.build_index("annoy", xb)
    with pytest.raises(ValueError, match="must divide the dimension"):
        vdb.build_index("ivfpq", xb, nlist=4, m=7)
    with pytest.raises(ValueError, match="NaN"):
        vdb.search(index, np.full((1, 32), np.nan, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="index is empty"):
        import faiss

        vdb.search(faiss.IndexFlatIP(32), xq, 3)


def test_memory_arithmetic():
    n, d = 1_000_000_000, 384
    assert vdb.memory_estimate(n, d, "flat") == 1_536_000_000_000  # 1.5 TB of float32
    assert vdb.memory_estimate(n, d, "hnsw", M=32) == 1_536_000_000_000 + n * 64 * 4
    pq = vdb.memory_estimate(n, d, "ivfpq", m=48, nbits=8)
    assert 56e9 < pq < 57e9  # 48-byte codes + 8-byte ids per vector: ~56 GB


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((-5,), {}, ValueError, r"n \(number of vectors\) must be an int >= 0"),
    ((1.5e6,), {}, TypeError, r"n \(number of vectors\) must be an int"),
    ((10, 0), {}, ValueError, r"d \(dimension\) must be a positive int"),
    ((10, -384), {}, ValueError, r"d \(dimension\) must be a positive int"),
    ((10, 384, "hnsw"), {"M": -32}, ValueError, "M must be a positive int"),
    ((10, 384, "ivf"), {"nlist": 0}, ValueError, "nlist must be a positive int"),
    ((10, 384, "ivfpq"), {"nbits": 40}, ValueError, "nbits must be an int between 1 and 24"),
    ((10, 384, "ivfpq"), {"m": 0}, ValueError, "m must be a positive int"),
    ((10, 384, "ivfpq"), {"m": 7}, ValueError, "must divide the dimension 384"),
    (("10",), {}, TypeError, "must be an int"),
])
def test_memory_arithmetic_refuses_impossible_sizes(args, kwargs, error, match):
    """memory_estimate(-5) used to answer -7680 bytes."""
    with pytest.raises(error, match=match):
        vdb.memory_estimate(*args, **kwargs)


def test_flat_bytes_refuses_negative_sizes():
    assert vdb.flat_bytes(0, 384) == 0
    with pytest.raises(ValueError, match="n \\(number of vectors\\) must be an int >= 0"):
        vdb.flat_bytes(-1, 384)
    with pytest.raises(ValueError, match="bytes_per_value must be a positive int"):
        vdb.flat_bytes(10, 384, bytes_per_value=0)


def test_synthetic_topup_keeps_real_rows_and_unit_length(data):
    xb, _ = data
    real = xb[:200]
    out, parents = vdb.synthetic_topup(real, 1000, noise=0.3, seed=1)
    assert out.shape == (1000, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(parents[:200], np.arange(200))
    # each synthetic row is closer to its own parent than to the average real row
    own = np.einsum("ij,ij->i", out[200:], real[parents[200:]])
    assert (own > (out[200:] @ real.T).mean(axis=1)).all()
    np.testing.assert_array_equal(out[:200], real)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # synthetic rows stay near a real row (they are noisy copies), closer than random unit vectors are
    nearest = (out[200:] @ real.T).max(axis=1)
    random = vdb.normalize(np.random.default_rng(0).standard_normal((800, 32)))
    assert nearest.mean() > (random @ real.T).max(axis=1).mean()
    np.testing.assert_array_equal(out, vdb.synthetic_topup(real, 1000, noise=0.3, seed=1)[0])  # seeded
    with pytest.raises(ValueError, match="at least the number of real vectors"):
        vdb.synthetic_topup(real, 100)
