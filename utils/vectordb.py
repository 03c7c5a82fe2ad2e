"""Vector indexes at scale (lesson 10): build FAISS indexes, measure them, keep them on disk.

Exact search (Flat) compares a query with every stored vector: perfect recall, cost linear in the
number of vectors. Approximate indexes trade a little recall for a lot of speed or memory:

    ivf     IVF-Flat: k-means cells; a query scans only the `nprobe` nearest cells
    hnsw    HNSW: a layered proximity graph walked greedily; `efSearch` = how wide the walk is
    ivfpq   IVF-PQ: IVF cells whose vectors are compressed by product quantisation to m bytes

Everything here uses inner product on unit vectors (= cosine similarity), like lesson 09.
Measurements: build_index (seconds), index_bytes (serialized size), queries_per_second,
recall_at_k against exact search. Persistence keeps ids and metadata next to the index as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .checks import check_choice, check_int, check_positive_int

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")


def _faiss():
    import faiss

    return faiss


def check_vectors(x, d: int | None = None, name: str = "vectors") -> np.ndarray:
    """A C-contiguous float32 (n, d) array, or a ValueError saying what shape is allowed.

    Example: check_vectors([0.6, 0.8]) -> array([[0.6, 0.8]], dtype=float32)  (one vector -> shape (1, 2))
    """
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (n, d), got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} have dimension {x.shape[1]}, but the index holds {d}-d vectors: "
                         f"embed them with the same model (only {d}-d vectors are allowed)")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinity")
    return np.ascontiguousarray(x, dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so that inner product = cosine similarity.

    Example: normalize([[3, 4]]) -> [[0.6, 0.8]]
    """
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def synthetic_topup(real: np.ndarray, n_total: int, noise: float = 0.5,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, parents): `real` unit vectors followed by synthetic ones up to n_total rows, and
    for every row the index of the real row it was made from (itself for the real rows), so that
    metadata can be inherited.

    Each synthetic vector is a real vector plus Gaussian noise drawn with the *real data's own
    covariance* (so it moves along the directions in which real embeddings actually vary, not
    into directions no sentence ever uses), scaled by `noise`, then re-normalised. The result keeps
    the real corpus's topics and clusters: every synthetic vector is a "paraphrase" of a real one.
    Shown in lesson 10.
    """
    real = check_vectors(real, name="real vectors")
    if n_total < len(real):
        raise ValueError(f"n_total ({n_total}) must be at least the number of real vectors ({len(real)})")
    rng = np.random.default_rng(seed)
    centred = real - real.mean(axis=0)
    # factor of the covariance: noise = z @ chol.T has covariance cov(real)
    cov = centred.T @ centred / max(len(real) - 1, 1) + 1e-6 * np.eye(real.shape[1], dtype=np.float32)
    chol = np.linalg.cholesky(cov.astype(np.float64)).astype(np.float32)
    n_new = n_total - len(real)
    parents = rng.integers(0, len(real), size=n_new)
    z = rng.standard_normal((n_new, real.shape[1]), dtype=np.float32)
    synthetic = real[parents] + noise * (z @ chol.T)
    vectors = np.concatenate([real, normalize(synthetic)]).astype(np.float32)
    return vectors, np.concatenate([np.arange(len(real)), parents])


def build_index(kind: str, xb: np.ndarray, *, nlist: int = 1024, m: int = 48, nbits: int = 8,
                M: int = 32, ef_construction: int = 64, train_size: int = 50_000, seed: int = 0):
    """(index, build seconds) for kind in INDEX_KINDS over the unit vectors xb (n, d).

    IVF kinds are trained on at most `train_size` vectors (k-means needs ~40 points per cell).
    Shown in lesson 10.
    """
    faiss = _faiss()
    check_choice("kind", kind, INDEX_KINDS)
    xb = check_vectors(xb, name="database vectors")
    d = xb.shape[1]
    start = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        quantizer = faiss.IndexFlatIP(d)  # assigns each vector to its nearest k-means centroid
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if d % m:
                raise ValueError(f"m (PQ sub-vectors) must divide the dimension {d}, got m={m}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # k-means initialisation: the same cells on every run
        rng = np.random.default_rng(seed)
        sample = xb[rng.choice(len(xb), size=min(train_size, len(xb)), replace=False)]
        index.train(sample)
        index.quantizer_trains_alone = 0
    index.add(xb)
    return index, time.perf_counter() - start


def set_search_params(index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """The query-time knobs: nprobe (IVF cells scanned) or efSearch (HNSW candidate list).

    Shown in lesson 10."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if nprobe is not None:
        faiss.extract_index_ivf(inner).nprobe = check_positive_int("nprobe", nprobe)
    if ef_search is not None:
        faiss.downcast_index(inner).hnsw.efSearch = check_positive_int("ef_search", ef_search)


