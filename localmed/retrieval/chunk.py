"""Passages cut from a document's blocks, each a span of one page's text.

localmed's default (:func:`section_chunks`) keeps a guideline's section together: consecutive
blocks under one heading path make a passage until it would pass ``max_chars``; a passage never
crosses a heading or a page, and a block too long alone is cut at sentence ends. GPT4All's
LocalDocs recipe (:func:`fixed_chunks`, for the benchmark beside it) cuts each page into
512-character runs of words, whatever the structure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from localmed.retrieval.document import Block, Page, ParsedDocument

SECTION_CHARS = 1000
"""The longest passage of the default chunker: about 250 tokens, inside the 256-512 tokens the
small embedding models were trained on, and a few of them fit a 4096-token prompt."""
GPT4ALL_CHARS = 512
"""GPT4All LocalDocs' default chunk size, in characters."""


@dataclass(frozen=True)
class Chunk:
    """A passage: ``page.text[start:end]``, under ``heading``."""

    page: int | None
    heading: tuple[str, ...]
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Chunker:
    """How an index cuts its passages (kept in the index: a change re-cuts every file)."""

    name: str = "sections"
    """``sections`` (localmed's) or ``fixed`` (GPT4All's)."""
    max_chars: int = SECTION_CHARS

    def chunks(self, document: ParsedDocument) -> list[Chunk]:
        if self.name == "fixed":
            return fixed_chunks(document, self.max_chars)
        return section_chunks(document, self.max_chars)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.max_chars}"

    @classmethod
    def parse(cls, label: str) -> Chunker:
        name, _, size = label.partition(":")
        if name not in ("sections", "fixed") or not size.isdigit() or int(size) < 64:
            raise ValueError(f"not a chunker: {label!r}")
        return cls(name, int(size))


def section_chunks(document: ParsedDocument, max_chars: int = SECTION_CHARS) -> list[Chunk]:
    out: list[Chunk] = []
    for page in document.pages:
        group: list[Block] = []
        for block in page.blocks:
            if group and (block.heading != group[0].heading or
                          block.end - group[0].start > max_chars):
                out += _pack(page, group, max_chars)
                group = []
            group.append(block)
        if group:
            out += _pack(page, group, max_chars)
    return out


def _pack(page: Page, blocks: list[Block], max_chars: int) -> list[Chunk]:
    """One passage for blocks that fit together; a block too long alone, in pieces."""
    if blocks[-1].end - blocks[0].start <= max_chars:
        return [_chunk(page, blocks[0].heading, blocks[0].start, blocks[-1].end)]
    out = []
    for block in blocks:
        for start, end in _pieces(page.text, block.start, block.end, max_chars):
            out.append(_chunk(page, block.heading, start, end))
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+|\n")


def _pieces(text: str, start: int, end: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """``text[start:end]`` in runs of at most ``max_chars``, cut after a sentence (or a line)
    where one ends in the run's second half, else between words."""
    while end - start > max_chars:
        limit = start + max_chars
        cut = max((m.end() for m in _SENTENCE_END.finditer(text, start + max_chars // 2, limit)),
                  default=-1)
        if cut < 0:
            space = text.rfind(" ", start + 1, limit)
            cut = space + 1 if space > start else limit
        piece_end = cut
        while piece_end > start and text[piece_end - 1].isspace():
            piece_end -= 1
        yield start, piece_end
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if end > start:
        yield start, end


def fixed_chunks(document: ParsedDocument, size: int = GPT4ALL_CHARS) -> list[Chunk]:
    """Each page in runs of words of at most ``size`` characters (GPT4All: no structure)."""
    out = []
    for page in document.pages:
        text = page.text
        for match in re.finditer(r"\S", text):  # from the first character of text
            start = match.start()
            break
        else:
            continue
        end = len(text.rstrip())
        while start < end:
            limit = min(start + size, end)
            if limit < end and not text[limit].isspace():
                space = max(text.rfind(" ", start, limit), text.rfind("\n", start, limit))
                limit = space if space > start else limit
            piece_end = limit
            while piece_end > start and text[piece_end - 1].isspace():
                piece_end -= 1
            out.append(_chunk(page, (), start, piece_end))
            start = limit
            while start < end and text[start].isspace():
                start += 1
    return out


def _chunk(page: Page, heading: tuple[str, ...], start: int, end: int) -> Chunk:
    return Chunk(page.number, heading, start, end, page.text[start:end])
