"""Search an index: BM25 always, dense vectors where the index has them, fused by reciprocal
rank (as GPT4All fuses them), and a relevance floor below which nothing counts as found.

BM25 runs in SQLite's FTS5 over the query's informative words joined by OR (a vignette's words
are never all in one passage; FTS5 joins bare words with AND). Dense search is exact: a dot
product with every vector of the index through usearch's SIMD kernels (measured against numpy,
faiss and usearch's HNSW in ``benchmarks/vector_search.py``: exact search at 100,000 passages
takes ~20 ms, well inside a chat turn, with no graph to build or keep in step with the file).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from localmed.retrieval.embedder import Embedder
from localmed.retrieval.store import DocsIndex, Passage

RRF_K = 60
"""Reciprocal-rank fusion's constant: GPT4All's, and the paper's (Cormack et al., 2009)."""
CANDIDATES = 50
"""How deep each ranking is read before fusion."""
DENSE_FLOOR = 0.55
"""The least cosine the best passage needs for anything to count as found, where the index has
vectors. Measured with all-MiniLM-L6-v2 on benchmarks/grounded.py: PubMedQA's questions find
their own abstract at a cosine of 0.61 or more nine times in ten (median 0.74), while the best
passage for MedQA's vignettes, which no abstract answers, is at 0.53 or less nine times in ten
(median 0.45)."""
BM25_FLOOR = 1.5
"""The same without vectors: the best passage's BM25 score for each informative query word
(PubMedQA's questions: 2.6 or more nine times in ten; MedQA's vignettes: 0.77 or less)."""
MAX_QUERY_TERMS = 64
LARGE_INDEX = 20_000
"""Passages from which BM25 is given a query's rarer words only: below it every word is
searched (a small index's words each sit in a good share of it, and a search is fast)."""
RARE_TERMS = 12
"""In a large index: the rarest this many words of a query, of those in at most
:data:`COMMON_SHARE` of its passages (at least :data:`MIN_TERMS` words whatever their
share). A word in a twentieth of the index adds little to BM25's ranking and much to its time:
at 100,000 passages (``benchmarks/grounded.py``) BM25 with every word took 39 ms at the median
and 93 ms at the 95th percentile, with the rarer ones 22 and 38 ms."""
COMMON_SHARE = 0.05
MIN_TERMS = 3

STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves
""".split())


def query_terms(text: str) -> list[str]:
    """The query's distinct informative words, in order: lower-cased, accents off, no stop
    words, none of one letter."""
    folded = unicodedata.normalize("NFKD", text.lower())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    seen: dict[str, None] = {}
    for word in re.findall(r"\w+", folded):
        if len(word) > 1 and word not in STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)[:MAX_QUERY_TERMS]


def fts_match(terms: Sequence[str]) -> str:
    """An FTS5 query for any of ``terms``, each quoted (no word is read as an operator)."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


@dataclass(frozen=True)
class Retrieval:
    """What a search found."""

    query: str
    passages: list[Passage]
    """Best first; ``score`` is the fused score (or the one ranking's)."""
    grounded: bool
    """Whether the best passage clears the relevance floor."""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SearchSettings:
    """How a retriever ranks; the defaults are localmed's (the benchmark's winner)."""

    mode: str = "hybrid"
    """``hybrid``, ``bm25`` or ``dense`` (hybrid and dense need vectors)."""
    rrf_k: int = RRF_K
    candidates: int = CANDIDATES
    dense_floor: float = DENSE_FLOOR
    bm25_floor: float = BM25_FLOOR
    """Per informative query word."""


