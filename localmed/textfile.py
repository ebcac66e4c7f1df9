"""Reading the text files users hand localmed (registry, question sets, calibration text)."""

from __future__ import annotations

from pathlib import Path

from localmed.errors import DataFileError


def read_text(path: Path) -> str:
    """The file as UTF-8; a file that is not says which byte is wrong."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise DataFileError(path, "is a folder, not a file") from None
    except FileNotFoundError:
        raise DataFileError(path, "no such file") from None
    except OSError as exc:
        raise DataFileError(path, f"cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(path, f"not UTF-8 text (byte {exc.start}: "
                            f"{data[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
