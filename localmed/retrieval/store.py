"""One document index: a single SQLite file (no server), read by any number of chats and
servers while one ``docs add`` writes it.

- ``files``: each indexed file (its path relative to the folder), with the size, mtime and
  sha256 it had when read, its page and passage counts, and why it could not be read, if so;
- ``passages``: every passage, with its file, page, heading path and character span;
- ``passages_fts``: SQLite's FTS5 over the passages (BM25, Porter stemming; external content,
  so the text is stored once);
- ``vectors``: a float16 embedding per passage, where the index has an embedding model.

A file's passages, their FTS rows and their vectors are written in one transaction with its
``files`` row: a run killed at any moment (power loss included: WAL, and SQLite's own
recovery) leaves every file either as it was or as it is now. ``PRAGMA user_version`` is the
format; a newer one is refused, not misread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import DiskFullError, DocsIndexError
from localmed.retrieval.chunk import Chunk

FORMAT = 1
"""The index format this localmed writes and reads (``PRAGMA user_version``)."""
APPLICATION_ID = 0x4C4D4458
"""``PRAGMA application_id`` of a localmed index ("LMDX"): any other SQLite file is refused."""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT,
    pages INTEGER NOT NULL DEFAULT 0,
    passages INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    notes TEXT,
    indexed_at REAL NOT NULL
);
CREATE TABLE passages (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    page INTEGER,
    heading TEXT NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX passages_file ON passages(file_id);
CREATE VIRTUAL TABLE passages_fts USING fts5(
    heading, text, content='passages', content_rowid='id',
    tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE vectors (
    passage_id INTEGER PRIMARY KEY REFERENCES passages(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class FileRecord:
    """What the index knows of one file."""

    path: str
    """Relative to the index's folder, with ``/`` between parts."""
    size: int
    mtime_ns: int
    sha256: str
    kind: str | None = None
    pages: int = 0
    passages: int = 0
    error: str | None = None
    """Why it could not be read (None: it was)."""
    notes: str | None = None


@dataclass(frozen=True)
class Passage:
    """A passage as a search or a citation gives it."""

    id: int
    source: str
    """Its file, relative to the index's folder."""
    page: int | None
    heading: tuple[str, ...]
    start: int
    end: int
    """Its span in the page's text (the file's text, for a file with no pages)."""
    text: str
    score: float = 0.0

    @property
    def where(self) -> str:
        """``guidelines/sepsis.pdf p. 3``: the file and page, as a clinician would look."""
        return self.source + (f" p. {self.page}" if self.page is not None else "")

    @property
    def first_line(self) -> str:
        line = next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")
        return line if len(line) <= 100 else line[:99] + "…"

    def to_json(self) -> dict[str, Any]:
        """``docs search --json``'s item (and the server's citation, with its id)."""
        return {"source": self.source, "page": self.page, "heading": " > ".join(self.heading),
                "text": self.text, "score": round(self.score, 6)}


