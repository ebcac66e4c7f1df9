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
- :class:`EngineHub` lets other processes share it: ``chat --web --sessions N`` loads the
  model once, for N sequences, and each browser tab's ``localmed chat`` connects over a private
  Unix socket (``BatchClient.connect``) instead of loading its own copy.
- :class:`SlotRuntime` is one conversation's :class:`Runtime` on a client: what the chat runs.
  Its sequence keeps its cells between turns, so a follow-up prefills only the new turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import ContextFullError, EngineDiedError, EngineError, LocalmedError
from localmed.images import Image
from localmed.runtimes.base import GenerationParams, GenerationStats, Runtime
from localmed.runtimes.messages import (
    STREAMED,
    Answer,
    Cancel,
    Close,
    Done,
    Embed,
    Event,
    Failed,
    JsonGrammar,
    Piece,
    Ready,
    Request,
    Tokenize,
)
from localmed.runtimes.process import (
    BATCH_SECONDS,
    _portable,
    describe_exit,
    last_line,
    new_engine_log,
    settle_engine_process,
    stop_engine,
)
from localmed.runtimes.vision import Part

ENGINE_ADDRESS_ENV = "LOCALMED_ENGINE"
ENGINE_KEY_ENV = "LOCALMED_ENGINE_KEY"
"""Where a ``chat --web`` tab finds the shared engine, and the key it proves itself with (set by
the web server for the processes it starts; the socket's folder is the user's alone)."""


@dataclass(frozen=True)
class BatchOptions:
    """How to load a model for several sequences; None leaves the choice to the planner."""

    n_parallel: int
    n_ctx_seq: int | None = None
    """Tokens each sequence may hold (prompt and reply); None: the model's, at most 4096."""
    gpu_layers: int | None = None
    threads: int | None = None
    cache_ram: int = 0
    """Bytes of host memory for the cells of conversations whose slot was taken (0: none)."""
    projector: Path | None = None
    """The vision projector (``--mmproj``); None: the one beside the model, if any."""
    embedding: bool = False
    """An embedding model (:mod:`localmed.runtimes.embedding`): it answers :class:`Embed`, and
    generates nothing."""
    pooling: str = ""
    """An embedding model's pooling where its GGUF declares none."""
    cache_reuse: int = 0
    """Runs of cells this long are moved back past turns a chat left out (0: none; the chat's
    :data:`~localmed.runtimes.prompt_cache.CACHE_REUSE`)."""


def _load(path: Path, options: BatchOptions) -> tuple[Any, Any, Any, str]:
    from localmed.formats.gguf import read_gguf_footprint
    from localmed.planner import plan_offload, refuse_unless_fits
    from localmed.projector import pair, with_projector
    from localmed.runtimes import hardware
    from localmed.runtimes.batch import BatchEngine

    info, footprint = read_gguf_footprint(path)
    if options.embedding:
        from localmed.runtimes.embedding import EmbeddingEngine

        plan = refuse_unless_fits(plan_offload(footprint, hardware.detect(),
                                               n_ctx=min(footprint.n_ctx_train, EMBED_BATCH),
                                               gpu_layers=options.gpu_layers), path)
        return (EmbeddingEngine(path, gpu_layers=plan.n_gpu_layers_arg, threads=options.threads,
                                n_batch=EMBED_BATCH, pooling=options.pooling), info, plan,
                "an embedding model")
    pairing = pair(path, options.projector)
    per_sequence = options.n_ctx_seq or min(footprint.n_ctx_train, 4096)
    plan = refuse_unless_fits(plan_offload(with_projector(footprint, pairing), hardware.detect(),
                                           n_ctx=per_sequence * options.n_parallel,
                                           gpu_layers=options.gpu_layers), path)
    engine = BatchEngine(path, n_parallel=options.n_parallel, n_ctx=plan.n_ctx,
                         gpu_layers=plan.n_gpu_layers_arg, threads=options.threads,
                         cache_ram=options.cache_ram, flash_attention=plan.flash_attention,
                         projector=pairing.projector.path if pairing.projector else None,
                         cache_reuse=options.cache_reuse)
    return engine, info, plan, pairing.absent


