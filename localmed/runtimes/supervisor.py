"""Every engine process's supervision, written once: the llama.cpp engine
(:class:`~localmed.runtimes.batch_process.BatchClient`) and the transformers one for a GPTQ folder
(:class:`~localmed.runtimes.process.EngineRuntime`) are started, watched and loaded again here.

- :class:`EngineProcess`: one engine, spawned (never forked: the caller holds threads) with a
  private log for llama.cpp's stderr, or a connection to an engine another process shares; its
  ready handshake; its death in one line (:class:`EngineDiedError`, with the log's last words);
  its end (Close, then a kill after :data:`STOP_SECONDS`).
- :class:`Supervisor`: the one reload policy. An engine that dies is loaded again at once, before
  the requests that were in it hear of it, so a client that retries at once finds the model
  there; :meth:`Supervisor.restart` only waits for that reload, or loads again where it failed
  (:meth:`Supervisor.revive` does that in the background: a server's next request asks);
  :meth:`Supervisor.close` stops whatever is running, and the process a reload is starting.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from localmed import offline
from localmed.errors import EngineDiedError, EngineError, LocalmedError
from localmed.runtimes.messages import Close, Ready

STOP_SECONDS = 10
"""How long an engine process has to end after Close before it is killed."""

BATCH_SECONDS = 0.05
"""Longest a streamed piece waits in an engine process, unless the caller asks otherwise: the
server's stream. The chat app asks for what its screen shows new text at."""

_STDERR_TAIL = 4096


def settle_engine_process(log_path: str) -> None:
    """First thing in an engine process: the terminal's Ctrl-C belongs to the app (which stops
    or closes the engine itself); llama.cpp's fd 2 goes to the log (on a TUI's screen it would
    garble it; kept for crash reports), fd 1 nowhere; no socket beyond loopback
    (:mod:`localmed.offline`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(os.open(log_path, os.O_WRONLY | os.O_APPEND), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    offline.enforce("localmed's engine process")


def portable(exc: Exception) -> LocalmedError:
    """localmed's errors cross the pipe as they are; anything else as an EngineError."""
    if isinstance(exc, LocalmedError):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}")


def new_engine_log() -> Path:
    """A private (0600) file for an engine process's stderr: llama.cpp's last words."""
    log = tempfile.NamedTemporaryFile(prefix="localmed-engine-", suffix=".log", delete=False)
    log.close()
    os.chmod(log.name, 0o600)
    return Path(log.name)


def last_line(log: Path) -> str:
    """The last line an engine wrote to its log, for the one-line error when it dies; the last
    of localmed's own among its last words, where it wrote one (``localmed: worker ... closed
    the link``, before llama.cpp aborted for it)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _STDERR_TAIL))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    own = [line for line in lines if line.startswith("localmed: ")]
    return (own or lines or [""])[-1].strip()


def describe_exit(code: int | None) -> str:
    """An engine's exit status in words."""
    if code is None:
        return "is not responding"
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = {
            signal.SIGILL: "an instruction this CPU lacks (a llama.cpp build for another CPU?)",
            signal.SIGKILL: "killed (out of memory?)",
            signal.SIGABRT: "llama.cpp aborted",
            signal.SIGSEGV: "a crash in llama.cpp",
            signal.SIGBUS: "a crash reading the model file (changed or on a removed disk?)",
        }.get(sig, "a signal")
        return f"died: {name}, {why}"
    return f"exited with status {code}"


class EngineProcess:
    """One engine: a process of this one's, or (:meth:`join`) one that another process shares.

    ``EngineProcess(target, *args)`` spawns ``target(conn, *args, log_path)``; the engine's
    first message is its :class:`Ready` (or the Failed that says why it could not load), which
    :meth:`handshake` reads."""

    def __init__(self, target: Callable[..., None] | None, *args: Any) -> None:
        self.process: Any = None
        self.writer: Writer | None = None
        """Set by a caller that writes from many threads: then nothing waits on a pipe write."""
        self.log: Path | None = None
        self._remove_log: Callable[[], Any] = lambda: None
        self._stopping = threading.Lock()  # a reload's handshake and close() may both stop it
        self._stopped = False
        if target is None:  # join() fills in the connection
            return
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.log = new_engine_log()
        # Gone with stop(), or at the latest when this process exits without one.
        self._remove_log = weakref.finalize(self, self.log.unlink, missing_ok=True)
        self.process = ctx.Process(target=target, name="localmed-engine", daemon=True,
                                   args=(child, *args, str(self.log)))
        self.process.start()
        child.close()

    @classmethod
    def join(cls, address: str, authkey: bytes | None) -> EngineProcess:
        """The engine a :class:`~localmed.runtimes.hub.EngineHub` shares at ``address``."""
        engine = cls(None)
        try:
            engine.conn = Client(address, family="AF_UNIX", authkey=authkey)
        except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
            raise EngineDiedError(f"shared by localmed chat --web cannot be reached "
                                  f"({type(exc).__name__})") from None
        return engine

    def handshake(self) -> Ready:
        """The engine's Ready; what it said instead, or how it died, raised (it is stopped)."""
        try:
            first = self.conn.recv()
        except (EOFError, OSError):
            died = self.died()
            self.stop()
            raise died from None
        if not isinstance(first, Ready):
            self.stop()
            raise first.error
        return first

    def died(self) -> EngineDiedError:
        """How it ended, in one line (its exit status and the log's last line)."""
        if self.process is None:
            return EngineDiedError("shared by localmed chat --web stopped (the browser "
                                   "chat's server ended)")
        self.process.join(5)
        return EngineDiedError(describe_exit(self.process.exitcode),
                               last_line(self.log) if self.log is not None else "")

    @property
    def alive(self) -> bool:
        return self.process is None or self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, *, closed: bool = False) -> None:
        """Ask it to close (unless ``closed``: Close has been written already), kill it if it
        has not within :data:`STOP_SECONDS`, close the connection. Safe to call again, from
        any thread: a second call waits for the first and does nothing (two closes of one
        descriptor would close whatever had reused its number in between)."""
        with self._stopping:
            if not self._stopped:
                self._stop(closed)
                self._stopped = True

    def _stop(self, closed: bool) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:  # Close after what is queued; the writer then ends
            writer.close(None if closed else Close(), timeout=STOP_SECONDS)
            closed = True
        if not closed and (self.process is None or self.process.is_alive()):
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(Close())
        if self.process is not None:
            self.process.join(STOP_SECONDS)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()
        self._remove_log()


