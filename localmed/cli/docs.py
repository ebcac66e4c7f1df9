"""``localmed docs``: the clinic's own documents indexed on this machine (add, list, remove,
search). Offline: nothing here opens a connection."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from rich import box
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from localmed.cli.common import console, err_console, positive
from localmed.errors import DiskFullError, DocsIndexError, LocalmedError


class _Bars:
    """``docs add``'s progress on stderr: files (or passages) done of all, pages, passages a
    second, and the time left."""

    def __init__(self, console_) -> None:
        self.console = console_
        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             TaskProgressColumn(),
                             TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}"
                                        " · {task.fields[pages]} pages · "
                                        "{task.fields[rate]} passages/s"),
                             TimeRemainingColumn(), console=console_, transient=False)
        self.task: int | None = None
        self.pages = self.passages = 0
        self.started = time.monotonic()

    def start(self, files: int, what: str) -> None:
        if not files:
            return
        self.bars.start()
        if self.task is not None:
            self.bars.stop_task(self.task)
        self.started = time.monotonic()
        self.passages = 0
        label = "indexing" if what == "files" else "embedding"
        self.task = self.bars.add_task(label, total=files, unit=what, pages=self.pages,
                                       rate="–")

    def advance(self, pages: int, passages: int) -> None:
        self.pages += pages
        self.passages += passages
        elapsed = max(time.monotonic() - self.started, 1e-6)
        if self.task is not None:
            self.bars.update(self.task, advance=1, pages=self.pages,
                             rate=f"{self.passages / elapsed:.0f}")

    def say(self, text: str) -> None:
        self.console.print(f"[yellow]skipped:[/] {escape(text)}", soft_wrap=True)


@contextlib.contextmanager
def _bars() -> Iterator[_Bars]:
    bars = _Bars(err_console())
    try:
        yield bars
    finally:
        bars.bars.stop()


def embedder_spec(name: str):
    """The embedding model ``--embed`` names (registry id, pulled name or GGUF path)."""
    from localmed.chat import resolve_model
    from localmed.registry import Registry
    from localmed.retrieval.embedder import EmbedderSpec, identity

    registry = Registry.load()
    named = registry.get(name)
    if named is not None and named.kind != "embedding":  # said before looking for its file
        raise LocalmedError(f"{named.id} is a chat model, not an embedding model: --embed "
                            "takes one of " + ", ".join(e.id for e in registry.values()
                                                        if e.kind == "embedding"))
    model = resolve_model(name, registry)
    entry = model.entry
    query_path = ""
    if entry is not None and entry.query_encoder:
        query_path = str(resolve_model(entry.query_encoder, registry).path)
    path = model.path.resolve()
    return EmbedderSpec(entry.id if entry else path.name, str(path), identity(path),
                        document_prefix=entry.document_prefix if entry else "",
                        query_prefix=entry.query_prefix if entry else "",
                        query_path=query_path, pooling_override=entry.pooling if entry else "")


def cmd_docs_add(args: argparse.Namespace) -> int:
    from localmed import library
    from localmed.retrieval import catalog
    from localmed.retrieval.embedder import Embedder, EmbedderSpec
    from localmed.retrieval.indexer import update
    from localmed.retrieval.store import DocsIndex

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise LocalmedError(f"{folder}: " + ("not a folder" if folder.exists() else
                                             "no such folder"))
    folder = folder.resolve()
    name = catalog.check_name(args.name or catalog.default_name(folder))
    path = library.index_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    err = err_console()
    spec = None
    if args.embed and args.embed.lower() != "none":
        spec = embedder_spec(args.embed)
    created = not path.exists()
    try:
        index = DocsIndex(path, create=True, writer=True)
    except BaseException:
        if created:
            path.unlink(missing_ok=True)
        raise
    embedder = None
    try:
        stored = index.meta("embedder")
        if args.embed and args.embed.lower() == "none" and stored:
            index.drop_vectors()
            with index.transaction():
                index.db.execute("DELETE FROM meta WHERE key = 'embedder'")
            err.print(f"{escape(name)}: vectors of {escape(stored['name'])} dropped; BM25 only")
        elif spec is None and stored:
            spec = EmbedderSpec.from_json(stored)
        if spec is not None:
            embedder = Embedder(spec, threads=args.threads)
            known = stored is not None and EmbedderSpec.from_json(stored).same_model(spec)
            if not known:  # a model new to the index is checked now, before a file is read
                with err.status(f"loading the embedding model {spec.name}…"):
                    embedder.load()
        with _bars() as bars:
            report = update(index, folder, embedder=embedder, progress=bars,
                            max_file_bytes=args.max_file_mb * 2**20)
        files, failed, passages, _ = index.counts()
    except KeyboardInterrupt:
        done = index.counts()[0] if index.db is not None else 0
        err.print(f"[yellow]stopped[/]: {escape(name)} holds the {done} files finished before "
                  "it; run the same docs add to go on from there")
        raise
    except DiskFullError as full:
        done = index.counts()[0]
        raise DiskFullError(f"the disk filled while indexing {folder}: {name} keeps the {done} "
                            f"files finished before it; free some space and run docs add again "
                            f"({full})") from None
    except BaseException:
        if created and index.db is not None and not index.files():
            index.close()
            _remove_index_files(path)  # a new index that never held a file is not left behind
        raise
    finally:
        if embedder is not None:
            embedder.close()
        index.close()
    out = console()
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if report.failing:
        err.print(f"[yellow]note:[/] {report.failing} unchanged files could not be read before "
                  f"either (localmed docs list {escape(name)} says why)")
    rate = ""
    if report.pages and report.seconds:
        rate = f" ({report.pages / report.seconds:.1f} pages/s"
        rate += (f", {report.embedded / report.seconds:.0f} passages embedded/s)"
                 if report.embedded else ")")
    out.print(f"[bold]{escape(name)}[/]: {report.summary()} in {report.seconds:.1f} s{rate}")
    kind = f"BM25 + {spec.name} vectors" if spec is not None else \
        "BM25 only (--embed MODEL adds vectors)"
    out.print(f"  {files} files, {passages} passages, {kind}; {path}")
    if not files and not failed:
        out.print(f"  [yellow]no documents found[/] in {escape(str(folder))} "
                  "(PDF, HTML, Markdown, text or DOCX)")
    else:
        out.print(f"  search it: localmed docs search {escape(name)} \"QUESTION\"; chat with "
                  f"it: localmed chat MODEL --docs {escape(name)}")
    return 0


def cmd_docs_list(args: argparse.Namespace) -> int:
    from localmed.retrieval import catalog
    from localmed.retrieval.store import DocsIndex

    out = console()
    if args.name:
        with DocsIndex(catalog.index_file(args.name)) as index:
            records = sorted(index.files().values(), key=lambda r: r.path)
            folder = index.meta("folder", "?")
        if args.json:
            print(json.dumps([{"source": r.path, "kind": r.kind, "pages": r.pages,
                               "passages": r.passages, "error": r.error, "notes": r.notes}
                              for r in records], indent=2))
            return 0
        table = Table(title=f"{args.name}  ({folder})", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("file", "kind", "pages", "passages", "note"):
            table.add_column(column, overflow="fold")
        for r in records:
            table.add_row(escape(r.path), r.kind or "", str(r.pages or ""),
                          str(r.passages), escape(r.error or r.notes or ""),
                          style="yellow" if r.error else None)
        out.print(table)
        return 0
    summaries = []
    for name in catalog.names():
        try:
            summaries.append(catalog.summary(name))
        except DocsIndexError as bad:
            err_console().print(f"[yellow]note:[/] {escape(str(bad))}", soft_wrap=True)
    if args.json:
        print(json.dumps([s.__dict__ for s in summaries], indent=2))
        return 0
    if not summaries:
        out.print("no document indexes yet: localmed docs add FOLDER makes one")
        return 0
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "folder", "files", "passages", "embedding model"):
        table.add_column(column, overflow="fold")
    for s in summaries:
        files = f"{s.files}" + (f" (+{s.unreadable} not readable)" if s.unreadable else "")
        vectors = s.embedder + ("" if s.vectors == s.passages else
                                f" ({s.vectors} of {s.passages} embedded)") \
            if s.embedder else "none (BM25)"
        table.add_row(escape(s.name), escape(s.folder), files, str(s.passages),
                      escape(vectors))
    out.print(table)
    return 0


def cmd_docs_remove(args: argparse.Namespace) -> int:
    from localmed.retrieval import catalog
    from localmed.retrieval.store import DocsIndex

    path = catalog.index_file(args.name)
    with DocsIndex(path, writer=True):  # refused while a docs add writes it
        pass
    _remove_index_files(path)
    console().print(f"removed the index {escape(args.name)} (the documents themselves are "
                    "untouched)")
    return 0


def _remove_index_files(path: Path) -> None:
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)


def cmd_docs_search(args: argparse.Namespace) -> int:
    from localmed.retrieval import catalog
    from localmed.retrieval.search import SearchSettings

    settings = SearchSettings(mode=args.mode) if args.mode else SearchSettings()
    if not args.query.strip():
        raise LocalmedError("the query is empty")
    with err_console().status("searching…") if not args.json else contextlib.nullcontext():
        retriever = catalog.open_retriever(args.name, threads=args.threads, settings=settings)
        try:
            found = retriever.search(args.query, k=args.k)
        finally:
            catalog.close_retriever(retriever)
    for note in found.notes:
        err_console().print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if args.json:
        print(json.dumps([p.to_json() for p in found.passages], indent=2, ensure_ascii=False))
        return 0
    out = console()
    if not found.passages or not found.grounded:
        out.print(f"nothing in {escape(args.name)} on this"
                  + (" (the nearest passages below do not clear the relevance floor)"
                     if found.passages else ""))
    for n, passage in enumerate(found.passages, start=1):
        heading = " > ".join(passage.heading)
        out.print(f"[bold][{n}] {escape(passage.where)}[/]"
                  + (f"  [dim]{escape(heading)}[/]" if heading else "")
                  + f"  [dim]score {passage.score:.4g}[/]")
        text = " ".join(passage.text.split())
        out.print("    " + escape(text if len(text) <= 400 else text[:399] + "…"),
                  soft_wrap=False)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``docs`` and its subcommands."""
    p = sub.add_parser("docs", help="index the clinic's own documents (PDF, HTML, Markdown, "
                       "text, DOCX) for chat and serve to answer from (offline)")
    docs = p.add_subparsers(dest="docs_command", required=True, metavar="SUBCOMMAND",
                            parser_class=type(p))
    a = docs.add_parser("add", help="index a folder, or bring its index up to date")
    a.add_argument("folder", metavar="FOLDER")
    a.add_argument("--name", help="the index's name (default: the folder's)")
    a.add_argument("--embed", metavar="MODEL", help="an embedding model (registry id such as "
                   "nomic-embed-text-v1.5, or a GGUF): dense vectors beside BM25; 'none' drops "
                   "them (default: the index's own, else none)")
    a.add_argument("--threads", type=positive, help="CPU threads for the embedding model")
    a.add_argument("--max-file-mb", type=positive, default=200, help="files larger than this "
                   "are skipped (default 200)")
    a.set_defaults(func=cmd_docs_add)
    ls = docs.add_parser("list", help="the indexes (or one index's files, and why any could "
                         "not be read)")
    ls.add_argument("name", metavar="NAME", nargs="?")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_docs_list)
    rm = docs.add_parser("remove", help="delete an index (not the documents)")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=cmd_docs_remove)
    s = docs.add_parser("search", help="the passages of an index nearest a question")
    s.add_argument("name", metavar="NAME")
    s.add_argument("query", metavar="QUERY")
    s.add_argument("-k", type=positive, default=5, help="passages to show (default 5)")
    s.add_argument("--json", action="store_true", help="a JSON list of {source, page, heading, "
                   "text, score}")
    s.add_argument("--mode", choices=("hybrid", "bm25", "dense"), help="default: hybrid where "
                   "the index has vectors, else bm25")
    s.add_argument("--threads", type=positive, help="CPU threads for the embedding model")
    s.set_defaults(func=cmd_docs_search)
