"""Passages and queries as vectors: an embedding GGUF in an engine process of its own, like the
chat model's (:class:`~localmed.runtimes.batch_process.BatchClient`), so llama.cpp never runs in
the app's process and a crash there is one line, not the app's end.

An index records which model embedded it (:class:`EmbedderSpec`: the file's identity, its
vector size, the prefixes its model card asks for, such as nomic's ``search_document:``); a
search embeds the query with the same model, or with its query encoder where the model has one
(MedCPT's article encoder is searched with its query encoder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import DocsIndexError

_EDGE = 2**20


@dataclass(frozen=True)
class EmbedderSpec:
    """The embedding model an index was made with (kept in the index)."""

    name: str
    """The registry id, else the file's name."""
    path: str
    identity: str
    """Size and hashes of the file's first and last MiB: the same model, wherever it is."""
    document_prefix: str = ""
    query_prefix: str = ""
    query_path: str = ""
    """A separate query encoder's GGUF (MedCPT); "": queries use this model too."""
    pooling_override: str = ""
    """The registry's pooling for a GGUF that declares none (MedCPT)."""
    dimensions: int = 0
    pooling: str = ""
    """What the engine pooled by (filled in when it loads)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbedderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def same_model(self, other: EmbedderSpec) -> bool:
        return (self.identity, self.document_prefix, self.query_prefix) == \
            (other.identity, other.document_prefix, other.query_prefix)


def identity(path: Path) -> str:
    """``size:sha256(first MiB + last MiB)`` of a model file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(_EDGE))
        if size > 2 * _EDGE:
            fh.seek(size - _EDGE)
            digest.update(fh.read(_EDGE))
    return f"{size}:{digest.hexdigest()[:32]}"


class Embedder:
    """An embedding model in its engine process (a query encoder beside it where the spec names
    one), started when first needed: a ``docs add`` with nothing to embed never loads it.
    ``client`` joins an engine another process already runs."""

    BATCH = 64
    """Passages sent to the engine at once (it packs them into batches of 512 tokens)."""

    def __init__(self, spec: EmbedderSpec, *, threads: int | None = None,
                 client: Any = None, query_client: Any = None) -> None:
        self.spec = spec
        self.threads = threads
        for path in (spec.path, spec.query_path):
            if path and not Path(path).is_file():
                raise DocsIndexError(f"the embedding model {spec.name} is not at {path} any "
                                     "more: put it back, or give --embed MODEL to re-embed the "
                                     "index with another")
        self._client, self._query_client = client, query_client or client
        if client is not None:
            self._check()

    @property
    def loaded(self) -> bool:
        return self._client is not None

    def load(self) -> None:
        """Start the engine (and the query encoder's) now."""
        if self._client is not None:
            return
        from localmed.runtimes.batch_process import BatchClient, BatchOptions

        spec = self.spec
        options = BatchOptions(0, threads=self.threads, embedding=True,
                               pooling=spec.pooling_override)
        self._client = BatchClient(Path(spec.path), options)
        try:
            self._query_client = BatchClient(Path(spec.query_path), options) \
                if spec.query_path else self._client
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        if self._query_client.ready.embedding_size != self._client.ready.embedding_size:
            raise DocsIndexError(f"{self.spec.name}: its query encoder makes vectors of "
                                 f"{self._query_client.ready.embedding_size} numbers and its "
                                 f"document encoder {self._client.ready.embedding_size}")

    @property
    def n_ctx(self) -> int:
        """Tokens a query may have (the query encoder's batch)."""
        self.load()
        return self._query_client.ready.n_ctx

    @property
    def dimensions(self) -> int:
        self.load()
        return self._client.ready.embedding_size

    @property
    def ready(self) -> Any:
        """The document encoder's :class:`~localmed.runtimes.messages.Ready`."""
        self.load()
        return self._client.ready

    def completed(self) -> EmbedderSpec:
        """The spec with what loading told: vector size and pooling."""
        return dataclasses.replace(self.spec, dimensions=self.dimensions,
                                   pooling=self.ready.pooling)

    def embed_documents(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors of passages (the document prefix before each); and how many were longer
        than the model's context (cut to it)."""
        result = self.embed_raw([self.spec.document_prefix + t for t in texts])
        return result.vectors, result.truncated

    def embed_raw(self, texts: list[str]) -> Any:
        """:class:`~localmed.runtimes.embedding.Embeddings` of ``texts`` as they are, by the
        document encoder (no prefix): what ``/v1/embeddings`` answers. Sent :data:`BATCH` at a
        time, so a client's thousand texts do not hold up another's query for their whole
        length (the engine takes its messages in turn)."""
        from localmed.runtimes.embedding import Embeddings

        self.load()
        parts = [self._client.embed(texts[at:at + self.BATCH])
                 for at in range(0, len(texts), self.BATCH)]
        vectors = np.concatenate([p.vectors for p in parts]) if parts else \
            np.zeros((0, self.dimensions), dtype=np.float32)
        return Embeddings(vectors, sum(p.tokens for p in parts),
                          sum(p.truncated for p in parts))

    def embed_query(self, text: str) -> tuple[np.ndarray, str]:
        """The query's vector, and a note when it was longer than the model's context: then
        it is embedded in pieces that fit, and their mean stands for it (a long vignette's
        every part counts, not just its beginning)."""
        prefixed = self.spec.query_prefix + text
        n_ctx = self.n_ctx  # (loads)
        tokens = len(self._query_client.tokenize(prefixed))
        if tokens <= n_ctx:
            return self._query_client.embed([prefixed]).vectors[0], ""
        pieces = _pieces(text, max(1, -(-tokens // (n_ctx - 16))))
        result = self._query_client.embed([self.spec.query_prefix + p for p in pieces])
        mean = result.vectors.mean(axis=0)
        note = (f"the query has {tokens} tokens, more than {self.spec.name}'s {n_ctx}: "
                f"it was embedded in {len(pieces)} pieces")
        return mean / max(float(np.linalg.norm(mean)), 1e-12), note

    def close(self) -> None:
        for client in {id(c): c for c in (self._client, self._query_client)
                       if c is not None}.values():
            client.close()
        self._client = self._query_client = None


def _pieces(text: str, count: int) -> list[str]:
    """``text`` in ``count`` runs of whole words of about equal length."""
    words = re.findall(r"\S+\s*", text)
    size = -(-len(text) // count)
    pieces, current = [], ""
    for word in words:
        if current and len(current) + len(word) > size:
            pieces.append(current.strip())
            current = ""
        current += word
    if current.strip():
        pieces.append(current.strip())
    return pieces
