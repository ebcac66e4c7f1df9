"""The audit trail of ``localmed serve``: who asked what of which model, when, and what came of it,
in a file whose records cannot be edited, removed, reordered or cut off unseen.

One JSON object per line (JSONL), appended and fsync'd before the next request is answered.
Each record has its number (``seq``, from 1) and ``prev``: the sha256 of the previous record's
line as written (64 zeros for the first). A sidecar ``FILE.head`` (rewritten atomically after
each record) holds the number and sha256 of the last one, so records removed from the end are
seen too. :func:`verify` names the first record that breaks the chain.

What the chain proves, and what it does not: an edit, a deletion, a reordering or a cut shows
unless whoever made it also rewrote every later record and the head. To make that show too, copy
the head (``localmed serve`` prints it when it stops; ``localmed audit verify`` prints it) to
somewhere the server cannot write: a syslog host, a ticket, paper.

Patient text is not in the log: a prompt and a reply appear as their sha256 and token counts.
With ``--log-content`` they are written too, the file is created 0600, and the first record of
each start says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmed import __version__
from localmed.atomic import write_text_atomic
from localmed.errors import LocalmedError

GENESIS = "0" * 64
MIN_FREE_BYTES = 1024 * 1024
"""Below this free on the log's disk, requests are refused rather than served unaudited."""


class AuditError(LocalmedError, OSError):
    """The audit log cannot be written, or was altered."""


@dataclass(frozen=True)
class Broken:
    """The first record that breaks the chain (1-based), and how."""

    seq: int
    why: str

    def __str__(self) -> str:
        return f"record {self.seq}: {self.why}"


@dataclass(frozen=True)
class Verified:
    records: int
    head: str
    """sha256 of the last record's line (the genesis hash for an empty log)."""
    broken: Broken | None = None


def digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def verify(path: Path) -> Verified:
    """Read the whole log and its head; the first record that was edited, deleted, reordered or
    cut off, if any."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit log: {exc.strerror}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last record was cut
    previous, seq = GENESIS, 0
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            claimed_seq, claimed_prev = record["seq"], record["prev"]
        except (ValueError, KeyError, TypeError):
            return Verified(seq, previous, Broken(number, "not a record of this log (edited)"))
        if claimed_seq != number:
            later = {_seq(other) for other in lines[number:]}
            why = (f"numbered {claimed_seq}: records before it were deleted" if
                   isinstance(claimed_seq, int) and claimed_seq > number and
                   number not in later else f"numbered {claimed_seq}: reordered")
            return Verified(seq, previous, Broken(number, why))
        if claimed_prev != previous:
            why = ("edited (its predecessor's hash is not what it recorded)" if number > 1 else
                   "edited (the first record must follow the genesis hash)")
            return Verified(seq, previous, Broken(number - 1 if number > 1 else 1, why))
        previous, seq = digest(line), number
    if tail:
        return Verified(seq, previous, Broken(seq + 1, "cut off mid-record"))
    head = _read_head(path)
    if head is None:
        if seq:
            return Verified(seq, previous, Broken(seq, f"the head file {head_path(path).name} "
                                                  "is missing: the end cannot be checked"))
    elif head != (seq, previous):
        if head[0] > seq:
            why = f"cut off: the head says the log had {head[0]} records"
            return Verified(seq, previous, Broken(seq + 1, why))
        return Verified(seq, previous, Broken(seq, "edited (it is not the record the head "
                                              "file names)"))
    return Verified(seq, previous)


def _seq(line: bytes) -> object:
    try:
        return json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        head = json.loads(head_path(path).read_text())
        return int(head["seq"]), str(head["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return -1, ""


class AuditLog:
    """Appends records to a verified log; one writer per file (the server's)."""

    def __init__(self, path: Path, *, content: bool) -> None:
        self.path = path
        self.content = content
        self._lock = threading.Lock()
        self.failed: str | None = None
        """Why the last write failed: requests are refused until one succeeds."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            state = verify(path)
            if state.broken is not None:
                raise AuditError(f"{path}: refusing to append to an audit log that was altered "
                                 f"({state.broken}); keep it as evidence and start another "
                                 "with --audit FILE")
            self.seq, self.prev = state.records, state.head
        else:
            self.seq, self.prev = 0, GENESIS
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if content else 0o640)
        except OSError as exc:
            raise AuditError(f"{path}: cannot write the audit log: {exc.strerror}") from None
        if content:
            os.chmod(path, 0o600)
        self._fd = fd

    def check(self) -> None:
        """Before a request is served: the log can take its record (else AuditError)."""
        if self.failed is not None:
            raise AuditError(f"the audit log cannot be written ({self.failed}): requests are "
                             "refused rather than served unaudited")
        try:
            disk = os.statvfs(self.path.parent)
            free = disk.f_bavail * disk.f_frsize
        except OSError:
            return
        if free < MIN_FREE_BYTES:
            raise AuditError(f"the audit log's disk is full ({free} bytes free): requests are "
                             "refused rather than served unaudited")

    def append(self, **fields: Any) -> str:
        """Write one record (fsync'd, head updated); returns its sha256."""
        with self._lock:
            record = {"seq": self.seq + 1, "prev": self.prev,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
            try:
                written = os.write(self._fd, line + b"\n")
                if written != len(line) + 1:
                    raise OSError(28, "short write (disk full?)")
                os.fsync(self._fd)
                write_text_atomic(head_path(self.path),
                                  json.dumps({"seq": self.seq + 1, "sha256": digest(line)}))
            except OSError as exc:
                self.failed = exc.strerror or str(exc)
                raise AuditError(f"{self.path}: cannot write the audit log: {self.failed}") \
                    from None
            self.failed = None
            self.seq, self.prev = self.seq + 1, digest(line)
            return self.prev

    def start(self, **fields: Any) -> None:
        """The record of a server start: what is served, and whether content is logged."""
        self.append(event="start", localmed=__version__, log_content=self.content, **fields)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def request_record(request: Any, status: int, *, model_sha256: str, content: bool
                   ) -> dict[str, Any]:
    """The record of one request (an aiohttp request and what the server noted on it): who,
    which route and model, the outcome, token counts, the prompt's and reply's sha256 (their
    text only with ``content``), and the passages an answer from the documents was given."""
    prompt, reply = request.get("prompt"), request.get("reply")
    record: dict[str, Any] = {
        "event": "request", "request_id": request["id"], "key": request.get("key"),
        "client": request.remote, "method": request.method, "route": request.path,
        "model_sha256": model_sha256, "status": status,
        "prompt_tokens": request["tokens"][0], "completion_tokens": request["tokens"][1],
        "prompt_sha256": digest(prompt) if prompt is not None else None,
        "reply_sha256": digest(reply) if reply is not None else None,
        "refusal": request.get("refusal")}
    if (grounding := request.get("grounding")) is not None:
        record["docs"] = grounding.index
        record["passages"] = [
            {"id": n, "passage": p.id, "source": p.source, "page": p.page,
             "sha256": digest(p.text), **({"text": p.text} if content else {})}
            for n, p in enumerate(grounding.passages, start=1)]
    if content:
        record |= {"prompt": prompt, "reply": reply}
    return record
