"""A folder kept in step with its index, one file at a time.

A file whose size and modification time are what the index recorded is not opened; one whose
bytes hash the same is only re-dated; any other is read, cut and (with an embedding model)
embedded, then written in one transaction. A file that cannot be read is recorded with its
reason (and not read again until it changes), and the rest of the folder goes on. Files gone
from the folder leave the index. A run that stops for any reason — Ctrl-C, a kill, power loss,
a full disk — leaves an index that holds every file finished before it, and the next run goes
on from there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from localmed.errors import DocsIndexError, DocumentError
from localmed.retrieval.chunk import Chunker
from localmed.retrieval.embedder import Embedder, EmbedderSpec
from localmed.retrieval.parse import MAX_FILE_BYTES, indexable, parse
from localmed.retrieval.store import DocsIndex, FileRecord


class IndexProgress(Protocol):
    """Where an update says how far it is (the command line draws a bar)."""

    def start(self, files: int, what: str) -> None:
        """``files`` to read (or passages to embed, ``what`` says which)."""

    def advance(self, pages: int, passages: int) -> None:
        """One more done, with the pages and passages it gave."""

    def say(self, text: str) -> None:
        """A line for the user (a file that could not be read)."""


class QuietProgress:
    def start(self, files: int, what: str) -> None:
        pass

    def advance(self, pages: int, passages: int) -> None:
        pass

    def say(self, text: str) -> None:
        pass


@dataclass
class UpdateReport:
    """What one ``docs add`` did."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)
    """One line per file that could not be read in this run."""
    failing: int = 0
    """Files that could not be read before and have not changed since."""
    pages: int = 0
    passages: int = 0
    embedded: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``3 changed, 1 removed, 57 unchanged`` (and what was added or failed)."""
        parts = [f"{n} {word}" for n, word in ((self.added, "added"),
                                               (self.changed, "changed"),
                                               (self.removed, "removed")) if n]
        parts.append(f"{self.unchanged} unchanged")
        if self.failed or self.failing:
            parts.append(f"{len(self.failed) + self.failing} not readable")
        return ", ".join(parts)


@dataclass(frozen=True)
class Found:
    """A file on disk (or one that could not be looked at: ``error``)."""

    path: Path
    relative: str
    size: int = 0
    mtime_ns: int = 0
    error: str = ""


def scan(folder: Path) -> Iterator[Found]:
    """Every file ``docs add`` indexes under ``folder``, following symbolic links once (a link
    back up the tree is a loop, said once, not followed)."""
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        directory = stack.pop()
        try:
            info = directory.stat()
        except OSError as exc:
            yield Found(directory, _relative(directory, folder), error=_why(exc))
            continue
        if (info.st_dev, info.st_ino) in seen:
            yield Found(directory, _relative(directory, folder),
                        error="a symbolic link loop (a link to a folder it is in): skipped")
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            yield Found(directory, _relative(directory, folder), error=_why(exc))
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            try:
                info = path.stat()  # follows links
            except OSError as exc:
                if indexable(path) or entry.is_symlink():
                    yield Found(path, _relative(path, folder), error=_why(exc))
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append(path)
            elif stat.S_ISREG(info.st_mode) and indexable(path):
                yield Found(path, _relative(path, folder), info.st_size, info.st_mtime_ns)


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix() if path != folder else "."


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop: skipped"
    if exc.errno == errno.ENOENT:
        return "a symbolic link to nothing: skipped"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read: permission denied"
    return f"cannot be read: {exc.strerror}"


def update(index: DocsIndex, folder: Path, *, chunker: Chunker | None = None,
           embedder: Embedder | None = None, max_file_bytes: int = MAX_FILE_BYTES,
           progress: IndexProgress | None = None) -> UpdateReport:
    """Bring ``index`` in step with ``folder`` (see the module's docstring)."""
    progress = progress or QuietProgress()
    chunker = chunker or Chunker()
    report = UpdateReport()
    started = time.monotonic()
    _check_settings(index, folder, chunker, embedder, report)
    known = index.files()
    found = list(scan(folder))
    on_disk = {f.relative for f in found if not f.error}
    gone = [path for path in known if path not in on_disk]
    for item in found:
        if item.error:
            report.failed.append(f"{item.path}: {item.error}")
            progress.say(report.failed[-1])
    if gone:
        index.remove_files(gone)
        report.removed = len(gone)
    recut = index.meta("chunker") != chunker.label
    work = []
    for item in found:
        if item.error:
            continue
        record = known.get(item.relative)
        if record is not None and not recut and (record.size, record.mtime_ns) == \
                (item.size, item.mtime_ns):
            if record.error is None:
                report.unchanged += 1
            else:
                report.failing += 1
            continue
        work.append((item, record))
    with index.transaction():
        index.set_meta("chunker", chunker.label)
    progress.start(len(work), "files")
    for item, record in work:
        pages, passages = _index_file(index, item, record, chunker, embedder, max_file_bytes,
                                      report, progress, recut)
        progress.advance(pages, passages)
    if embedder is not None:
        _embed_missing(index, embedder, report, progress)
        if embedder.loaded:  # the vector size and pooling it loaded with
            with index.transaction():
                index.set_meta("embedder", embedder.completed().to_json())
    report.seconds = time.monotonic() - started
    return report


def _check_settings(index: DocsIndex, folder: Path, chunker: Chunker,
                    embedder: Embedder | None, report: UpdateReport) -> None:
    """The index's folder and embedding model, recorded the first time; another embedding
    model drops every vector (they are made again below, and the report says so)."""
    recorded = index.meta("folder")
    if recorded is not None and recorded != str(folder):
        raise DocsIndexError(f"{index.path.stem} indexes {recorded}, not {folder}: give another "
                             "--name, or docs remove it first")
    with index.transaction():
        index.set_meta("folder", str(folder))
    if embedder is None:
        return
    spec = embedder.spec
    old = index.meta("embedder")
    if old is not None and EmbedderSpec.from_json(old).same_model(spec):
        return
    if old is not None:
        count = index.counts()[3]
        index.drop_vectors()
        report.notes.append(f"the embedding model changed ({EmbedderSpec.from_json(old).name} "
                            f"→ {spec.name}): every passage is embedded again"
                            + (f" ({count} had vectors)" if count else ""))
    with index.transaction():
        index.set_meta("embedder", spec.to_json())


def _index_file(index: DocsIndex, item: Found, record: FileRecord | None, chunker: Chunker,
                embedder: Embedder | None, max_file_bytes: int, report: UpdateReport,
                progress: IndexProgress, recut: bool) -> tuple[int, int]:
    """Read one file and write what it gives (or why it gave nothing); (pages, passages)."""
    fresh = FileRecord(item.relative, item.size, item.mtime_ns, "")
    try:
        if item.size > max_file_bytes:
            raise DocumentError(item.path, f"{item.size / 2**20:,.1f} MB, over the "
                                f"{max_file_bytes / 2**20:,.0f} MB limit (--max-file-mb)")
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            raise DocumentError(item.path, _why(exc)) from None
        digest = hashlib.sha256(data).hexdigest()
        fresh = FileRecord(item.relative, len(data), item.mtime_ns, digest)
        if record is not None and record.sha256 == digest and not recut \
                and record.error is None:
            index.touch_file(item.relative, item.mtime_ns)  # the same bytes, a new date
            report.unchanged += 1
            return 0, 0
        document = parse(item.path, data)
        chunks = chunker.chunks(document)
        vectors = None
        if embedder is not None:
            texts = [embedding_text(c.heading, c.text, chunker) for c in chunks]
            vectors, truncated = embedder.embed_documents(texts)
            if truncated:
                report.notes.append(f"{item.relative}: {truncated} passages were longer than "
                                    "the embedding model's context (their ends were not "
                                    "embedded)")
            report.embedded += len(chunks)
        index.put_file(FileRecord(item.relative, len(data), item.mtime_ns, digest,
                                  document.kind, len(document.pages), len(chunks),
                                  notes="; ".join(document.notes) or None), chunks, vectors)
    except DocumentError as failed:
        index.put_file(FileRecord(fresh.path, fresh.size, fresh.mtime_ns, fresh.sha256,
                                  error=failed.reason), (), None)
        report.failed.append(str(failed))
        progress.say(str(failed))
        return 0, 0
    if record is None:
        report.added += 1
    else:
        report.changed += 1
    report.pages += len(document.pages)
    report.passages += len(chunks)
    for note in document.notes:
        progress.say(f"{item.path}: {note}")
    return len(document.pages), len(chunks)


def embedding_text(heading: tuple[str, ...], text: str, chunker: Chunker) -> str:
    """What is embedded for a passage: its heading path above its text (a guideline's
    section title says what a paragraph is about); GPT4All's recipe embeds the text alone."""
    if chunker.name == "fixed" or not heading:
        return text
    return " > ".join(heading) + "\n" + text


def _embed_missing(index: DocsIndex, embedder: Embedder, report: UpdateReport,
                   progress: IndexProgress) -> None:
    """Embed passages that have no vector (a new embedding model, or a run stopped while it
    embedded them), in batches that each commit."""
    import json

    _, _, passages, vectors = index.counts()
    missing = passages - vectors
    if not missing:
        return
    chunker = Chunker.parse(index.meta("chunker"))
    progress.start(missing, "passages")
    while rows := index.missing_vectors(embedder.BATCH * 4):
        texts = [embedding_text(tuple(json.loads(h)), t, chunker) for _, h, t in rows]
        matrix, _ = embedder.embed_documents(texts)
        index.put_vectors([i for i, _, _ in rows], matrix)
        report.embedded += len(rows)
        for _ in rows:
            progress.advance(0, 1)
