"""Calibration text: the medical documents GPTQ and importance matrices are computed on.

One loader for every command that needs it (``quantize --format gptq``, ``quantize --imatrix
auto``, ``imatrix``): the file given, or by default the PubMedQA abstracts that ``localmed data
pull calibration`` fetches; its documents; its sha256, as manifests and matrices record it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from localmed.documents import parse_documents
from localmed.errors import CalibrationError
from localmed.public_data import calibration_path
from localmed.textfile import read_text

CALIBRATION_FIELDS = ("text", "question")
"""What a calibration ``.jsonl`` line may hold its document in."""


@dataclass(frozen=True)
class Calibration:
    """Calibration documents and the file they came from."""

    path: Path
    texts: tuple[str, ...]
    sha256: str
    """Of the file's bytes."""

    @property
    def label(self) -> str:
        """How an importance matrix names its calibration text (``imatrix.datasets``)."""
        return f"{self.path.name} sha256:{self.sha256}"


def load_calibration(path: Path | None = None) -> Calibration:
    """The documents of ``path`` (``.jsonl`` with ``text`` or ``question`` per line, or
    documents separated by blank lines), PubMedQA abstracts by default. A missing or empty file
    raises :class:`CalibrationError`."""
    if path is None:
        path = calibration_path()
        if not path.is_file():
            raise CalibrationError(path, "no medical calibration text here; get it with "
                                   "`localmed data pull calibration`, or pass --calibration FILE")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(path, "calibration file not found")
    raw = read_text(path)
    texts = tuple(parse_documents(raw, path, CALIBRATION_FIELDS))
    if not texts:
        raise CalibrationError(path, "no text in it, so no calibration text to work from")
    return Calibration(path, texts, hashlib.sha256(raw.encode("utf-8")).hexdigest())
