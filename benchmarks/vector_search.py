"""Which library searches an index's vectors: exact search with numpy, usearch (exact, SIMD)
and faiss-cpu (flat), and usearch's HNSW graph (build time, search time, recall against
exact), on the same unit vectors in the same run. sqlite-vec is not in the race where
Python's sqlite3 cannot load extensions (pyenv's and macOS's default builds: no
``enable_load_extension``); the script says so when that is the case.

    python benchmarks/vector_search.py [--n 100000] [--dim 384] [--queries 50]
    pip install faiss-cpu   # to include faiss (not a localmed dependency)
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import time

import numpy as np


def timed(search, queries: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Median milliseconds per query, and each query's result keys."""
    search(queries[0])
    times, keys = [], []
    for query in queries:
        started = time.perf_counter()
        keys.append(search(query))
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--hnsw", action="store_true", help="also build usearch's HNSW graph "
                        "(minutes at 100,000 on two cores)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picked = vectors[rng.integers(0, args.n, args.queries)]
    queries = picked + 0.05 * rng.standard_normal(picked.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = args.k
    rows = []

    def numpy_exact(q):
        scores = vectors @ q
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    ms, exact = timed(numpy_exact, queries)
    rows.append(("numpy matmul + argpartition", ms, "exact"))

    from usearch.index import Index, MetricKind
    from usearch.index import search as usearch_exact

    ms, _ = timed(lambda q: usearch_exact(vectors, q, k, MetricKind.IP, exact=True).keys,
                  queries)
    rows.append(("usearch exact (SIMD)", ms, "exact"))
    try:
        import faiss

        flat = faiss.IndexFlatIP(args.dim)
        flat.add(vectors)
        ms, _ = timed(lambda q: flat.search(q[None, :], k)[1][0], queries)
        rows.append(("faiss-cpu IndexFlatIP", ms, "exact"))
    except ImportError:
        rows.append(("faiss-cpu", float("nan"), "not installed"))
    if args.hnsw:
        started = time.perf_counter()
        graph = Index(ndim=args.dim, metric="ip", dtype="f16")
        graph.add(np.arange(args.n), vectors)
        build = time.perf_counter() - started
        ms, found = timed(lambda q: graph.search(q, k).keys, queries)
        recall = statistics.mean(len(set(a[:10]) & set(b[:10])) / 10
                                 for a, b in zip(exact, found, strict=True))
        rows.append((f"usearch HNSW (f16; built in {build:.0f} s)", ms,
                     f"recall@10 {recall:.3f}"))
    loadable = hasattr(sqlite3.connect(":memory:"), "enable_load_extension")
    rows.append(("sqlite-vec", float("nan"), "loadable here" if loadable else
                 "this Python's sqlite3 cannot load extensions"))
    print(f"{args.n:,} vectors of {args.dim}, top {k}, median of {args.queries} queries")
    print("| search | ms per query | |")
    print("|---|---|---|")
    for name, ms, note in rows:
        print(f"| {name} | {ms:.1f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
