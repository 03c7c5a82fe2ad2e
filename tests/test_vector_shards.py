"""utils.vector_shards (FAISS split over worker processes, top-k merged) and utils.chroma_server.

The sharded search must give EXACTLY the single flat index's ids. Fast tests: the pure merge and
split; slow tests start worker processes and a `chroma run` server (loopback, always stopped).
"""

from __future__ import annotations

import tempfile

import numpy as np
import psutil
import pytest

from utils.vector_shards import ShardedIndex, merge_top_k, split_rows


def unit_vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def flat_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


def test_split_rows_covers_every_row_once():
    assert split_rows(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    for n, shards in [(1, 1), (7, 7), (1000, 4), (1001, 3)]:
        ranges = split_rows(n, shards)
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="at most the number of vectors"):
        split_rows(2, 3)
    with pytest.raises(ValueError, match="n_shards"):
        split_rows(5, 0)
    with pytest.raises(TypeError, match="n_shards"):
        split_rows(5, 2.0)


def test_merge_top_k_keeps_the_best_of_all_shards():
    scores, ids = merge_top_k([np.array([[0.9, 0.1]]), np.array([[0.5, 0.4]])],
                              [np.array([[3, 1]]), np.array([[7, 8]])], k=2)
    assert scores.tolist() == [[pytest.approx(0.9), 0.5]] and ids.tolist() == [[3, 7]]
    # a tie goes to the smaller id, whichever shard it came from
    _, ids = merge_top_k([np.array([[0.5]]), np.array([[0.5]])], [np.array([[9]]), np.array([[2]])], k=1)
    assert ids.tolist() == [[2]]
    with pytest.raises(ValueError, match="candidates"):
        merge_top_k([np.array([[0.5]])], [np.array([[1]])], k=2)


def test_merging_per_shard_flat_results_equals_one_flat_index():
    # the argument without processes: search each slice alone, shift its ids, merge
    xb, xq, k = unit_vectors(3000), unit_vectors(50, seed=1), 10
    scores, ids = [], []
    for rows in split_rows(len(xb), 3):
        s, i = flat_search(xb[rows.start:rows.stop], xq, k)
        scores.append(s)
        ids.append(i + rows.start)
    merged_scores, merged_ids = merge_top_k(scores, ids, k)
    truth_scores, truth_ids = flat_search(xb, xq, k)
    assert np.array_equal(merged_ids, truth_ids)
    assert np.allclose(merged_scores, truth_scores, atol=1e-6)


@pytest.mark.slow
def test_sharded_index_over_worker_processes_equals_one_flat_index():
    xb, xq, k = unit_vectors(5000), unit_vectors(200, seed=1), 10
    truth_scores, truth_ids = flat_search(xb, xq, k)
    with ShardedIndex(xb, n_shards=2) as index:
        pids = [p.pid for p in index.workers]
        assert all(psutil.pid_exists(pid) for pid in pids)
        scores, ids = index.search(xq, k)
        one_scores, one_ids = index.search(xq[:1], k)  # one query at a time works too
        with pytest.raises(ValueError, match="dimension"):
            index.search(unit_vectors(2, d=16), k)
        with pytest.raises(ValueError, match="more than the 5000"):
            index.search(xq, 6000)
    assert np.array_equal(ids, truth_ids) and np.array_equal(one_ids, truth_ids[:1])
    assert np.allclose(scores, truth_scores, atol=1e-6)
    for pid in pids:  # every worker is gone (or a zombie already reaped by wait)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_chroma_server_gives_the_embedded_clients_results():
    import chromadb
    from chromadb.config import Settings

    from utils.chroma_server import start_chroma_server

    xb, xq = unit_vectors(500), unit_vectors(20, seed=1)
    ids = [f"v{i}" for i in range(len(xb))]
    settings = Settings(anonymized_telemetry=False)

    def top5(client) -> list[list[str]]:
        collection = client.get_or_create_collection("shards-test", embedding_function=None,
                                                     metadata={"hnsw:space": "ip"})
        collection.add(ids=ids, embeddings=xb.tolist())
        return collection.query(query_embeddings=xq.tolist(), n_results=5)["ids"]

    with tempfile.TemporaryDirectory() as embedded_dir, tempfile.TemporaryDirectory() as server_dir:
        embedded = top5(chromadb.PersistentClient(path=embedded_dir, settings=settings))
        with start_chroma_server(server_dir) as server:
            assert server.host == "127.0.0.1" and server.running()
            served = top5(server.client())
            pid = server.process.pid
        assert not server.running()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert served == embedded
    _, truth = flat_search(xb, xq, 5)
    assert served == [[f"v{i}" for i in row] for row in truth]  # 500 vectors: HNSW finds the exact top 5
    with pytest.raises(ValueError, match="loopback"):
        start_chroma_server(server_dir, host="0.0.0.0")
