"""DOCX: paragraphs under the document's own heading styles, tables as rows, read by
python-docx (MIT) — after the archive itself is checked, so a zip bomb is refused before a byte
of it is inflated."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

from localmed.errors import DocumentError
from localmed.retrieval.document import ParsedDocument, TextBuilder

MAX_INFLATED = 256 * 2**20
"""Bytes a DOCX may inflate to in all (a Word file of text is a few MB; of images, tens)."""
MAX_RATIO = 200
"""Inflated ÷ compressed bytes of any large member (XML compresses ~10x; a bomb, ~1000x)."""
_HEADING_STYLE = re.compile(r"^(?:heading|überschrift|titre|título|titolo|kop)\s*(\d)$", re.I)


def read_docx(path: Path, data: bytes) -> ParsedDocument:
    if not data.startswith(b"PK"):
        raise DocumentError(path, f"not a DOCX (a DOCX is a zip archive; it starts with "
                            f"{data[:8]!r})")
    _check_archive(path, data)
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DocumentError(path, f"damaged DOCX ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # lxml's XMLSyntaxError and whatever a broken part raises
        raise DocumentError(path, f"damaged DOCX ({type(exc).__name__})") from None
    builder = TextBuilder()
    headings: list[tuple[int, str]] = []
    try:
        for item in document.iter_inner_content():
            heading = tuple(t for _, t in headings)
            if isinstance(item, Table):
                rows = [" | ".join(" ".join(c.text.split()) for c in row.cells)
                        for row in item.rows]
                builder.add("\n".join(r for r in rows if r.strip(" |")), heading, "table")
                continue
            text = item.text.strip()
            level = _heading_level(item.style.name if item.style is not None else "")
            if level and text:
                while headings and headings[-1][0] >= level:
                    headings.pop()
                headings.append((level, " ".join(text.split())))
            elif text:
                builder.add(text, heading)
    except Exception as exc:
        raise DocumentError(path, f"damaged DOCX ({type(exc).__name__})") from None
    return ParsedDocument("docx", (builder.page(),))


def _heading_level(style: str) -> int:
    if style.lower() == "title":
        return 1
    match = _HEADING_STYLE.match(style.strip())
    return int(match.group(1)) if match else 0


def _check_archive(path: Path, data: bytes) -> None:
    """Refuse an archive that would inflate past :data:`MAX_INFLATED`, or whose members inflate
    far beyond what documents do: read from the central directory, nothing inflated. (zipfile
    never inflates a member past the size the directory declares.)"""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise DocumentError(path, f"damaged DOCX: not a readable zip archive ({exc})") from None
    total = sum(m.file_size for m in members)
    worst = max((m.file_size / max(m.compress_size, 1) for m in members
                 if m.file_size > 2**20), default=0)
    if total > MAX_INFLATED or worst > MAX_RATIO:
        raise DocumentError(path, f"refused: its {len(members)} parts would inflate to "
                            f"{total / 2**20:,.0f} MB (a zip bomb?)")
    if "word/document.xml" not in {m.filename for m in members}:
        raise DocumentError(path, "not a DOCX (a zip archive with no word/document.xml)")
