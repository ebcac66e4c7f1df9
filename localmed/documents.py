"""Documents of text from a file: bench's ``--text``, and calibration text
(:mod:`localmed.calibration`).

One reader for both: a ``.jsonl`` file (on each line, the first of the named fields that has
text) or any other file of documents separated by blank lines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from localmed.errors import SuiteError
from localmed.textfile import read_text


def read_documents(path: Path, fields: Sequence[str] = ("question",)) -> list[str]:
    """Texts from a ``.jsonl`` file (on each line, the first of ``fields`` that has text) or any
    other file of documents separated by blank lines; empty documents are dropped."""
    return parse_documents(read_text(path), path, fields)


def parse_documents(raw: str, path: Path, fields: Sequence[str] = ("question",)) -> list[str]:
    """:func:`read_documents` on text already read from ``path``."""
    if path.suffix != ".jsonl":
        return [doc.strip() for doc in raw.split("\n\n") if doc.strip()]
    docs = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(str(next(row[f] for f in fields if row.get(f))))
        except (json.JSONDecodeError, StopIteration, TypeError, AttributeError):
            wanted = " or ".join(repr(f) for f in fields)
            raise SuiteError(path, f"expected JSON with a {wanted} field", line_no) from None
    return docs