EMBED_BATCH = 512
"""Tokens an embedding model's batch holds (``llama_cpp.Llama``'s default ``n_batch``); a text
longer than that (or than the model's context) is cut to it."""


def _embed_main(conn: Connection, engine: Any, info: Any, plan: Any) -> None:
    """An embedding model's engine: one thing at a time, until Close/EOF."""
    conn.send(Ready(info, plan, engine.n_batch, 0, "an embedding model",
                    embedding_size=engine.n_embd, pooling=engine.pooling))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(message, Close):
                return
            try:
                if isinstance(message, Embed):
                    value: Any = engine.embed(message.texts)
                elif isinstance(message, Tokenize) and isinstance(message.text, str):
                    value = engine.tokenize(message.text)
                else:
                    raise EngineError("this engine holds an embedding model: it embeds text, "
                                      "and generates nothing")
                conn.send(Answer(message.id, value))
            except (EOFError, OSError):
                return
            except Exception as exc:
                conn.send(Failed(getattr(message, "id", None), _portable(exc)))
    finally:
        engine.close()


def _engine_main(conn: Connection, path: str, options: BatchOptions, log_path: str,
                 batch_seconds: float) -> None:
    """The engine process: load, then decode whatever requests are in until Close/EOF."""
    from localmed.runtimes.batch import json_grammar

    settle_engine_process(log_path)
    try:
        engine, info, plan, no_images = _load(Path(path), options)
    except Exception as exc:
        conn.send(Failed(None, _portable(exc)))
        return
    if options.embedding:
        _embed_main(conn, engine, info, plan)
        return
    sending = threading.Lock()

    def send(message: Any) -> None:
        with sending, contextlib.suppress(OSError):
            conn.send(message)

    send(Ready(info, plan, engine.n_ctx_seq, options.n_parallel, no_images,
               host_cache=engine.host_cache.limit, sliding_window=engine.n_swa))
    inbox: queue.Queue[Any] = queue.Queue()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                inbox.put(Close())
                return
            if isinstance(message, (Tokenize, JsonGrammar)):
                try:
                    if isinstance(message, Tokenize):
                        value: Any = engine.tokenize(message.text, add_bos=message.add_bos)
                    else:
                        value = json_grammar(message.schema)
                        engine.check_grammar(value)
                    send(Answer(message.id, value))
                except Exception as exc:
                    send(Failed(message.id, _portable(exc)))
            else:
                inbox.put(message)
                if isinstance(message, Close):
                    return

    threading.Thread(target=receive, name="localmed-engine-pipe", daemon=True).start()
    try:
        while True:
            try:
                message = inbox.get(block=not engine.busy)
            except queue.Empty:
                message = None
            while message is not None:
                if isinstance(message, Close):
                    return
                if isinstance(message, Request):
                    try:
                        engine.submit(message)
                    except Exception as exc:
                        send(Failed(message.id, _portable(exc)))
                elif isinstance(message, Cancel):
                    for event in engine.cancel(message.id):
                        send(event)
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    message = None
            if engine.busy:
                try:
                    events = engine.step(batch_seconds)
                except Exception as exc:  # every request in it hears; the process ends
                    for rid in engine.request_ids():
                        send(Failed(rid, _portable(exc)))
                    return
                for event in events:
                    send(event)
    finally:
        engine.close()


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
                    target=_engine_main, name="localmed-engine", daemon=True,
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

ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX = 0.05, 2.0
"""The hub's wait before accepting again after its own failure (doubling from the first to
the second): EMFILE leaves the connection pending, and a loop that retried at once would spin."""

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