class DocsIndex:
    """An open index file. ``writer=True`` takes the file's write lock (one ``docs add`` at a
    time); readers never wait for it."""

    def __init__(self, path: Path, *, create: bool = False, writer: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DocsIndexError(f"{self.path}: no such index")
        self._lock_fd: int | None = None
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA foreign_keys = ON")
            self._check_or_create(create)
            if writer:
                self._lock()
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise DocsIndexError(f"{self.path}: not a readable index ({exc})") from None
        except BaseException:
            self.close()
            raise
        self._vectors: tuple[int, np.ndarray, np.ndarray] | None = None
        self._vocabulary = False
        self._count: tuple[int, int] | None = None

    def _check_or_create(self, create: bool) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        if version == 0 and app == 0:
            tables = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables or not create:
                raise DocsIndexError(f"{self.path}: not a localmed document index")
            self.db.executescript(f"BEGIN; {_SCHEMA} PRAGMA application_id = {APPLICATION_ID}; "
                                  f"PRAGMA user_version = {FORMAT}; COMMIT;")
            return
        if app != APPLICATION_ID:
            raise DocsIndexError(f"{self.path}: not a localmed document index")
        if version > FORMAT:
            raise DocsIndexError(f"{self.path} was written by a newer localmed (index format "
                                 f"{version}; this one reads format {FORMAT}): update "
                                 "localmed, or remove the index and add the folder again")

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DocsIndexError(f"{self.path}: another localmed docs add is updating this "
                                 "index; wait for it to finish") from None
        self._lock_fd = fd

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self.db = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DocsIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing; a disk that fills is :class:`DiskFullError`, the transaction undone."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _disk_error(exc):
                raise DiskFullError(f"{self.path}: the disk is full ({exc})") from None
            raise

    # --- meta -----------------------------------------------------------------------------------

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        """Inside a transaction of the caller's."""
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                        (key, json.dumps(value)))

    def _touch(self) -> None:
        """A new generation: readers holding vectors in memory read them again."""
        self.set_meta("generation", int(self.meta("generation", 0)) + 1)

    # --- files ----------------------------------------------------------------------------------

    def files(self) -> dict[str, FileRecord]:
        rows = self.db.execute("SELECT path, size, mtime_ns, sha256, kind, pages, passages, "
                               "error, notes FROM files")
        return {row[0]: FileRecord(*row) for row in rows}

    def put_file(self, record: FileRecord, chunks: Sequence[Chunk],
                 vectors: np.ndarray | None) -> None:
        """Replace whatever the index held for ``record.path`` with these passages (and their
        vectors, one row each), in one transaction."""
        with self.transaction():
            self._delete(record.path)
            cursor = self.db.execute(
                "INSERT INTO files(path, size, mtime_ns, sha256, kind, pages, passages, error, "
                "notes, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.path, record.size, record.mtime_ns, record.sha256, record.kind,
                 record.pages, len(chunks), record.error, record.notes, time.time()))
            file_id = cursor.lastrowid
            for n, chunk in enumerate(chunks):
                heading = json.dumps(list(chunk.heading), ensure_ascii=False)
                row = self.db.execute(
                    "INSERT INTO passages(file_id, page, heading, start, end, text) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (file_id, chunk.page, heading, chunk.start, chunk.end, chunk.text))
                self.db.execute("INSERT INTO passages_fts(rowid, heading, text) "
                                "VALUES (?, ?, ?)", (row.lastrowid, heading, chunk.text))
                if vectors is not None:
                    self.db.execute("INSERT INTO vectors(passage_id, embedding) VALUES (?, ?)",
                                    (row.lastrowid, _blob(vectors[n])))
            self._touch()

    def touch_file(self, path: str, mtime_ns: int) -> None:
        """A file whose bytes did not change (only its time): the new time, nothing else."""
        with self.transaction():
            self.db.execute("UPDATE files SET mtime_ns = ? WHERE path = ?", (mtime_ns, path))

    def remove_files(self, paths: Iterable[str]) -> None:
        with self.transaction():
            for path in paths:
                self._delete(path)
            self._touch()

    def _delete(self, path: str) -> None:
        row = self.db.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            return
        self.db.execute("INSERT INTO passages_fts(passages_fts, rowid, heading, text) "
                        "SELECT 'delete', id, heading, text FROM passages WHERE file_id = ?",
                        row)
        self.db.execute("DELETE FROM files WHERE id = ?", row)  # passages, vectors cascade

    # --- vectors --------------------------------------------------------------------------------

    def missing_vectors(self, limit: int) -> list[tuple[int, str, str]]:
        """(id, heading, text) of passages with no vector yet, at most ``limit``."""
        rows = self.db.execute(
            "SELECT p.id, p.heading, p.text FROM passages p LEFT JOIN vectors v "
            "ON v.passage_id = p.id WHERE v.passage_id IS NULL ORDER BY p.id LIMIT ?", (limit,))
        return [(i, h, t) for i, h, t in rows]

    def put_vectors(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO vectors(passage_id, embedding) "
                                "VALUES (?, ?)", ((i, _blob(v)) for i, v in zip(ids, vectors, strict=True)))
            self._touch()

    def drop_vectors(self) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM vectors")
            self._touch()

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(passage ids, float32 matrix) of every vector, read once per generation."""
        generation = int(self.meta("generation", 0))
        if self._vectors is None or self._vectors[0] != generation:
            ids, blobs = [], []
            for passage_id, blob in self.db.execute(
                    "SELECT passage_id, embedding FROM vectors ORDER BY passage_id"):
                ids.append(passage_id)
                blobs.append(blob)
            if blobs:
                matrix = np.frombuffer(b"".join(blobs), dtype=np.float16)
                matrix = matrix.reshape(len(blobs), -1).astype(np.float32)
            else:
                matrix = np.zeros((0, 0), dtype=np.float32)
            self._vectors = (generation, np.asarray(ids, dtype=np.int64), matrix)
        return self._vectors[1], self._vectors[2]

    # --- reading --------------------------------------------------------------------------------

    def counts(self) -> tuple[int, int, int, int]:
        """(files indexed, files that could not be read, passages, vectors)."""
        files, failed = self.db.execute(
            "SELECT count(*), count(error) FROM files").fetchone()
        passages = self.db.execute("SELECT count(*) FROM passages").fetchone()[0]
        vectors = self.db.execute("SELECT count(*) FROM vectors").fetchone()[0]
        return files - failed, failed, passages, vectors

    def passage_count(self) -> int:
        """Passages in the index (read once per generation)."""
        generation = int(self.meta("generation", 0))
        if self._count is None or self._count[0] != generation:
            total = self.db.execute("SELECT count(*) FROM passages").fetchone()[0]
            self._count = (generation, total)
        return self._count[1]

    def passages(self, ids: Sequence[int], scores: Sequence[float] | None = None
                 ) -> list[Passage]:
        """The passages ``ids`` names, in that order (with ``scores``, each its own)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {row[0]: row for row in self.db.execute(
            "SELECT p.id, f.path, p.page, p.heading, p.start, p.end, p.text FROM passages p "
            f"JOIN files f ON f.id = p.file_id WHERE p.id IN ({marks})", list(ids))}
        out = []
        for n, passage_id in enumerate(ids):
            if (row := rows.get(int(passage_id))) is None:
                continue
            out.append(Passage(row[0], row[1], row[2], tuple(json.loads(row[3])), row[4],
                               row[5], row[6], float(scores[n]) if scores is not None else 0.0))
        return out

    def document_counts(self, words: Sequence[str]) -> list[int]:
        """How many passages hold each word, as FTS5 stems it (``treatments`` counts
        ``treatment``), in order; read from FTS5's own vocabulary, no passage scanned."""
        db = self.db
        if not self._vocabulary:
            tokenizer = "tokenize='porter unicode61 remove_diacritics 2'"
            db.execute(f"CREATE VIRTUAL TABLE temp.query_words USING fts5(word, {tokenizer})")
            db.execute("CREATE VIRTUAL TABLE temp.query_stems USING "
                       "fts5vocab(temp, query_words, 'instance')")
            db.execute("CREATE VIRTUAL TABLE temp.passage_terms USING "
                       "fts5vocab(main, passages_fts, 'row')")
            self._vocabulary = True
        db.execute("DELETE FROM temp.query_words")
        db.executemany("INSERT INTO temp.query_words(rowid, word) VALUES (?, ?)",
                       list(enumerate(words)))
        stems: dict[int, str] = {}
        for row, term in db.execute("SELECT doc, term FROM temp.query_stems ORDER BY doc, "
                                    "offset"):
            stems.setdefault(row, term)
        counts = []
        for n in range(len(words)):
            found = db.execute("SELECT doc FROM temp.passage_terms WHERE term = ?",
                               (stems.get(n, ""),)).fetchone()
            counts.append(found[0] if found else 0)
        return counts

    def bm25(self, match: str, limit: int) -> list[tuple[int, float]]:
        """(passage id, BM25 score, higher is better) of the best ``limit`` for an FTS5 query."""
        if not match:
            return []
        rows = self.db.execute(
            "SELECT rowid, rank FROM passages_fts WHERE passages_fts MATCH ? "
            "ORDER BY rank LIMIT ?", (match, limit))
        return [(i, -score) for i, score in rows]


def _blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def _disk_error(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL, or a write that failed (SQLite says "disk I/O error" for EFBIG, EDQUOT)."""
    text = str(exc).lower()
    return "full" in text or "disk i/o" in text


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, DiskFullError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
