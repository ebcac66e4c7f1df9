"""The multi-sequence engine (:mod:`localmed.runtimes.batch`) in a process of its own: the one
llama.cpp engine behind ``localmed serve``, ``localmed chat`` and every tab of ``chat --web``.

In the engine process, one thread decodes (every request that has a slot, one ``llama_decode``
per step) and another reads the pipe: it answers tokenization and grammar checks at once, beside
a running decode (llama.cpp's vocabulary is read-only; ctypes lets go of the GIL in
``llama_decode``), and hands requests and cancellations to the decoding thread between steps.
So a server decides what to refuse (a prompt over one sequence's context, a schema llama.cpp
cannot use) without waiting for anyone's reply. The messages are the dataclasses of
:mod:`localmed.runtimes.messages`.

- :class:`BatchClient` starts the engine process and multiplexes requests over its pipe; when
  the engine dies, every request in it hears :class:`EngineDiedError` and the model is loaded
  again at once (the one restart policy: a caller's :meth:`BatchClient.restart` waits for that
  reload, or tries again if it failed). A caller only queues what it sends: a writer thread
  pickles and writes it, so a request with a 40 MB image never holds the lock that the
  reader takes for each token of every other reply; a receiver that raises ends its own
  request only; a close() that comes during a reload stops the process that reload starts.
- :func:`~localmed.runtimes.engine_loop.engine_main` is the engine process's own side.
- :class:`~localmed.runtimes.hub.EngineHub` lets other processes share it (``chat --web``
  tabs), and :class:`~localmed.runtimes.slot_runtime.SlotRuntime` is one conversation's
  :class:`Runtime` on a client: what the chat runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from localmed.errors import EngineDiedError, LocalmedError
from localmed.images import Image
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.engine_loop import engine_main
from localmed.runtimes.load import BatchOptions
from localmed.runtimes.messages import (
    STREAMED,
    Cancel,
    Close,
    Embed,
    Event,
    Failed,
    JsonGrammar,
    Ready,
    Request,
    Tokenize,
)
from localmed.runtimes.process import (
    BATCH_SECONDS,
    describe_exit,
    last_line,
    new_engine_log,
    stop_engine,
)
from localmed.runtimes.vision import Part

Sink = Callable[[Event], None]
"""Where a request's events go (a queue's ``put``, or a relay to another process)."""


class BatchClient:
    """A handle on the engine: requests go in by id, their events come back to each request's
    own sink. ``BatchClient(path, options)`` starts an engine process;
    :meth:`BatchClient.connect` joins one an :class:`EngineHub` shares."""

    def __init__(self, path: Path | None, options: BatchOptions | None, *,
                 batch_seconds: float = BATCH_SECONDS,
                 on_restart: Callable[[str], None] | None = None,
                 address: str | None = None, authkey: bytes | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.options = options
        self.batch_seconds = batch_seconds
        self.on_restart = on_restart or (lambda _: None)
        self.address, self._authkey = address, authkey
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        """Held only to look up or change ``_waiting`` (and queue a message with it): never
        across a pipe write, which the reader would otherwise wait behind."""
        self._restarting = threading.Lock()
        self._spawning = threading.Lock()  # close() against a reload starting a process
        self._waiting: dict[int, tuple[Sink, Callable[[], None] | None]] = {}
        self._closing = False
        self._ready = threading.Event()
        self._process: Any = None
        self._writer: _Writer | None = None
        self._log: Path | None = None
        self._remove_log: Callable[[], Any] = lambda: None
        self._start()

    @classmethod
    def connect(cls, address: str, authkey: bytes) -> BatchClient:
        """A client of the engine an :class:`EngineHub` in another process shares."""
        return cls(None, None, address=address, authkey=authkey)

    def _start(self) -> None:
        with self._spawning:  # a close() from now on stops what this starts
            if self._closing:
                raise LocalmedError("the model is being closed")
            self._writer = None
            if self.address is not None:
                try:
                    self._conn = Client(self.address, family="AF_UNIX", authkey=self._authkey)
                except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
                    raise EngineDiedError(f"shared by localmed chat --web cannot be reached "
                                          f"({type(exc).__name__})") from None
            else:
                ctx = multiprocessing.get_context("spawn")
                self._conn, child = ctx.Pipe()
                self._log = new_engine_log()
                self._remove_log = weakref.finalize(self, self._log.unlink, missing_ok=True)
                self._process = ctx.Process(
                    target=engine_main, name="localmed-engine", daemon=True,
                    args=(child, str(self.path), self.options, str(self._log),
                          self.batch_seconds))
                self._process.start()
                child.close()
        try:
            first = self._conn.recv()
        except (EOFError, OSError):
            died = self._died()
            self._stop_process()
            raise died from None
        if not isinstance(first, Ready):
            self._stop_process()
            raise first.error
        with self._spawning:
            if self._closing:  # closed while it loaded: close() has stopped it
                raise LocalmedError("the model is being closed")
            self.ready: Ready = first
            """What the engine loaded (its info, plan, n_ctx, n_parallel, …): the same for
            every tab it serves, replaced when it is reloaded."""
            self._writer = _Writer(self._conn)
            threading.Thread(target=self._read, args=(self._conn,),
                             name="localmed-engine-reader", daemon=True).start()
            self._ready.set()

    def _died(self) -> EngineDiedError:
        if self._process is None:
            return EngineDiedError("shared by localmed chat --web stopped (the browser "
                                   "chat's server ended)")
        self._process.join(5)
        return EngineDiedError(describe_exit(self._process.exitcode), self._stderr_tail())

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                break
            streamed = isinstance(event, STREAMED)
            with self._lock:
                sink, on_end = self._waiting.get(event.id, (None, None))
                if not streamed:
                    self._waiting.pop(event.id, None)
            if sink is None:
                continue
            try:
                sink(event)
            except Exception:  # that request's fault: it alone ends, the others go on
                _log.exception("localmed: a reply's receiver failed; the reply is cancelled")
                with self._lock:
                    gone = self._waiting.pop(event.id, None) is not None
                    if gone and self._writer is not None:
                        self._writer.put(Cancel(event.id))
                if gone:
                    _finish(on_end)
                continue
            if not streamed:
                _finish(on_end)
        if self._closing:
            return
        with self._restarting:
            died = self._died()
            with self._lock:  # from here a new request is refused, or it is an orphan
                self._ready.clear()
                orphans, self._waiting = self._waiting, {}
            # Reloaded before the requests it dropped hear of it: a client that retries at once
            # finds the model there. New requests meanwhile are refused at once.
            if not self._closing:
                self.on_restart(str(died))
            try:
                self._stop_process()
                self._start()
            except Exception as exc:
                if not self._closing:
                    self.on_restart(f"reloading failed: {exc}")
        _fail(orphans, died)

    def restart(self) -> None:
        """Bring the model back after its engine died: wait for the reload that follows a
        death at once, or load it again if that failed. (The reader is the one that reloads
        after a death; this only waits for it, or loads where its reload failed.)"""
        while True:
            with self._restarting:
                if not self._ready.is_set():  # the reader's reload failed, or none began
                    self._stop_process()
                    self._start()
                    return
                if self.alive:
                    return
            time.sleep(0.05)  # dead, and its reader about to notice: it reloads

    def _stderr_tail(self) -> str:
        return last_line(self._log) if self._log is not None else ""

    def _send(self, sink: Sink, on_end: Callable[[], None] | None,
              message: Callable[[int], Any]) -> int:
        if not self._ready.is_set():
            raise EngineDiedError("is being reloaded after it stopped")
        rid = next(self._ids)
        with self._lock:  # queued, not written: the writer thread pickles and writes it
            if not self._ready.is_set() or self._writer is None:
                raise EngineDiedError("is being reloaded after it stopped")
            self._waiting[rid] = (sink, on_end)
            self._writer.put(message(rid))
        return rid

    def _ask(self, message: Callable[[int], Any]) -> Any:
        answer: queue.Queue[Event] = queue.Queue()
        self._send(answer.put, None, message)
        event = answer.get()
        if isinstance(event, Failed):
            raise event.error
        return event.value  # type: ignore[union-attr]

    # --- what the server and the chat call ------------------------------------------------------

    def tokenize(self, text: str | Sequence[Part], *, add_bos: bool = True) -> list[int]:
        """Tokens of ``text`` (or of text and images: each image's tokens as its placeholder
        id), answered beside running decodes."""
        prompt = text if isinstance(text, str) else tuple(text)
        return self._ask(lambda rid: Tokenize(rid, prompt, add_bos))

    def embed(self, texts: Sequence[str]) -> Any:
        """An embedding model's :class:`~localmed.runtimes.embedding.Embeddings` of
        ``texts``."""
        return self._ask(lambda rid: Embed(rid, tuple(texts)))

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """llama.cpp's grammar for JSON (for ``schema``, if given), made and parsed by the
        engine beside running decodes; a schema it cannot use raises GrammarError."""
        return self._ask(lambda rid: JsonGrammar(rid, schema))

    def submit(self, tokens: Sequence[int], params: GenerationParams, stop: Sequence[str],
               sink: Sink, *, seed: int | None = None, grammar: str | None = None,
               logprobs: int | None = None, cache_prompt: bool = True,
               images: Sequence[Image] = (),
               on_end: Callable[[], None] | None = None) -> int:
        """Start a reply (in arrival order as slots free up); its events go to ``sink``:
        :class:`Piece`… (each after its tokens' :class:`Logprobs` when ``logprobs`` is given),
        then :class:`Done` or :class:`Failed`; ``on_end`` is called once after the last.
        ``cache_prompt`` False: the prompt is prefilled whole, not continued from a slot's
        cells. ``images``: those whose placeholder ids ``tokens`` holds."""
        return self.forward(Request(0, list(tokens), params, tuple(stop), seed, grammar,
                                    logprobs, cache_prompt, tuple(images)), sink,
                            on_end=on_end)

    def forward(self, request: Request, sink: Sink, *,
                on_end: Callable[[], None] | None = None) -> int:
        """Start ``request`` as :meth:`submit` does, under an id of this client's (its own is
        set aside): how a hub passes on a tab's request."""
        return self._send(sink, on_end, lambda rid: dataclasses.replace(request, id=rid))

    def cancel(self, rid: int) -> None:
        with self._lock:
            if rid in self._waiting and self._writer is not None:
                self._writer.put(Cancel(rid))

    @property
    def alive(self) -> bool:
        return self._ready.is_set() and (self._process is None or self._process.is_alive())

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _stop_process(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:  # Close after what is queued; the writer then ends
            writer.close(Close(), timeout=STOP_SECONDS)
        if self._process is not None:
            if writer is None:
                stop_engine(self._process, self._conn)
            else:
                self._process.join(STOP_SECONDS)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join()
                self._conn.close()
        else:
            if writer is None:
                with contextlib.suppress(OSError):
                    self._conn.send(Close())
            self._conn.close()
        self._remove_log()

    def close(self) -> None:
        """End the engine process, and a reload's if one is starting (none is left)."""
        with self._spawning:
            self._closing = True
        with self._lock:
            self._ready.clear()
            orphans, self._waiting = self._waiting, {}
        self._stop_process()
        _fail(orphans, LocalmedError("the model is being closed"))


STOP_SECONDS = 10
"""How long an engine process has to end after Close before it is killed."""

_log = logging.getLogger(__name__)


def _finish(on_end: Callable[[], None] | None) -> None:
    if on_end is not None:
        try:
            on_end()
        except Exception:
            _log.exception("localmed: a reply's end handler failed")


def _fail(orphans: dict[int, tuple[Sink, Callable[[], None] | None]],
          error: LocalmedError) -> None:
    """Tell each request in ``orphans`` it failed with ``error`` (one receiver's failure stops
    no other's)."""
    for rid, (sink, on_end) in orphans.items():
        try:
            sink(Failed(rid, error))
        except Exception:
            _log.exception("localmed: a reply's receiver failed")
        _finish(on_end)


class _Writer:
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
        """Write ``last`` after what is queued, then end (waiting at most ``timeout``)."""
        self._queue.put(last)
        self._queue.put(None)
        self._thread.join(timeout)
