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

import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
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
    Embed,
    Event,
    Failed,
    JsonGrammar,
    Ready,
    Request,
    Tokenize,
    received,
)
from localmed.runtimes.supervisor import BATCH_SECONDS, EngineProcess, Supervisor, Writer
from localmed.runtimes.vision import Part

Sink = Callable[[Event], None]
"""Where a request's events go (a queue's ``put``, or a relay to another process)."""


class BatchClient:
    """A handle on the engine: requests go in by id, their events come back to each request's
    own sink. ``BatchClient(path, options)`` starts an engine process;
    :meth:`BatchClient.connect` joins one an :class:`EngineHub` shares. Its process is
    supervised by a :class:`~localmed.runtimes.supervisor.Supervisor`: the reader that hears
    it die has it loaded again, then fails the requests that were in it."""

    def __init__(self, path: Path | None, options: BatchOptions | None, *,
                 batch_seconds: float = BATCH_SECONDS,
                 on_restart: Callable[[str], None] | None = None,
                 address: str | None = None, authkey: bytes | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.options = options
        self.batch_seconds = batch_seconds
        self.address, self._authkey = address, authkey
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        """Held only to look up or change ``_waiting`` (and queue a message with it): never
        across a pipe write, which the reader would otherwise wait behind."""
        self._waiting: dict[int, tuple[Sink, Callable[[], None] | None]] = {}
        self._engine: EngineProcess | None = None
        self._supervisor = Supervisor(self._spawn, self._commit, on_restart)
        self._supervisor.load()

    @classmethod
    def connect(cls, address: str, authkey: bytes) -> BatchClient:
        """A client of the engine an :class:`EngineHub` in another process shares."""
        return cls(None, None, address=address, authkey=authkey)

    def _spawn(self) -> EngineProcess:
        if self.address is not None:
            return EngineProcess.join(self.address, self._authkey)
        return EngineProcess(engine_main, str(self.path), self.options, self.batch_seconds)

    def _commit(self, engine: EngineProcess, ready: Ready) -> None:
        self.ready: Ready = ready
        """What the engine loaded (its info, plan, n_ctx, n_parallel, …): the same for every
        tab it serves, replaced when it is reloaded."""
        engine.writer = Writer(engine.conn)
        self._engine = engine
        threading.Thread(target=self._read, args=(engine,), name="localmed-engine-reader",
                         daemon=True).start()

    def _read(self, engine: EngineProcess) -> None:
        for event in received(engine.conn):
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
                    if gone:
                        self._put(Cancel(event.id))
                if gone:
                    _finish(on_end)
                continue
            if not streamed:
                _finish(on_end)
        if self._supervisor.closing:
            return
        died = engine.died()
        orphans: dict[int, tuple[Sink, Callable[[], None] | None]] = {}

        def orphaned() -> None:  # from here a new request is refused, or it is an orphan
            nonlocal orphans
            with self._lock:
                orphans, self._waiting = self._waiting, {}

        # Reloaded before the requests it dropped hear of it: a client that retries at once
        # finds the model there. New requests meanwhile are refused at once.
        self._supervisor.lost(died, orphaned)
        _fail(orphans, died)

    def restart(self) -> None:
        """Bring the model back after its engine died: wait for the reload that follows a
        death at once, or load it again if that failed."""
        self._supervisor.restart()

    def revive(self) -> None:
        """Load again in the background if the reload after a death failed (at once)."""
        self._supervisor.revive()

    def notices(self) -> list[str]:
        """Its engine's deaths since last asked (each followed by a reload), one sentence
        each."""
        return self._supervisor.notices()

    def _put(self, message: Any) -> None:
        engine = self._engine
        if engine is not None and engine.writer is not None:
            engine.writer.put(message)

    def _send(self, sink: Sink, on_end: Callable[[], None] | None,
              message: Callable[[int], Any]) -> int:
        loaded = self._supervisor.loaded
        if not loaded.is_set():
            raise self._refusal()
        rid = next(self._ids)
        with self._lock:  # queued, not written: the writer thread pickles and writes it
            if not loaded.is_set():
                raise self._refusal()
            self._waiting[rid] = (sink, on_end)
            self._put(message(rid))
        return rid

    def _refusal(self) -> LocalmedError:
        if self._supervisor.closing:
            return LocalmedError("the model is being closed")
        if failure := self._supervisor.failure:
            return EngineDiedError(f"stopped, and could not be loaded again: {failure}")
        return EngineDiedError("is being reloaded after it stopped")

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
            if rid in self._waiting:
                self._put(Cancel(rid))

    @property
    def alive(self) -> bool:
        engine = self._engine
        return self._supervisor.loaded.is_set() and engine is not None and engine.alive

    @property
    def pid(self) -> int | None:
        return self._engine.pid if self._engine is not None else None

    def close(self) -> None:
        """End the engine process, and a reload's if one is starting (none is left)."""
        self._supervisor.close()
        with self._lock:
            orphans, self._waiting = self._waiting, {}
        _fail(orphans, LocalmedError("the model is being closed"))

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