def search(index, xq, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k), after checking k and the queries' dimension. Shown in lesson 10."""
    k = check_positive_int("k", k, what=" (how many neighbours to return)")
    xq = check_vectors(xq, index.d, name="query vectors")
    if index.ntotal == 0:
        raise ValueError("the index is empty: add vectors before searching")
    return index.search(xq, k)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the true k nearest neighbours that the index returned in its first k.

    Shown in lesson 10. Example: recall_at_k([[4, 3, 9]], [[1, 3, 4]], 3) -> 0.667 (2 of the 3 found)
    """
    k = check_positive_int("k", k)
    found, truth = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    if found.shape[0] != truth.shape[0]:
        raise ValueError("found and truth need one row per query")
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def queries_per_second(index, xq, k: int = 10, one_at_a_time: bool = False, min_seconds: float = 0.2) -> float:
    """Throughput of index.search. one_at_a_time=True sends queries one by one, the way a service
    answering users sees them; False sends them as one batch (the fastest case for Flat, whose
    batched search is a matrix product). Shown in lesson 10."""
    xq = check_vectors(xq, index.d, name="query vectors")
    k = check_positive_int("k", k, what=" (how many neighbours to return)")
    done, start = 0, time.perf_counter()
    while True:  # repeat until the measurement lasts long enough to be stable
        if one_at_a_time:
            for q in xq:
                index.search(q[None, :], k)
        else:
            index.search(xq, k)
        done += len(xq)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def index_bytes(index) -> int:
    """Bytes of the index written to disk: what it costs on disk and, roughly, in RAM.

    Written to a temporary file rather than serialised in memory, so measuring a big index does
    not briefly need twice its RAM. Shown in lesson 10."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        _faiss().write_index(index, path)
        return os.path.getsize(path)


def flat_bytes(n: int, d: int, bytes_per_value: int = 4) -> int:
    """Bytes of n d-dimensional vectors stored flat. Example: flat_bytes(1_000, 384) -> 1_536_000 (float32)."""
    check_int("n (number of vectors)", n, low=0)
    check_positive_int("d (dimension)", d)
    check_positive_int("bytes_per_value", bytes_per_value)
    return n * d * bytes_per_value


def memory_estimate(n: int, d: int = 384, kind: str = "flat", M: int = 32, m: int = 48, nbits: int = 8,
                    nlist: int = 65_536) -> int:
    """Approximate RAM in bytes of an index of n d-dimensional vectors (the arithmetic of lesson 10).

    flat:  n * d * 4 (float32)
    hnsw:  the float32 vectors + the graph: ~2*M neighbour ids (4 bytes each) per vector on level 0
    ivf:   the float32 vectors + an 8-byte id per vector + nlist centroids
    ivfpq: m * nbits / 8 bytes of codes + an 8-byte id per vector + centroids and codebooks
    Shown in lesson 10. Example: memory_estimate(1_000, 384, "flat") -> 1_536_000
    """
    check_choice("kind", kind, INDEX_KINDS)
    vectors = flat_bytes(n, d)  # checks n >= 0 and d >= 1
    for name, value in (("M", M), ("m", m), ("nlist", nlist)):
        check_positive_int(name, value)
    check_int("nbits", nbits, low=1, high=24)  # FAISS's product quantiser takes 1 to 24 bits per code
    if kind == "ivfpq" and d % m:
        raise ValueError(f"m (PQ sub-vectors) must divide the dimension {d}, got m={m}")
    if kind == "flat":
        return vectors
    if kind == "hnsw":
        return vectors + n * 2 * M * 4
    centroids = nlist * d * 4
    if kind == "ivf":
        return vectors + n * 8 + centroids
    codebooks = m * (2 ** nbits) * (d // m) * 4
    return n * (m * nbits // 8) + n * 8 + centroids + codebooks


def filtered_search(index, xq, k: int, allowed_ids, ef_search: int | None = None,
                    nprobe: int | None = None):
    """Search only among `allowed_ids` (pre-filtering inside FAISS with an IDSelector), so a
    restrictive filter still returns k results when k allowed vectors exist. Shown in lesson 10."""
    faiss = _faiss()
    k = check_positive_int("k", k, what=" (how many neighbours to return)")
    xq = check_vectors(xq, index.d, name="query vectors")
    selector = faiss.IDSelectorBatch(np.asarray(allowed_ids, dtype=np.int64))
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search or index.hnsw.efSearch)
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe or index.nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(xq, k, params=params)


def save_index(index, folder: str | Path, metadata: list[dict] | None = None) -> Path:
    """index.faiss + metadata.json (one dict per stored vector, in id order) in `folder`. Shown in lesson 10."""
    faiss = _faiss()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if metadata is not None and len(metadata) != index.ntotal:
        raise ValueError(f"metadata needs one entry per vector ({index.ntotal}), got {len(metadata)}")
    faiss.write_index(index, str(folder / "index.faiss"))
    (folder / "metadata.json").write_text(json.dumps(metadata or []), encoding="utf-8")
    return folder


def load_index(folder: str | Path):
    """(index, metadata) as written by save_index (FAISS's own format + JSON: no pickle). Shown in lesson 10."""
    folder = Path(folder)
    if not (folder / "index.faiss").is_file():
        raise FileNotFoundError(f"no index.faiss in {folder}")
    index = _faiss().read_index(str(folder / "index.faiss"))
    metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    return index, metadata
