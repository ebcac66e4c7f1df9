"""One engine shared with other processes of this user: ``chat --web --sessions N`` loads the
model once, for N sequences, and each browser tab's ``localmed chat`` connects over a private
Unix socket (:meth:`~localmed.runtimes.batch_process.BatchClient.connect`) instead of loading
its own copy."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener
from typing import Any

from localmed.runtimes.batch_process import BatchClient, Sink
from localmed.runtimes.messages import (
    Answer,
    Cancel,
    Embed,
    Failed,
    JsonGrammar,
    Request,
    Tokenize,
    received,
)
from localmed.runtimes.supervisor import portable

ENGINE_ADDRESS_ENV = "LOCALMED_ENGINE"
ENGINE_KEY_ENV = "LOCALMED_ENGINE_KEY"
"""Where a ``chat --web`` tab finds the shared engine, and the key it proves itself with (set by
the web server for the processes it starts; the socket's folder is the user's alone)."""

ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX = 0.05, 2.0
"""The hub's wait before accepting again after its own failure (doubling from the first to
the second): EMFILE leaves the connection pending, and a loop that retried at once would spin."""

_log = logging.getLogger(__name__)


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

        for message in received(conn):
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
                outbox.put(Failed(getattr(message, "id", None), portable(exc)))
        for rid in list(theirs.values()):
            client.cancel(rid)
        outbox.put(None)
        sender.join(5)
        conn.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)