class EngineHub:
    """One engine shared with other processes of this user: ``chat --web`` tabs.

    It listens on a Unix socket in a private (0700) folder and accepts only a process that
    knows its random key (``multiprocessing``'s HMAC challenge); each connection speaks the
    engine's own protocol, relayed through ``client`` with its request ids translated. A tab
    that closes has its replies cancelled (its sequence is free at once); one that reads
    slowly holds up only itself (each has its own outbox)."""

    def __init__(self, client: BatchClient) -> None:
        self.client = client
        self._folder = tempfile.mkdtemp(prefix="localmed-engine-")
        self.address = os.path.join(self._folder, "engine.sock")
        self.authkey = secrets.token_bytes(32)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._closed = False
        threading.Thread(target=self._accept, name="localmed-engine-hub", daemon=True).start()

    def environment(self) -> dict[str, str]:
        """What a process started for a tab needs to find the engine."""
        return {ENGINE_ADDRESS_ENV: self.address, ENGINE_KEY_ENV: self.authkey.hex()}

    def _accept(self) -> None:
        pause = 0.0
        while not self._closed:
            try:
                conn = self._listener.accept()
            except (EOFError, multiprocessing.AuthenticationError, ConnectionError):
                continue  # that process's fault (a wrong key, gone mid-handshake): next
            except OSError as exc:
                if self._closed:
                    return
                # The process's own trouble (EMFILE: out of file descriptors; ENOBUFS, …):
                # the connection stays pending, so accepting again at once would spin.
                pause = min(ACCEPT_PAUSE_MAX, max(ACCEPT_PAUSE_MIN, pause * 2))
                _log.warning("localmed: the engine's socket cannot accept a tab (%s); trying "
                             "again in %.1f s", exc.strerror or exc, pause)
                time.sleep(pause)
                continue
            pause = 0.0
            threading.Thread(target=self._relay, args=(conn,), name="localmed-engine-tab",
                             daemon=True).start()

    def _relay(self, conn: Connection) -> None:
        client = self.client
        outbox: queue.Queue[Any] = queue.Queue()

        def deliver() -> None:
            while (message := outbox.get()) is not None:
                try:
                    conn.send(message)
                except OSError:
                    return

        sender = threading.Thread(target=deliver, name="localmed-engine-tab-out", daemon=True)
        sender.start()
        outbox.put(client.ready)
        theirs: dict[int, int] = {}  # the tab's request id -> the client's

        def relay(tab_id: int) -> Sink:
            return lambda event: outbox.put(dataclasses.replace(event, id=tab_id))

        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Close):
                break
            try:
                if isinstance(message, Request):
                    tab_id = message.id
                    theirs[tab_id] = client.forward(
                        message, relay(tab_id),
                        on_end=lambda tab_id=tab_id: theirs.pop(tab_id, None))
                elif isinstance(message, Cancel):
                    if (rid := theirs.get(message.id)) is not None:
                        client.cancel(rid)
                elif isinstance(message, Tokenize):
                    outbox.put(Answer(message.id, client.tokenize(message.text,
                                                                  add_bos=message.add_bos)))
                elif isinstance(message, JsonGrammar):
                    outbox.put(Answer(message.id, client.json_grammar(message.schema)))
                elif isinstance(message, Embed):
                    outbox.put(Answer(message.id, client.embed(message.texts)))
            except Exception as exc:
                outbox.put(Failed(getattr(message, "id", None), _portable(exc)))
        for rid in list(theirs.values()):
            client.cancel(rid)
        outbox.put(None)
        sender.join(5)
        conn.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)


TOKENIZED_KEPT = 4
"""Prompts whose token ids a chat keeps. A message is counted to see that it fits, counted
again as it is added, then sent: one prompt tokenized three times, and with images each time
would send every picture's pixels over the engine's pipe (36 MB for a 12-megapixel photo) for
mtmd to prepare again."""


