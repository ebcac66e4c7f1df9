"""A loaded model in its own process, behind the :class:`Runtime` interface.

The chat app and the server talk to the model over a local pipe (``multiprocessing``, spawned:
nothing on the network, no fork of a process that holds threads). Decoding then never shares an
interpreter, or its GIL, with Textual's rendering or the HTTP server; and when the engine dies
(SIGILL on a CPU without the instructions the build assumed, the OOM killer, a llama.cpp abort)
the caller gets an :class:`EngineDiedError` saying so in one line, keeps its state, and can
:meth:`EngineRuntime.restart`.

The messages are :mod:`localmed.runtimes.messages`' (one thing at a time, id 0): the caller
sends :class:`Generate`, :class:`Tokenize`, :class:`Score` or :class:`Close`; the engine answers
:class:`Answer` or :class:`Failed`, or for a generation :class:`Piece`… then :class:`Done`.
Stopping goes through a shared event the engine checks after every token, as in-process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from localmed import offline
from localmed.errors import EngineDiedError, EngineError, LocalmedError
from localmed.runtimes.base import (
    GenerationParams,
    GenerationStats,
    Runtime,
    ScoringRuntime,
    batched,
)
from localmed.runtimes.messages import (
    Answer,
    Close,
    Done,
    Failed,
    Generate,
    Piece,
    Ready,
    Score,
    Tokenize,
    received,
)

_STDERR_TAIL = 4096
BATCH_SECONDS = 0.05
"""Longest a streamed piece waits in the engine, unless the caller asks otherwise: the server's
stream. The chat app asks for what its screen shows new text at."""


def settle_engine_process(log_path: str) -> None:
    """First thing in an engine process: the terminal's Ctrl-C belongs to the app (which stops
    or closes the engine itself); llama.cpp's fd 2 goes to the log (on a TUI's screen it would
    garble it; kept for crash reports), fd 1 nowhere; no socket beyond loopback
    (:mod:`localmed.offline`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.dup2(os.open(log_path, os.O_WRONLY | os.O_APPEND), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    offline.enforce("localmed's engine process")


def _engine_main(conn: Connection, stop: Any, path: str, options: Any, log_path: str) -> None:
    """The engine process: load the model, then answer requests until Close or EOF."""
    settle_engine_process(log_path)
    from localmed import formats

    try:
        runtime = formats.load_runtime(Path(path), options)
    except Exception as exc:
        conn.send(Failed(None, _portable(exc)))
        return
    runtime.share_stop(stop)
    conn.send(Ready(runtime.info, runtime.plan, runtime.n_ctx, 1))
    for request in received(conn):
        try:
            if isinstance(request, Generate):
                _stream(conn, runtime, request)
            elif isinstance(request, Tokenize):
                conn.send(Answer(0, runtime.tokenize(request.text, add_bos=request.add_bos)))
            elif isinstance(request, Score):
                conn.send(Answer(0, runtime.sequence_logits(request.tokens) if request.every
                                 else runtime.next_logits(request.tokens)))
            else:
                conn.send(Failed(0, EngineError(f"unknown request {request!r}")))
        except Exception as exc:  # the engine survives a bad request, as the app does
            conn.send(Failed(0, _portable(exc)))
    runtime.close()


def _stream(conn: Connection, runtime: Runtime, request: Generate) -> None:
    """Relay a reply in batches of at most ``batch_seconds``: the caller wakes ~10-20 times a
    second, not once per token. On a machine whose cores all decode, each wake-up of another
    process preempts one of llama.cpp's threads, and its barrier stalls the rest (measured on 2
    cores: 0.65x raw speed per token, 0.9x+ batched). Stop still acts after the current
    token."""
    for text in batched(runtime.stream(request.prompt, request.params, request.stop),
                        request.batch_seconds):
        conn.send(Piece(0, text))
    conn.send(Done(0, runtime.last_stats))


def new_engine_log() -> Path:
    """A private (0600) file for an engine process's stderr: llama.cpp's last words."""
    log = tempfile.NamedTemporaryFile(prefix="localmed-engine-", suffix=".log", delete=False)
    log.close()
    os.chmod(log.name, 0o600)
    return Path(log.name)


def last_line(log: Path) -> str:
    """The last line an engine wrote to its log, for the one-line error when it dies."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _STDERR_TAIL))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


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


class EngineRuntime(ScoringRuntime):
    """A :class:`Runtime` whose model is loaded in a child process. ``batch_seconds``: how
    long streamed text may wait in the engine before it is sent on."""

    def __init__(self, path: Path, options: Any, *, batch_seconds: float = BATCH_SECONDS) -> None:
        self.path = Path(path)
        self.options = options
        self.batch_seconds = batch_seconds
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._conn, child = ctx.Pipe()
        self._log = new_engine_log()
        # Gone with close(), or at the latest when this process exits without one.
        self._remove_log = weakref.finalize(self, self._log.unlink, missing_ok=True)
        self._process = ctx.Process(
            target=_engine_main, name="localmed-engine", daemon=True,
            args=(child, self._stop, str(self.path), self.options, str(self._log)))
        self._process.start()
        child.close()
        try:
            ready = self._answer()
            self.info, self.plan, self._n_ctx = ready.info, ready.plan, ready.n_ctx
        except BaseException:
            self.close()
            raise

    @property
    def restartable(self) -> bool:
        return True

    def restart(self) -> None:
        """Load the model again in a new engine (after it died); the caller's state is kept.
        Calls from other threads wait for it."""
        with self._lock:
            self.close()
            self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def _receive(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineDiedError(describe_exit(self._process.exitcode),
                                  self._stderr_tail()) from None

    def _stderr_tail(self) -> str:
        return last_line(self._log)

    def _answer(self) -> Any:
        reply = self._receive()
        if isinstance(reply, Failed):
            raise reply.error
        return reply.value if isinstance(reply, Answer) else reply

    def _send(self, request: Any) -> None:
        try:
            self._conn.send(request)
        except (BrokenPipeError, OSError):
            self._process.join(5)
            raise EngineDiedError(describe_exit(self._process.exitcode),
                                  self._stderr_tail()) from None

    def _call(self, request: Any) -> Any:
        with self._lock:
            self._send(request)
            return self._answer()

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._call(Tokenize(0, text, add_bos))

    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        with self._lock:
            self._stop.clear()
            self._send(Generate(prompt, params or GenerationParams(), tuple(stop),
                                self.batch_seconds))
            self.last_stats = GenerationStats()
            finished = False
            try:
                while True:
                    reply = self._receive()
                    if isinstance(reply, Piece):
                        yield reply.text
                    elif isinstance(reply, Done):
                        self.last_stats = reply.stats
                        finished = True
                        return
                    else:
                        finished = True
                        raise reply.error
            finally:
                if not finished and self._process.is_alive():
                    self._drain()

    def _drain(self) -> None:
        """A caller left a reply before its end: stop it, and read what is still on its way,
        so the next request does not get this one's tail."""
        self._stop.set()
        with contextlib.suppress(EngineDiedError):
            while isinstance(self._receive(), Piece):
                pass

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self._call(Score(list(tokens)))

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self._call(Score(list(tokens), every=True))

    def close(self) -> None:
        stop_engine(self._process, self._conn)
        self._remove_log()


def stop_engine(process: Any, conn: Connection) -> None:
    """Ask an engine process to close, kill it if it has not within 10 s, close the pipe."""
    if process.is_alive():
        with contextlib.suppress(OSError):
            conn.send(Close())
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
    conn.close()


def _portable(exc: Exception) -> LocalmedError:
    """localmed's errors cross the pipe as they are; anything else as an EngineError."""
    if isinstance(exc, LocalmedError):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}")


def open_engine(path: Path, options: Any, *, batch_seconds: float = BATCH_SECONDS
                ) -> EngineRuntime:
    """Start an engine process with the model at ``path`` loaded (``options``: LoadOptions)."""
    return EngineRuntime(path, options, batch_seconds=batch_seconds)
