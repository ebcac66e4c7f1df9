"""The multi-sequence engine (:mod:`localmed.runtimes.batch`) in a process of its own, for
``localmed serve``.

In the engine process, one thread decodes (every request that has a slot, one ``llama_decode``
per step) and another reads the pipe: it answers tokenization and grammar checks at once, beside
a running decode (llama.cpp's vocabulary is read-only; ctypes lets go of the GIL in
``llama_decode``), and hands requests and cancellations to the decoding thread between steps.
So the server decides what to refuse (a prompt over one sequence's context, a schema llama.cpp
cannot use) without waiting for anyone's reply.

Protocol (pickled tuples), every message after the first naming a request id:
``("submit", id, tokens, params, stop, seed, grammar, logprobs, cache_prompt)``,
``("cancel", id)``, ``("tokenize", id, text, add_bos)``, ``("json_grammar", id, schema)``, ``("close",)``; answers
``("logprobs", id, entries)`` (before the piece that holds their text), ``("piece", id, text)``,
``("done", id, stats)``, ``("ok", id, value)``, ``("error", id, error)``.
The first message from the engine is ``("ready", info, plan, n_ctx_seq)`` or
``("error", None, error)``.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from localmed.errors import EngineDiedError, LocalmedError, ModelTooLargeError
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.process import (
    BATCH_SECONDS,
    _portable,
    describe_exit,
    last_line,
    new_engine_log,
    settle_engine_process,
    stop_engine,
)

_STREAMED = ("piece", "logprobs")
"""Events a request gets several of; any other is its last."""


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


def _load(path: Path, options: BatchOptions) -> tuple[Any, Any, Any]:
    from localmed.formats.gguf import read_gguf_footprint
    from localmed.planner import plan_offload
    from localmed.runtimes import hardware
    from localmed.runtimes.batch import BatchEngine

    info, footprint = read_gguf_footprint(path)
    per_sequence = options.n_ctx_seq or min(footprint.n_ctx_train, 4096)
    plan = plan_offload(footprint, hardware.detect(), n_ctx=per_sequence * options.n_parallel,
                        gpu_layers=options.gpu_layers)
    if not plan.fits:
        raise ModelTooLargeError(path, plan.reasons[-1], plan.suggestion, plan)
    engine = BatchEngine(path, n_parallel=options.n_parallel, n_ctx=plan.n_ctx,
                         gpu_layers=plan.n_gpu_layers_arg, threads=options.threads,
                         cache_ram=options.cache_ram, flash_attention=plan.flash_attention)
    return engine, info, plan


def _engine_main(conn: Connection, path: str, options: BatchOptions, log_path: str,
                 batch_seconds: float) -> None:
    """The engine process: load, then decode whatever requests are in until ``close``/EOF."""
    from localmed.runtimes.batch import Request, json_grammar

    settle_engine_process(log_path)
    try:
        engine, info, plan = _load(Path(path), options)
    except Exception as exc:
        conn.send(("error", None, _portable(exc)))
        return
    sending = threading.Lock()

    def send(*message: Any) -> None:
        with sending, contextlib.suppress(OSError):
            conn.send(message)

    send("ready", info, plan, engine.n_ctx_seq)
    inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def receive() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                inbox.put(("close",))
                return
            op = message[0]
            if op in ("tokenize", "json_grammar"):
                try:
                    if op == "tokenize":
                        value: Any = engine.tokenize(message[2], add_bos=message[3])
                    else:
                        value = json_grammar(message[2])
                        engine.check_grammar(value)
                    send("ok", message[1], value)
                except Exception as exc:
                    send("error", message[1], _portable(exc))
            else:
                inbox.put(message)
                if op == "close":
                    return

    threading.Thread(target=receive, name="localmed-engine-pipe", daemon=True).start()
    try:
        while True:
            try:
                message = inbox.get(block=not engine.busy)
            except queue.Empty:
                message = None
            while message is not None:
                if message[0] == "close":
                    return
                if message[0] == "submit":
                    _, rid, tokens, params, stop, seed, grammar, logprobs, cache = message
                    try:
                        engine.submit(Request(rid, tokens, params, stop, seed, grammar,
                                              logprobs, cache))
                    except Exception as exc:
                        send("error", rid, _portable(exc))
                elif message[0] == "cancel":
                    for event in engine.cancel(message[1]):
                        send(*event)
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    message = None
            if engine.busy:
                try:
                    events = engine.step(batch_seconds)
                except Exception as exc:  # every request in it hears; the process ends
                    for rid in engine.request_ids():
                        send("error", rid, _portable(exc))
                    return
                for event in events:
                    send(*event)
    finally:
        engine.close()


class BatchClient:
    """The server's handle on the engine process: requests go in by id, their events come back
    on each request's own queue. When the engine dies, every request in it gets an
    :class:`EngineDiedError` and the model is loaded again in a new process."""

    def __init__(self, path: Path, options: BatchOptions, *,
                 batch_seconds: float = BATCH_SECONDS,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.options = options
        self.batch_seconds = batch_seconds
        self.on_restart = on_restart or (lambda _: None)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[queue.Queue[tuple[str, Any]],
                                       Callable[[], None] | None]] = {}
        self._closing = False
        self._ready = threading.Event()
        self._start()

    @property
    def n_parallel(self) -> int:
        return self.options.n_parallel

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._log = new_engine_log()
        self._remove_log = weakref.finalize(self, self._log.unlink, missing_ok=True)
        self._process = ctx.Process(
            target=_engine_main, name="localmed-engine", daemon=True,
            args=(child, str(self.path), self.options, str(self._log), self.batch_seconds))
        self._process.start()
        child.close()
        try:
            first = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            self._stop_process()
            raise EngineDiedError(describe_exit(self._process.exitcode),
                                  self._stderr_tail()) from None
        if first[0] != "ready":
            self._stop_process()
            raise first[2]
        _, self.info, self.plan, self.n_ctx = first
        reader = threading.Thread(target=self._read, args=(self._conn, self._process),
                                  name="localmed-engine-reader", daemon=True)
        reader.start()
        self._ready.set()

    def _read(self, conn: Connection, process: Any) -> None:
        while True:
            try:
                kind, rid, value = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                events, on_end = self._waiting.get(rid, (None, None))
                if kind not in _STREAMED:
                    self._waiting.pop(rid, None)
            if events is None:
                continue
            events.put((kind, value))
            if kind not in _STREAMED and on_end is not None:
                on_end()
        if self._closing:
            return
        process.join(5)
        died = EngineDiedError(describe_exit(process.exitcode), self._stderr_tail())
        self._ready.clear()
        with self._lock:
            orphans, self._waiting = self._waiting, {}
        # Reloaded before the requests it dropped hear of it: a client that retries at once
        # finds the model there. New requests meanwhile are refused at once (503).
        self.on_restart(str(died))
        try:
            self._start()
        except Exception as exc:
            self.on_restart(f"reloading failed: {exc}")
        for events, on_end in orphans.values():
            events.put(("error", died))
            if on_end is not None:
                on_end()

    def _stderr_tail(self) -> str:
        return last_line(self._log)

    def _send(self, events: queue.Queue[tuple[str, Any]], on_end: Callable[[], None] | None,
              op: str, *args: Any) -> int:
        if not self._ready.is_set():
            raise EngineDiedError("is being reloaded after it stopped")
        rid = next(self._ids)
        with self._lock:
            self._waiting[rid] = (events, on_end)
            try:
                self._conn.send((op, rid, *args))
            except OSError:
                self._waiting.pop(rid, None)
                raise EngineDiedError("is being reloaded after it stopped") from None
        return rid

    def _ask(self, op: str, *args: Any) -> Any:
        answer: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._send(answer, None, op, *args)
        kind, value = answer.get()
        if kind == "error":
            raise value
        return value

    # --- what the server calls ------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokens of ``text``, answered beside running decodes."""
        return self._ask("tokenize", text, add_bos)

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """llama.cpp's grammar for JSON (for ``schema``, if given), made and parsed by the
        engine beside running decodes; a schema it cannot use raises GrammarError."""
        return self._ask("json_grammar", schema)

    def submit(self, tokens: Sequence[int], params: GenerationParams, stop: Sequence[str],
               events: queue.Queue[tuple[str, Any]], *, seed: int | None = None,
               grammar: str | None = None, logprobs: int | None = None,
               cache_prompt: bool = True, on_end: Callable[[], None] | None = None) -> int:
        """Start a reply (in arrival order as slots free up); its events go to ``events``:
        ``("piece", text)``… (each after its tokens' ``("logprobs", entries)`` when
        ``logprobs`` is given), then ``("done", stats)`` or ``("error", LocalmedError)``;
        ``on_end`` is called once after the last. ``cache_prompt`` False: the prompt is
        prefilled whole, not continued from a slot's cells."""
        return self._send(events, on_end, "submit", list(tokens), params, tuple(stop), seed,
                          grammar, logprobs, cache_prompt)

    def cancel(self, rid: int) -> None:
        with self._lock, contextlib.suppress(OSError):
            if rid in self._waiting:
                self._conn.send(("cancel", rid))

    @property
    def alive(self) -> bool:
        return self._ready.is_set() and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _stop_process(self) -> None:
        stop_engine(self._process, self._conn)
        self._remove_log()

    def close(self) -> None:
        self._closing = True
        self._ready.clear()
        self._stop_process()
        with self._lock:
            orphans, self._waiting = self._waiting, {}
        for events, on_end in orphans.values():
            events.put(("error", LocalmedError("the server is stopping")))
            if on_end is not None:
                on_end()
