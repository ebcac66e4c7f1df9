"""API keys with names (``serve --api-key-file FILE``), and a request-rate limit for each.

The file holds one ``name key`` per line (``#`` comments and blank lines allowed): a clinician,
a ward's service, a script. The audit log and the server's log name the key, never show it. The
file must be readable by its owner alone (like an SSH key); it is read again on SIGHUP, and a
file that no longer reads keeps the keys the server has.
"""

from __future__ import annotations

import hmac
import math
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from localmed.errors import ServeError

MIN_KEY_CHARS = 16
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class KeyRing:
    keys: dict[str, str]
    """Name → key."""
    source: Path | None = None

    @classmethod
    def single(cls, key: str) -> KeyRing:
        """``--api-key``/``LOCALMED_API_KEY``: one key, named ``api-key``."""
        return cls({"api-key": key})

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ServeError(f"--api-key-file {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"--api-key-file {path}: cannot read it ({exc})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ServeError(f"--api-key-file {path}: others can read it (mode "
                             f"{stat.S_IMODE(mode):o}); make it yours alone: chmod 600 {path}")
        keys: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"--api-key-file {path}, line {number}"
            if len(parts) != 2:
                raise ServeError(f"{where}: expected 'name key', got {len(parts)} fields")
            name, key = parts
            if not NAME.fullmatch(name):
                raise ServeError(f"{where}: '{name[:64]}' is not a name (letters, digits, "
                                 ". _ @ -; up to 64)")
            if len(key) < MIN_KEY_CHARS:
                raise ServeError(f"{where}: the key of '{name}' is shorter than "
                                 f"{MIN_KEY_CHARS} characters")
            if name in keys:
                raise ServeError(f"{where}: '{name}' is named twice")
            if key in keys.values():
                raise ServeError(f"{where}: '{name}' has the key of another name")
            keys[name] = key
        if not keys:
            raise ServeError(f"--api-key-file {path}: no keys in it ('name key' per line)")
        return cls(keys, path)

    def name_of(self, authorization: str) -> str | None:
        """The name whose key the ``Authorization: Bearer KEY`` header carries, if any (every
        key is compared, in constant time)."""
        given = authorization.encode()
        found = None
        for name, key in self.keys.items():
            if hmac.compare_digest(given, f"Bearer {key}".encode()):
                found = name
        return found


@dataclass
class RateLimit:
    """At most ``per_minute`` requests a minute for each key (or client address), with bursts
    of up to that many: a token bucket per name, refilled continuously."""

    per_minute: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, who: str, now: float | None = None) -> float:
        """0 if ``who`` may go now (and counts it), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        with self._lock:
            tokens, when = self._buckets.get(who, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - when) * rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / rate

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))
