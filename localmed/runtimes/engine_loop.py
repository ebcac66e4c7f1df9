"""The engine process's own side: load the model, then answer the pipe until Close or its end.

One thread decodes (every request that has a slot, one ``llama_decode`` per step) and another
reads the pipe: it answers tokenization and grammar checks at once, beside a running decode
(llama.cpp's vocabulary is read-only; ctypes lets go of the GIL in ``llama_decode``), and hands
requests and cancellations to the decoding thread between steps. An embedding model's engine
answers one thing at a time. :class:`~localmed.runtimes.batch_process.BatchClient` starts it."""

from __future__ import annotations

import contextlib
import queue
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from localmed.errors import EngineError
from localmed.runtimes.load import BatchOptions, load_engine
from localmed.runtimes.messages import (
    Answer,
    Cancel,
    Close,
    Embed,
    Failed,
    JsonGrammar,
    Ready,
    Request,
    Tokenize,
    received,
)
from localmed.runtimes.supervisor import portable, settle_engine_process


def embed_main(conn: Connection, engine: Any, info: Any, plan: Any) -> None:
    """An embedding model's engine: one thing at a time, until Close/EOF."""
    conn.send(Ready(info, plan, engine.n_batch, 0, "an embedding model",
                    embedding_size=engine.n_embd, pooling=engine.pooling))
    try:
        for message in received(conn):
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
                conn.send(Failed(getattr(message, "id", None), portable(exc)))
    finally:
        engine.close()


def engine_main(conn: Connection, path: str, options: BatchOptions, batch_seconds: float,
                log_path: str) -> None:
    """The engine process: load, then decode whatever requests are in until Close/EOF."""
    from localmed.runtimes.vocab import json_grammar

    settle_engine_process(log_path)
    try:
        engine, info, plan, no_images = load_engine(Path(path), options)
    except Exception as exc:
        conn.send(Failed(None, portable(exc)))
        return
    if options.embedding:
        embed_main(conn, engine, info, plan)
        return
    sending = threading.Lock()

    def send(message: Any) -> None:
        with sending, contextlib.suppress(OSError):
            conn.send(message)

    send(Ready(info, plan, engine.n_ctx_seq, options.n_parallel, no_images,
               host_cache=engine.host_cache.limit, sliding_window=engine.n_swa))
    inbox: queue.Queue[Any] = queue.Queue()

    def receive() -> None:
        for message in received(conn):
            if isinstance(message, (Tokenize, JsonGrammar)):
                try:
                    if isinstance(message, Tokenize):
                        value: Any = engine.tokenize(message.text, add_bos=message.add_bos)
                    else:
                        value = json_grammar(message.schema)
                        engine.check_grammar(value)
                    send(Answer(message.id, value))
                except Exception as exc:
                    send(Failed(message.id, portable(exc)))
            else:
                inbox.put(message)
        inbox.put(Close())

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
                        send(Failed(message.id, portable(exc)))
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
                        send(Failed(rid, portable(exc)))
                    return
                for event in events:
                    send(event)
    finally:
        engine.close()
