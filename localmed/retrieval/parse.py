"""Which reader reads a file, by its suffix; each checks that the bytes are what the name says
before trusting them, and raises :class:`~localmed.errors.DocumentError` in one line naming the
file: encrypted, no text layer, damaged, empty, not text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from localmed.errors import DocumentError
from localmed.retrieval.document import ParsedDocument

MAX_FILE_BYTES = 200 * 2**20
"""Files larger than this are not read (``docs add --max-file-mb``): a guideline PDF with its
figures is rarely over 50 MB, and a file of gigabytes is more likely an archive or a scan."""


Reader = Callable[[Path, bytes], ParsedDocument]


def _readers() -> dict[str, Reader]:
    # Imported here: each reader's library (pdfium, lxml, python-docx) loads only when a file
    # of its kind is read.
    from localmed.retrieval import docx_reader, html_reader, pdf_reader, text_reader

    return {
        ".pdf": pdf_reader.read_pdf,
        ".html": html_reader.read_html,
        ".htm": html_reader.read_html,
        ".md": text_reader.read_markdown,
        ".markdown": text_reader.read_markdown,
        ".txt": text_reader.read_text,
        ".text": text_reader.read_text,
        ".docx": docx_reader.read_docx,
    }


SUFFIXES = (".pdf", ".html", ".htm", ".md", ".markdown", ".txt", ".text", ".docx")
"""What ``docs add`` indexes (any case); other files in the folder are left alone."""


def indexable(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and not path.name.startswith((".", "~$"))


def parse(path: Path, data: bytes) -> ParsedDocument:
    """The document in ``data`` (read from ``path``, whose suffix says what it is)."""
    if not data:
        raise DocumentError(path, "empty file")
    reader = _readers().get(path.suffix.lower())
    if reader is None:
        raise DocumentError(path, f"not a kind of file localmed indexes ({', '.join(SUFFIXES)})")
    document = reader(path, data)
    if not any(page.blocks for page in document.pages):
        raise DocumentError(path, "holds no text")
    return document
