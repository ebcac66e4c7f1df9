"""PDF: each page's text layer, read by PDFium (pypdfium2, Apache-2.0/BSD), under the headings of
the PDF's own outline (its bookmarks).

A bookmark names a page; where its title is found in that page's text the heading starts there,
else at the top of the page. Pages with no text are left out, and said so; a PDF with no text
at all is a scan, which localmed does not read (no OCR).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from localmed.errors import DocumentError
from localmed.retrieval.document import Block, Page, ParsedDocument, paragraph_spans

_HEADER_WINDOW = 1024
"""The PDF header may follow some junk, within the first KiB (as PDF readers allow)."""


def read_pdf(path: Path, data: bytes) -> ParsedDocument:
    import pypdfium2 as pdfium

    if b"%PDF-" not in data[:_HEADER_WINDOW]:
        raise DocumentError(path, f"not a PDF (it starts with {data[:8]!r})")
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if "password" in str(exc).lower():
            raise DocumentError(path, "encrypted: it needs a password, and localmed does not "
                                "index encrypted PDFs (save a copy without the password)") \
                from None
        raise DocumentError(path, f"damaged or truncated PDF ({_reason(exc)})") from None
    try:
        outline = _outline(pdf)
        pages: list[Page] = []
        empty = 0
        for index in range(len(pdf)):
            try:
                page = pdf[index]
                textpage = page.get_textpage()
                text = _clean(textpage.get_text_range())
                textpage.close()
                page.close()
            except pdfium.PdfiumError as exc:
                raise DocumentError(path, f"damaged PDF: page {index + 1} cannot be read "
                                    f"({_reason(exc)})") from None
            if not text.strip():
                empty += 1
                continue
            pages.append(Page(index + 1, text, tuple(_blocks(text, outline, index))))
    finally:
        pdf.close()
    if not pages:
        raise DocumentError(path, "no text layer (scanned?); localmed does not OCR")
    notes = (f"{empty} of {empty + len(pages)} pages have no text layer (scanned?) and are "
             "left out",) if empty else ()
    return ParsedDocument("pdf", tuple(pages), notes)


def _reason(exc: Exception) -> str:
    match = re.search(r"PDFium: ([^)]*)", str(exc))
    return match.group(1) if match else str(exc)


def _clean(text: str) -> str:
    """PDFium's text with ``\\n`` line ends, and no control characters but tabs and newlines
    (it marks a soft hyphen at a line end with one)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "-"
                   if c == "\x02" else "" for c in text)


def _outline(pdf) -> list[tuple[int, int, str]]:
    """(page index, level, title) of each bookmark that names a page, in outline order."""
    out = []
    try:
        for bookmark in pdf.get_toc(max_depth=8):
            dest = bookmark.get_dest()
            title = " ".join((bookmark.get_title() or "").split())
            if dest is not None and title and dest.get_index() is not None:
                out.append((dest.get_index(), bookmark.level, title))
    except Exception:  # a damaged outline costs the headings, not the text
        return []
    return out


def _blocks(text: str, outline: list[tuple[int, int, str]], index: int) -> list[Block]:
    """The page's paragraphs (blank-line separated) under the outline's headings: those of
    earlier pages from the top, this page's from where their titles are found."""
    path: list[tuple[int, str]] = []

    def enter(level: int, title: str) -> None:
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))

    cuts: list[tuple[int, tuple[str, ...]]] = []
    for page, level, title in outline:
        if page < index:
            enter(level, title)
    cuts.append((0, tuple(t for _, t in path)))
    lowered = text.lower()
    at = 0
    for page, level, title in outline:
        if page != index:
            continue
        found = lowered.find(title.lower(), at)
        where = found if found >= 0 else at
        enter(level, title)
        heading = tuple(t for _, t in path)
        if where == cuts[-1][0]:
            cuts[-1] = (where, heading)
        else:
            cuts.append((where, heading))
        at = where + (len(title) if found >= 0 else 0)
    blocks = []
    for n, (start, heading) in enumerate(cuts):
        end = cuts[n + 1][0] if n + 1 < len(cuts) else len(text)
        blocks += [Block(s, e, heading) for s, e in paragraph_spans(text, start, end)]
    return blocks
