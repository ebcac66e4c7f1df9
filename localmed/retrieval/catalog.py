"""The indexes on this machine, by name: what ``docs list`` shows, and how chat, serve and
``docs search`` open one with its embedding model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localmed import library
from localmed.errors import DocsIndexError
from localmed.retrieval.embedder import Embedder, EmbedderSpec
from localmed.retrieval.search import Retriever, SearchSettings
from localmed.retrieval.store import DocsIndex

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME.match(name) or name.endswith(library.INDEX_SUFFIX):
        raise DocsIndexError(f"'{name}' cannot name an index: use letters, digits, '.', '_' "
                             "and '-' (up to 64, starting with a letter or digit)")
    return name


def default_name(folder: Path) -> str:
    """An index's name from its folder's (``Clinic Guidelines 2026`` → ``clinic-guidelines-2026``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-._").lower()
    return name[:64] or "docs"


def names() -> list[str]:
    folder = library.docs_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob(f"*{library.INDEX_SUFFIX}") if p.is_file())


def index_file(name: str) -> Path:
    """The index called ``name``, which must exist (else the names there are)."""
    path = library.index_path(check_name(name))
    if not path.is_file():
        known = names()
        raise DocsIndexError(f"no document index called '{name}'"
                             + (f" (there are: {', '.join(known)})" if known else
                                " (there is none yet: localmed docs add FOLDER makes one)"))
    return path


@dataclass(frozen=True)
class IndexSummary:
    name: str
    folder: str
    files: int
    unreadable: int
    passages: int
    vectors: int
    embedder: str
    """The embedding model's name ("": BM25 only)."""


def summary(name: str) -> IndexSummary:
    with DocsIndex(index_file(name)) as index:
        files, failed, passages, vectors = index.counts()
        spec = index.meta("embedder")
        return IndexSummary(name, index.meta("folder", "?"), files, failed, passages, vectors,
                            EmbedderSpec.from_json(spec).name if spec else "")


def open_retriever(name: str, *, threads: int | None = None,
                   settings: SearchSettings | None = None) -> Retriever:
    """The index ``name`` opened for reading, with its embedding model loaded in its engine
    process where it has vectors (the caller closes both: :func:`close_retriever`)."""
    index = DocsIndex(index_file(name))
    embedder = None
    try:
        spec = index.meta("embedder")
        if spec and index.counts()[3]:
            embedder = Embedder(EmbedderSpec.from_json(spec), threads=threads)
    except BaseException:
        index.close()
        raise
    return Retriever(index, embedder, settings or SearchSettings())


def close_retriever(retriever: Retriever) -> None:
    if retriever.embedder is not None:
        retriever.embedder.close()
    retriever.index.close()
