"""Vector search across shards (lesson 17): one index split over worker processes, results merged.

When the vectors no longer fit one machine's memory (1B x 384 float32 = 1.5 TB), the index is cut into
shards, each held by its own process (its own machine, in production). A query goes to EVERY shard
("scatter"), each returns its local top-k with global ids, and the caller keeps the k best of the
n_shards * k candidates ("gather"):

    query --+--> shard 0 (rows 0..n/2) --> its top-k --+
            +--> shard 1 (rows n/2..n) --> its top-k --+--> merge_top_k --> top-k of all n rows

With exact (flat) shards the merged top-k is exactly the single index's top-k: the true k nearest
rows are each in some shard, where they are also among that shard's k nearest. Replicas (copies of
a shard) add queries per second; shards add capacity. Milvus, Qdrant, Vespa, Elasticsearch and
managed services do this routing, replication and re-balancing for you.

    with ShardedIndex(vectors, n_shards=2) as index:     # starts 2 worker processes
        scores, ids = index.search(queries, k=10)        # (nq, k) each, like faiss

The workers are `python -m utils.vector_shards --worker`; they talk over their stdin/stdout pipes with
length-prefixed messages (a JSON header, then raw float32/int64 bytes: no pickle), and exit when
the pipe closes, so a worker never outlives its parent. Shown in lesson 17.
"""

from __future__ import annotations

import atexit
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from utils.checks import check_positive_int
from utils.vectordb import check_vectors

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_HEADER_BYTES = 4096  # a message header is a small JSON object; anything longer is refused
_RUNNING: set[ShardedIndex] = set()


def split_rows(n: int, n_shards: int) -> list[range]:
    """Contiguous row ranges of near-equal size, one per shard. Example: split_rows(10, 3) -> [range(0, 3),
    range(3, 6), range(6, 10)]"""
    check_positive_int("n", n)
    check_positive_int("n_shards", n_shards)
    if n_shards > n:
        raise ValueError(f"n_shards ({n_shards}) must be at most the number of vectors ({n}): a shard needs rows")
    bounds = [n * i // n_shards for i in range(n_shards + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def merge_top_k(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (highest score) candidates per query over all shards' (nq, k_s) results.
    Ties go to the smaller id, as in one flat index. Example: scores [[[.9, .1]], [[.5, .4]]], ids
    [[[3, 1]], [[7, 8]]], k=2 -> ([[.9, .5]], [[3, 7]])"""
    check_positive_int("k", k)
    all_scores = np.concatenate(scores, axis=1)  # (nq, n_shards * k_s)
    all_ids = np.concatenate(ids, axis=1)
    if k > all_scores.shape[1]:
        raise ValueError(f"k={k} is more than the {all_scores.shape[1]} candidates the shards returned")
    order = np.lexsort((all_ids, -all_scores), axis=1)[:, :k]  # by score (descending), then id
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Messages over a pipe: 4-byte length, JSON header, then the arrays' raw bytes


def send(stream, header: dict, *arrays: np.ndarray) -> None:
    head = json.dumps(header).encode()
    stream.write(struct.pack("<I", len(head)) + head)
    for array in arrays:
        stream.write(np.ascontiguousarray(array).tobytes())
    stream.flush()


def receive_header(stream) -> dict | None:
    """The next header, or None when the other side closed the pipe."""
    size = stream.read(4)
    if len(size) < 4:
        return None
    (length,) = struct.unpack("<I", size)
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"a message header of {length} bytes is over the limit of {MAX_HEADER_BYTES}")
    return json.loads(stream.read(length))


def receive_array(stream, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    data = stream.read(count)
    if len(data) != count:
        raise EOFError(f"the pipe closed after {len(data)} of {count} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def worker(stdin, stdout) -> None:
    """A shard: builds an exact inner-product index over the rows it is sent, answers searches with
    GLOBAL ids (its first row's id + local id), exits when its input pipe closes."""
    import faiss

    faiss.omp_set_num_threads(1)  # one core per shard worker
    index, first_id = None, 0
    while (header := receive_header(stdin)) is not None:
        if header["op"] == "add":
            vectors = receive_array(stdin, (header["n"], header["d"]), np.float32)
            index, first_id = faiss.IndexFlatIP(header["d"]), header["first_id"]
            index.add(vectors)
            send(stdout, {"ok": True, "ntotal": index.ntotal})
        elif header["op"] == "search":
            queries = receive_array(stdin, (header["nq"], index.d), np.float32)
            k = min(header["k"], index.ntotal)
            scores, ids = index.search(queries, k)  # (nq, k) each; ids local to this shard
            send(stdout, {"nq": header["nq"], "k": k}, scores.astype(np.float32), (ids + first_id).astype(np.int64))


class ShardedIndex:
    """An exact inner-product index whose rows are split over `n_shards` worker processes.

    vectors: (n, d) float32 (unit rows for cosine similarity); row i gets id i.
    """

    def __init__(self, vectors, n_shards: int = 2):
        vectors = check_vectors(vectors)
        self.d = vectors.shape[1]
        self.ranges = split_rows(len(vectors), n_shards)
        self.workers: list[subprocess.Popen] = []
        _RUNNING.add(self)
        try:
            for rows in self.ranges:
                process = subprocess.Popen([sys.executable, "-m", "utils.vector_shards", "--worker"], cwd=REPO_ROOT,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self.workers.append(process)
                send(process.stdin, {"op": "add", "n": len(rows), "d": self.d, "first_id": rows.start},
                     vectors[rows.start:rows.stop])
            for process in self.workers:  # every shard builds its index at the same time
                if receive_header(process.stdout) is None:
                    raise RuntimeError(f"shard worker {process.pid} exited with code {process.wait()}")
        except BaseException:
            self.stop()
            raise

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (nq, k): the k highest inner products over all shards, merged."""
        queries = check_vectors(queries, d=self.d, name="queries")
        check_positive_int("k", k)
        if k > sum(len(r) for r in self.ranges):
            raise ValueError(f"k={k} is more than the {sum(len(r) for r in self.ranges)} stored vectors")
        for process in self.workers:  # scatter: every shard searches at the same time ...
            send(process.stdin, {"op": "search", "nq": len(queries), "k": k}, queries)
        scores, ids = [], []
        for process in self.workers:  # ... gather: read each shard's answer
            header = receive_header(process.stdout)
            if header is None:
                raise RuntimeError(f"shard worker {process.pid} exited with code {process.wait()}")
            scores.append(receive_array(process.stdout, (header["nq"], header["k"]), np.float32))
            ids.append(receive_array(process.stdout, (header["nq"], header["k"]), np.int64))
        return merge_top_k(scores, ids, k)

    def stop(self) -> None:
        """Close every worker's pipe (it exits), waiting for each; kill one that does not. Safe to call twice."""
        for process in self.workers:
            if process.stdin and not process.stdin.closed:
                process.stdin.close()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout and not process.stdout.closed:
                process.stdout.close()
        _RUNNING.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@atexit.register
def stop_all_shards() -> int:
    """Stop the workers of every ShardedIndex this process started; returns how many indexes."""
    indexes = list(_RUNNING)
    for index in indexes:
        index.stop()
    return len(indexes)


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        raise SystemExit("usage: python -m utils.vector_shards --worker  (started by ShardedIndex)")
    worker(sys.stdin.buffer, sys.stdout.buffer)
