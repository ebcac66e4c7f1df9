"""A document's text as localmed reads it: pages, and blocks under their headings.

Every reader (:mod:`localmed.retrieval.parse` picks one by suffix) gives a
:class:`ParsedDocument`: one :class:`Page` per PDF page (one page with no number for any other
file), each page's text, and its blocks (a paragraph, a list, a table), each a span of that text
with the heading path it sits under. A passage cut from blocks is therefore a span of a page's
text too, and a citation can name the very characters it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Block:
    """A run of a page's text (``text[start:end]``) under its heading path."""

    start: int
    end: int
    heading: tuple[str, ...] = ()
    kind: str = "text"
    """``text``, ``table`` (rows as ``a | b | c`` lines) or ``code``."""


@dataclass(frozen=True)
class Page:
    """One page of a PDF (``number`` from 1), or the whole text of any other file (None)."""

    number: int | None
    text: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class ParsedDocument:
    """What a reader made of a file."""

    kind: str
    """``pdf``, ``html``, ``markdown``, ``text`` or ``docx``."""
    pages: tuple[Page, ...]
    notes: tuple[str, ...] = ()
    """What the user should know that did not stop it (an encoding guessed, pages with no
    text)."""

    @property
    def characters(self) -> int:
        return sum(len(page.text) for page in self.pages)


@dataclass
class TextBuilder:
    """The text of a page made of blocks one after another (a blank line between), each
    block's span recorded as it is added: what the HTML and DOCX readers write into."""

    parts: list[str] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    length: int = 0

    def add(self, text: str, heading: tuple[str, ...], kind: str = "text") -> None:
        text = text.strip()
        if not text:
            return
        if self.parts:
            self.parts.append("\n\n")
            self.length += 2
        self.parts.append(text)
        self.blocks.append(Block(self.length, self.length + len(text), heading, kind))
        self.length += len(text)

    def page(self, number: int | None = None) -> Page:
        return Page(number, "".join(self.parts), tuple(self.blocks))


_PARAGRAPH = re.compile(r"\S(?:.*\S)?(?:\n[ \t]*\S(?:.*\S)?)*")
"""A run of non-blank lines (``.`` stops at a line end), from its first to its last
non-space character."""


def paragraph_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Spans of the paragraphs (runs of non-blank lines) of ``text[start:end]``."""
    end = len(text) if end is None else end
    return [(m.start(), m.end()) for m in _PARAGRAPH.finditer(text, start, end)]
