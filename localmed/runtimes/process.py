"""A loaded model in its own process, behind the :class:`Runtime` interface.

The chat app and the server talk to the model over a local pipe (``multiprocessing``, spawned:
nothing on the network, no fork of a process that holds threads). Decoding then never shares an
interpreter, or its GIL, with Textual's rendering or the HTTP server; and when the engine dies
(SIGILL on a CPU without the instructions the build assumed, the OOM killer, a llama.cpp abort)
the caller gets an :class:`EngineDiedError` saying so in one line, keeps its state, and can
:meth:`EngineRuntime.restart`.

Protocol (pickled tuples): the caller sends ``(op, *args)``; the engine answers ``("ok", value)``,
``("error", kind, message)``, or, for ``stream``, ``("piece", text)``… then ``("done", stats)``.
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
from localmed.runtimes.base import GenerationParams, GenerationStats, Runtime, batched

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
    """The engine process: load the model, then answer requests until ``close`` or EOF."""
    settle_engine_process(log_path)
    from localmed import formats

    try:
        runtime = formats.load_runtime(Path(path), options)
    except Exception as exc:
        conn.send(("error", _portable(exc)))
        return
    runtime.share_stop(stop)
    conn.send(("ok", (runtime.info, runtime.plan, runtime.n_ctx)))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        op, args = request[0], request[1:]
        if op == "close":
            break
        try:
            if op == "stream":
                _stream(conn, runtime, args)
            elif op == "tokenize":
                conn.send(("ok", runtime.tokenize(args[0], add_bos=args[1])))
            elif op == "next_logits":
                conn.send(("ok", runtime.next_logits(args[0])))
            elif op == "sequence_logits":
                conn.send(("ok", runtime.sequence_logits(args[0])))
            else:
                conn.send(("error", EngineError(f"unknown request {op!r}")))
        except Exception as exc:  # the engine survives a bad request, as the app does
            conn.send(("error", _portable(exc)))
    runtime.close()


def _stream(conn: Connection, runtime: Runtime, args: tuple[Any, ...]) -> None:
    """Relay a reply in batches of at most ``batch_seconds`` (the last argument): the caller
    wakes ~10-20 times a second, not once per token. On a machine whose cores all decode, each
    wake-up of another process preempts one of llama.cpp's threads, and its barrier stalls the
    rest (measured on 2 cores: 0.65x raw speed per token, 0.9x+ batched). Stop still acts after
    the current token."""
    *args, batch_seconds = args
    for text in batched(runtime.stream(*args), batch_seconds):
        conn.send(("piece", text))
    conn.send(("done", runtime.last_stats))


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


class EngineRuntime(Runtime):
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
            self.info, self.plan, self._n_ctx = self._answer()
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

    def _receive(self) -> tuple[Any, ...]:
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
        if reply[0] == "ok":
            return reply[1]
        raise _remote_error(reply)

    def _send(self, *request: Any) -> None:
        try:
            self._conn.send(request)
        except (BrokenPipeError, OSError):
            self._process.join(5)
            raise EngineDiedError(describe_exit(self._process.exitcode),
                                  self._stderr_tail()) from None

    def _call(self, *request: Any) -> Any:
        with self._lock:
            self._send(*request)
            return self._answer()

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._call("tokenize", text, add_bos)

    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        with self._lock:
            self._stop.clear()
            self._send("stream", prompt, params or GenerationParams(), tuple(stop),
                       self.batch_seconds)
            self.last_stats = GenerationStats()
            finished = False
            try:
                while True:
                    reply = self._receive()
                    if reply[0] == "piece":
                        yield reply[1]
                    elif reply[0] == "done":
                        self.last_stats = reply[1]
                        finished = True
                        return
                    else:
                        finished = True
                        raise _remote_error(reply)
            finally:
                if not finished and self._process.is_alive():
                    self._drain()

    def _drain(self) -> None:
        """A caller left a reply before its end: stop it, and read what is still on its way,
        so the next request does not get this one's tail."""
        self._stop.set()
        with contextlib.suppress(EngineDiedError):
            while self._receive()[0] == "piece":
                pass

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self._call("next_logits", list(tokens))

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self._call("sequence_logits", list(tokens))

    def close(self) -> None:
        stop_engine(self._process, self._conn)
        self._remove_log()


def stop_engine(process: Any, conn: Connection, close: Any = ("close",)) -> None:
    """Ask an engine process to close (``close``: the message its protocol says it with), kill
    it if it has not within 10 s, close the pipe."""
    if process.is_alive():
        with contextlib.suppress(OSError):
            conn.send(close)
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


def _remote_error(reply: tuple[Any, ...]) -> LocalmedError:
    return reply[1]


def open_engine(path: Path, options: Any, *, batch_seconds: float = BATCH_SECONDS
                ) -> EngineRuntime:
    """Start an engine process with the model at ``path`` loaded (``options``: LoadOptions)."""
    return EngineRuntime(path, options, batch_seconds=batch_seconds)