class Supervisor:
    """The one reload policy of an engine, for whoever holds it.

    ``spawn()`` starts an :class:`EngineProcess`; ``commit(engine, ready)`` makes a loaded one
    current (threads of its own started); ``on_restart(line)`` hears a death and a failed
    reload, each in one line. :attr:`loaded` is set while an engine is current: requests are refused at once
    while it is not."""

    def __init__(self, spawn: Callable[[], EngineProcess],
                 commit: Callable[[EngineProcess, Ready], None],
                 on_restart: Callable[[str], None] | None = None) -> None:
        self._spawn, self._commit = spawn, commit
        self.on_restart = on_restart or (lambda _: None)
        self.engine: EngineProcess | None = None
        self.loaded = threading.Event()
        self.closing = False
        self._deaths: list[str] = []
        self.failure = ""
        """Why the last reload failed ("": it did not)."""
        self._reloading = threading.Lock()  # one load at a time
        self._spawning = threading.Lock()  # close() against a load starting a process

    def load(self) -> None:
        """Start an engine and wait for it to be ready (raising why it is not)."""
        with self._spawning:  # a close() from now on stops what this starts
            if self.closing:
                raise LocalmedError("the model is being closed")
            self.engine = engine = self._spawn()
        ready = engine.handshake()
        with self._spawning:
            if self.closing:  # closed while it loaded: close() has stopped it
                raise LocalmedError("the model is being closed")
            self._commit(engine, ready)
            self.failure = ""
            self.loaded.set()

    def lost(self, died: EngineDiedError, orphaned: Callable[[], None] = lambda: None) -> None:
        """The engine died: from now on requests are refused; ``orphaned()`` takes those that
        were in it; the model is loaded again at once (unless closing), then the caller tells
        the orphans."""
        with self._reloading:
            self.loaded.clear()
            orphaned()
            if self.closing:
                return
            self._deaths.append(str(died))
            self.on_restart(f"{died}; loading it again")
            try:
                self._stop()
                self.load()
            except Exception as exc:
                self.failure = str(exc)
                if not self.closing:
                    self.on_restart(f"reloading failed: {exc}")

    def notices(self) -> list[str]:
        """The deaths since last asked, one sentence each, for the app to say; then
        forgotten."""
        deaths, self._deaths = self._deaths, []
        return [f"{why[:1].upper()}{why[1:]}; the model was loaded again and the conversation "
                "is kept." for why in deaths]

    def restart(self) -> None:
        """Bring the model back after its engine died: wait for the reload that follows a
        death at once, or load it again if that failed."""
        while True:
            with self._reloading:
                if not self.loaded.is_set():  # the reload failed, or none began
                    self._stop()
                    self.load()
                    return
                if self.engine is not None and self.engine.alive:
                    return
            time.sleep(0.05)  # dead, and whoever reads it about to notice: it reloads

    def revive(self) -> None:
        """Load again in the background where the last reload failed (a server's next
        request asks); returns at once, and does nothing while loaded or loading."""
        if self.loaded.is_set() or self.closing or self._reloading.locked():
            return
        threading.Thread(target=self._revive, name="localmed-engine-reload",
                         daemon=True).start()

    def _revive(self) -> None:
        try:
            self.restart()
        except Exception as exc:
            self.failure = str(exc)
            if not self.closing:
                self.on_restart(f"loading the model again failed: {exc}")

    def _stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def close(self) -> None:
        """End the engine, and a reload's if one is starting (none is left)."""
        with self._spawning:
            self.closing = True
        self.loaded.clear()
        self._stop()


class Writer:
    """What goes to one engine connection, written by a thread of its own: a caller only queues.
    A request with a 40 MB image is pickled and written while replies keep streaming in."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="localmed-engine-writer",
                                        daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def _write(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                # send_bytes, not send: ``Connection.send`` writes a bytes object and slices
                # off what each write took, copying the rest each time under the GIL (40 MB
                # to a reader taking 64 KB at a time: another thread of this process waited
                # up to 40 ms, against 2 ms); a memoryview slices for free. The bytes on the
                # wire are the same, and ``recv`` reads them.
                self._conn.send_bytes(ForkingPickler.dumps(message))
            except (OSError, ValueError):  # the engine is gone: the reader says so
                return

    def close(self, last: Any, *, timeout: float) -> None:
        """Write ``last`` (if any) after what is queued, then end (waiting at most
        ``timeout``)."""
        if last is not None:
            self._queue.put(last)
        self._queue.put(None)
        self._thread.join(timeout)
