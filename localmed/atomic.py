"""Write files so that a crash, an error or Ctrl-C never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


def temp_path_for(final: Path) -> Path:
    """A hidden sibling of ``final`` to write into before the rename."""
    return final.with_name(f".{final.name}.{os.getpid()}.part")


@contextlib.contextmanager
def atomic_path(final: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it over ``final``.

    On any exception, KeyboardInterrupt included, the temporary file is removed and ``final`` is
    left as it was. ``mode`` (e.g. ``0o600``) is applied before the rename, so the file is never
    visible with looser permissions.
    """
    tmp = temp_path_for(final)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno is None and _disk_full(tmp.parent):
            # numpy's tofile (gguf-py's tensor writes) reports a short write with no errno
            exc.errno, exc.strerror = errno.ENOSPC, os.strerror(errno.ENOSPC)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(final)  # the file the user asked for, not the hidden temporary
        raise


FULL_DISK_BYTES = 16 * 2**20
"""Free space below which a failed write is taken for a full disk (checked before the partial
file is removed: a write that ran out leaves at most a few blocks)."""


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically; with ``mode``, the file is created with it."""
    with atomic_path(path, mode) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(tmp, flags, mode if mode is not None else 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.(part|partial)$")
"""What :func:`temp_path_for` and the GPTQ staging folders are named: ``.<name>.<pid>.part``."""


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporaries that killed runs left in ``folder`` (their process is gone);
    returns the bytes freed. A temporary of a run still going is left alone."""
    freed = 0
    if not folder.is_dir():
        return 0
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if not match or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
            else:
                freed += path.stat().st_size
                path.unlink()
    return freed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