class Retriever:
    """Searches one index, with its embedding model where it has vectors."""

    def __init__(self, index: DocsIndex, embedder: Embedder | None = None,
                 settings: SearchSettings | None = None) -> None:
        self.index = index
        self.embedder = embedder
        settings = settings or SearchSettings()
        mode = settings.mode if embedder is not None else "bm25"
        self.settings = SearchSettings(mode, settings.rrf_k, settings.candidates,
                                       settings.dense_floor, settings.bm25_floor)

    @property
    def name(self) -> str:
        return self.index.path.stem

    def search(self, query: str, k: int = 5, *, vector: np.ndarray | None = None
               ) -> Retrieval:
        """The ``k`` best passages for ``query`` (``vector``: its embedding, where the caller
        has it already)."""
        settings = self.settings
        notes: list[str] = []
        terms = query_terms(query)
        embedding: Future[tuple[np.ndarray, str]] | None = None
        if settings.mode != "bm25" and self.embedder is not None and vector is None:
            # the engine embeds the query while SQLite ranks by BM25 (each lets go of the GIL)
            embedding = Future()
            threading.Thread(target=_settle, args=(embedding, self.embedder.embed_query, query),
                             name="localmed-query-embedding", daemon=True).start()
        lexical = self.index.bm25(fts_match(self.rarer(terms)), settings.candidates) \
            if settings.mode != "dense" else []
        dense: list[tuple[int, float]] = []
        if settings.mode != "bm25" and self.embedder is not None:
            if embedding is not None:
                vector, note = embedding.result()
                if note:
                    notes.append(note)
            dense = self.dense(vector, settings.candidates)
        if settings.mode == "bm25":
            ranked = lexical
        elif settings.mode == "dense":
            ranked = dense
        else:
            ranked = fuse([lexical, dense], settings.rrf_k)
        top = ranked[:k]
        passages = self.index.passages([i for i, _ in top], [s for _, s in top])
        if dense:
            best = dense[0][1]
            grounded = best >= settings.dense_floor
        else:
            best = lexical[0][1] if lexical else 0.0
            grounded = best / max(len(terms), 1) >= settings.bm25_floor
        return Retrieval(query, passages, grounded and bool(passages), notes)

    def rarer(self, terms: list[str]) -> list[str]:
        """The words of a query worth BM25's time in a large index (:data:`RARE_TERMS`); in a
        smaller one, all of them."""
        total = self.index.passage_count()
        if total <= LARGE_INDEX or len(terms) <= MIN_TERMS:
            return terms
        counts = self.index.document_counts(terms)
        order = [n for n in sorted(range(len(terms)), key=lambda n: counts[n]) if counts[n]]
        kept = [n for n in order if counts[n] <= COMMON_SHARE * total][:RARE_TERMS]
        if len(kept) < MIN_TERMS:
            kept = order[:MIN_TERMS]
        return [terms[n] for n in sorted(kept)]

    def dense(self, vector: np.ndarray, count: int) -> list[tuple[int, float]]:
        """(passage id, cosine) of the ``count`` nearest vectors, exactly."""
        ids, matrix = self.index.vectors()
        if not len(ids):
            return []
        count = min(count, len(ids))
        query = np.asarray(vector, dtype=np.float32)
        if matrix.shape[1] != query.shape[0]:
            return []
        from usearch.index import MetricKind
        from usearch.index import search as exact_search

        found = exact_search(matrix, query, count, MetricKind.IP, exact=True)
        keys = np.asarray(found.keys).reshape(-1)[:count]
        distances = np.asarray(found.distances).reshape(-1)[:count]
        # usearch's inner-product distance is 1 - dot
        return [(int(ids[key]), float(1.0 - d)) for key, d in zip(keys, distances, strict=True)]


def _settle(future: Future, work: Callable[..., object], *args: object) -> None:
    try:
        future.set_result(work(*args))
    except BaseException as exc:  # the caller's result() raises it
        future.set_exception(exc)


def fuse(rankings: Sequence[Sequence[tuple[int, float]]], k: int = RRF_K
         ) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: each passage scores the sum of 1 / (k + rank) over the rankings
    it is in; best first (ties: the order the first ranking gave)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (passage_id, _) in enumerate(ranking, start=1):
            scores[passage_id] = scores.get(passage_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])
