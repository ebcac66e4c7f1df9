"""Plain text and Markdown: the file's own text, decoded, with its headings and blocks.

The spans are offsets in the decoded file itself, so a Markdown passage is the very text of the
file. Text that is not UTF-8 is decoded as the encoding charset-normalizer finds (a ward's notes
saved as Windows-1252 are common), and the document says so; bytes that are no text at all are
refused.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from localmed.errors import DocumentError
from localmed.retrieval.document import Block, Page, ParsedDocument, paragraph_spans

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def decode(path: Path, data: bytes) -> tuple[str, str]:
    """The text of ``data`` and a note on how it was read ("" for UTF-8)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _lines(data.decode(encoding)), ""
            except UnicodeDecodeError:
                raise DocumentError(path, f"starts as {encoding} text but is not") from None
    try:
        return _lines(data.decode("utf-8")), ""
    except UnicodeDecodeError as exc:
        bad = exc.start
    if b"\0" in data[:8192]:
        raise DocumentError(path, "binary data, not text")
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None or best.encoding in ("utf_8", "utf-8"):
        raise DocumentError(path, f"not UTF-8 text (byte {bad}: {data[bad:bad + 1]!r}), and "
                            "its encoding could not be told; save it as UTF-8")
    return _lines(str(best)), f"not UTF-8: read as {best.encoding}"


def _lines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path, data: bytes) -> ParsedDocument:
    """Paragraphs (blank-line separated) of a plain-text file; no headings."""
    text, note = decode(path, data)
    blocks = [Block(start, end) for start, end in paragraph_spans(text)]
    return ParsedDocument("text", (Page(None, text, tuple(blocks)),), (note,) if note else ())



_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
_TABLE = re.compile(r"^\s*\|")


def read_markdown(path: Path, data: bytes) -> ParsedDocument:
    """Markdown's headings (ATX ``#`` and setext underlines) as the heading path; fenced code
    and tables as blocks of their own, never split at a blank line inside them."""
    text, note = decode(path, data)
    lines = text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    headings: list[tuple[int, str]] = []  # (level, title)
    blocks: list[Block] = []
    run_start: int | None = None  # first line of the paragraph being gathered

    def path() -> tuple[str, ...]:
        return tuple(title for _, title in headings)

    def close(end_line: int, kind: str = "text") -> None:
        nonlocal run_start
        if run_start is None:
            return
        start, end = offsets[run_start], offsets[end_line] - 1
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            blocks.append(Block(start + lead, start + lead + len(stripped), path(), kind))
        run_start = None

    def heading(level: int, title: str) -> None:
        while headings and headings[-1][0] >= level:
            headings.pop()
        headings.append((level, title.strip()))

    i = 0
    while i < len(lines):
        line = lines[i]
        if fence := _FENCE.match(line):
            close(i)
            marker, run_start = fence.group(1), i
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(marker):
                i += 1
            i = min(i + 1, len(lines))
            close(i, "code")
            continue
        if atx := _ATX.match(line):
            close(i)
            heading(len(atx.group(1)), atx.group(2))
            i += 1
            continue
        if run_start is not None and i == run_start + 1 and _SETEXT.match(line) and \
                not _TABLE.match(lines[run_start]):
            title = lines[run_start]
            run_start = None
            heading(1 if line.strip().startswith("=") else 2, title)
            i += 1
            continue
        if not line.strip():
            close(i)
        elif _TABLE.match(line) and (run_start is None or not _TABLE.match(lines[i - 1])):
            close(i)
            run_start = i
            while i + 1 < len(lines) and _TABLE.match(lines[i + 1]):
                i += 1
            close(i + 1, "table")
        elif run_start is None:
            run_start = i
        i += 1
    close(len(lines))
    return ParsedDocument("markdown", (Page(None, text, tuple(blocks)),),
                          (note,) if note else ())
