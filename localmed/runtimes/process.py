"""A loaded model in its own process, behind the :class:`ScoringRuntime` interface: what a GPTQ
folder runs on (transformers), one request at a time.

The chat app and the server talk to the model over a local pipe (``multiprocessing``, spawned:
nothing on the network, no fork of a process that holds threads). Decoding then never shares an
interpreter, or its GIL, with Textual's rendering or the HTTP server; and when the engine dies
(the OOM killer, a crash in a native library) the request in it gets an
:class:`EngineDiedError` saying so in one line, after the model has been loaded again: the
process is supervised by :class:`~localmed.runtimes.supervisor.Supervisor`, as the llama.cpp
engine's is.

The messages are :mod:`localmed.runtimes.messages`' (one thing at a time, id 0): the caller
sends :class:`Generate`, :class:`Tokenize`, :class:`Score` or :class:`Close`; the engine answers
:class:`Answer` or :class:`Failed`, or for a generation :class:`Piece`… then :class:`Done`.
Stopping goes through a shared event the engine checks after every token, as in-process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import EngineDiedError, EngineError
from localmed.runtimes.base import (
    GenerationParams,
    GenerationStats,
    Runtime,
    ScoringRuntime,
    batched,
)
from localmed.runtimes.messages import (
    Answer,
    Done,
    Failed,
    Generate,
    Piece,
    Ready,
    Score,
    Tokenize,
    received,
)
from localmed.runtimes.supervisor import (
    BATCH_SECONDS,
    EngineProcess,
    Supervisor,
    portable,
    settle_engine_process,
)


def _engine_main(conn: Connection, stop: Any, path: str, options: Any, log_path: str) -> None:
    """The engine process: load the model, then answer requests until Close or EOF."""
    settle_engine_process(log_path)
    from localmed import formats

    try:
        runtime = formats.load_runtime(Path(path), options)
    except Exception as exc:
        conn.send(Failed(None, portable(exc)))
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
            conn.send(Failed(0, portable(exc)))
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


class EngineRuntime(ScoringRuntime):
    """A :class:`Runtime` whose model is loaded in a child process. ``batch_seconds``: how
    long streamed text may wait in the engine before it is sent on; ``on_restart`` hears the
    engine's death (and a failed reload) in one line."""

    def __init__(self, path: Path, options: Any, *, batch_seconds: float = BATCH_SECONDS,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.options = options
        self.batch_seconds = batch_seconds
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()  # one request at a time
        self._stop = multiprocessing.get_context("spawn").Event()
        self._supervisor = Supervisor(self._spawn, self._commit, on_restart)
        self._supervisor.load()

    def _spawn(self) -> EngineProcess:
        return EngineProcess(_engine_main, self._stop, str(self.path), self.options)

    def _commit(self, engine: EngineProcess, ready: Ready) -> None:
        self._engine = engine
        self.info, self.plan, self._n_ctx = ready.info, ready.plan, ready.n_ctx

    def notices(self) -> list[str]:
        return self._supervisor.notices()

    @property
    def restartable(self) -> bool:
        return True

    def restart(self) -> None:
        """Bring the model back after its engine died: wait for the reload that follows a
        death at once, or load it again if that failed. The caller's state is kept."""
        self._supervisor.restart()

    def revive(self) -> None:
        self._supervisor.revive()

    @property
    def pid(self) -> int | None:
        return self._engine.pid

    @property
    def alive(self) -> bool:
        return self._supervisor.loaded.is_set() and self._engine.alive

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def _lost(self) -> EngineDiedError:
        """The engine died under a request: loaded again at once (the supervisor's policy),
        then the request hears why."""
        died = self._engine.died()
        self._supervisor.lost(died)
        return died

    def _receive(self) -> Any:
        if not self._supervisor.loaded.is_set():
            raise EngineDiedError("is not loaded: its reload failed")
        try:
            return self._engine.conn.recv()
        except (EOFError, OSError):
            raise self._lost() from None

    def _answer(self) -> Any:
        reply = self._receive()
        if isinstance(reply, Failed):
            raise reply.error
        return reply.value if isinstance(reply, Answer) else reply

    def _send(self, request: Any) -> None:
        if not self._supervisor.loaded.is_set():
            raise EngineDiedError("is not loaded: its reload failed")
        try:
            self._engine.conn.send(request)
        except (OSError, ValueError):
            raise self._lost() from None

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
            except EngineDiedError:
                finished = True
                raise
            finally:
                if not finished:
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
        self._supervisor.close()


def open_engine(path: Path, options: Any, *, batch_seconds: float = BATCH_SECONDS
                ) -> EngineRuntime:
    """Start an engine process with the model at ``path`` loaded (``options``: LoadOptions)."""
    return EngineRuntime(path, options, batch_seconds=batch_seconds)