class SlotRuntime(Runtime):
    """One conversation on the engine: the :class:`Runtime` that ``localmed chat`` runs.

    Each reply is a request to ``client``; the engine gives it the sequence that holds the
    longest beginning of its prompt (this conversation's, one turn back), so a follow-up
    prefills only what is new. ``stop`` cancels the reply at the engine (after the current
    token); a caller that leaves a reply midway cancels it too."""

    def __init__(self, client: BatchClient) -> None:
        self.client = client
        self.last_stats = GenerationStats()
        self._stop = threading.Event()
        self._current: int | None = None
        self._notices: list[str] = []
        self._tokenized: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        self._tokenizing = threading.Lock()  # the screen's fit check beside a reply's worker
        told = client.on_restart

        def heard(why: str) -> None:  # the client reloads a dead engine at once
            self._notices.append(why)
            told(why)

        client.on_restart = heard

    def notices(self) -> list[str]:
        deaths, self._notices = self._notices, []
        return [f"{why[:1].upper()}{why[1:]}; the model was loaded again and the conversation "
                "is kept." for why in deaths]

    @property
    def info(self) -> Any:  # type: ignore[override]
        return self.client.ready.info

    @property
    def plan(self) -> Any:  # type: ignore[override]
        return self.client.ready.plan

    @property
    def n_ctx(self) -> int:
        return self.client.ready.n_ctx

    def tokenize(self, text: str | Sequence[Part], *, add_bos: bool = True) -> list[int]:
        """The engine's tokens for ``text``, the last few prompts' kept (an image stands in the
        key as its pixels' digest)."""
        key = (add_bos, text) if isinstance(text, str) else \
            (add_bos, *(p if isinstance(p, str) else ("image", p.digest) for p in text))
        with self._tokenizing:
            if (kept := self._tokenized.get(key)) is not None:
                self._tokenized.move_to_end(key)
                return list(kept)
        tokens = self.client.tokenize(text, add_bos=add_bos)
        with self._tokenizing:
            self._tokenized[key] = tokens
            while len(self._tokenized) > TOKENIZED_KEPT:
                self._tokenized.popitem(last=False)
        return list(tokens)

    @property
    def no_images(self) -> str:
        return self.client.ready.no_images

    def stream(self, prompt: str | Sequence[Part], params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """The reply to ``prompt``: a text, or text and images in the order the template
        put them (:func:`localmed.images.prompt_parts`)."""
        tokens = self.tokenize(prompt)
        images = () if isinstance(prompt, str) else \
            tuple(part for part in prompt if isinstance(part, Image))
        if len(tokens) >= self.n_ctx:
            raise ContextFullError(f"the prompt has {len(tokens)} tokens; the context holds "
                                   f"{self.n_ctx}")
        events: queue.Queue[Event] = queue.Queue()
        self._stop.clear()
        self.last_stats = GenerationStats(prompt_tokens=len(tokens))
        rid = self._current = self.client.submit(tokens, params or GenerationParams(),
                                                 tuple(stop), events.put, images=images)
        if self._stop.is_set():  # stop() came between the submit and knowing its id
            self.client.cancel(rid)
        ended = False
        try:
            while True:
                event = events.get()
                if isinstance(event, Piece):
                    yield event.text
                elif isinstance(event, Done):
                    ended = True
                    self.last_stats = event.stats
                    return
                elif isinstance(event, Failed):
                    ended = True
                    raise event.error
        finally:
            self._current = None
            if not ended:  # the caller left midway: stop it, and read it to its end
                self.client.cancel(rid)
                while not isinstance(events.get(), (Done, Failed)):
                    pass

    def stop(self) -> None:
        self._stop.set()
        if (rid := self._current) is not None:
            self.client.cancel(rid)

    @property
    def alive(self) -> bool:
        return self.client.alive

    @property
    def restartable(self) -> bool:
        return True

    def restart(self) -> None:
        self.client.restart()

    @property
    def pid(self) -> int | None:
        return self.client.pid

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        raise EngineError("the chat engine does not score: bench loads its own model")

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        raise EngineError("the chat engine does not score: bench loads its own model")

    def close(self) -> None:
        self.client.close()
