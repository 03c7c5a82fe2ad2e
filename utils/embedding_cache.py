"""Embeddings cached on disk (lessons 09 and 10): embed a text once, reuse the vector on every re-run.

MiniLM embeds ~22 chunks of 200 words per second on 2 CPU cores, so the Python reference (a few
thousand chunks) takes minutes. `embed` stores each result as a plain .npy file in the course cache,
named by a hash of the embedding model's weights and of every text, so that:

    the same model + the same chunks      -> the stored vectors (instant)
    a changed chunk, or a different model -> a different name: never stale vectors
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from .checks import check_positive_int, check_text_list


def embedder_fingerprint(embedder) -> str:
    """A sha256 (hex) of the embedding model's weights: the cache never mixes vectors of two models."""
    cached = getattr(embedder, "_course_fingerprint", None)
    if cached:
        return cached
    digest = hashlib.sha256(type(embedder).__name__.encode())
    if hasattr(embedder, "state_dict"):
        for name, tensor in sorted(embedder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(str(getattr(embedder, "max_seq_length", "")).encode())
    else:  # any other object with .encode(): fingerprint what it does to a probe sentence
        probe = embedder.encode(["fingerprint probe: the quick brown fox"], normalize_embeddings=True)
        digest.update(np.asarray(probe, dtype=np.float32).tobytes())
    fingerprint = digest.hexdigest()
    try:
        embedder._course_fingerprint = fingerprint  # hashing 90 MB of weights once is enough
    except AttributeError:
        pass
    return fingerprint


def embeddings_cache_dir() -> Path:
    """The folder of the cached .npy files: <course cache>/embeddings (LLM_COURSE_CACHE moves it)."""
    from .models import cache_dir

    return cache_dir() / "embeddings"


def embed(texts: list[str], embedder, batch_size: int = 32, cache: bool = True,
          progress: bool = False) -> np.ndarray:
    """Unit-length float32 embeddings, shape (len(texts), d). Shown in lessons 09 and 10.

    With cache=True the result is stored as .npy in the course cache, named by a hash of the model's
    weights and of every text, so a re-run with the same chunks is instant and a changed chunk or
    model is never served stale vectors.
    """
    texts = check_text_list("texts", texts, allow_empty_items=True)
    batch_size = check_positive_int("batch_size", batch_size)
    path = None
    if cache:
        key = hashlib.sha256(embedder_fingerprint(embedder).encode())
        for t in texts:
            key.update(t.encode("utf-8") + b"\x00")  # the separator: ["ab", "c"] and ["a", "bc"] differ
        path = embeddings_cache_dir() / f"{key.hexdigest()[:32]}.npy"
        if path.is_file():
            vectors = np.load(path, allow_pickle=False)  # plain array, never pickle
            if vectors.shape[0] == len(texts):
                return vectors
    vectors = embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=progress)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), -1)  # (n, d)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{time.time_ns()}.npy")
        np.save(tmp, vectors)
        tmp.replace(path)  # atomic: a concurrent reader sees all or nothing
    return vectors
