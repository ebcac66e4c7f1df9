"""One conversation on the shared engine: the :class:`Runtime` that ``localmed chat`` runs (in
the terminal, and in each ``chat --web`` tab). Its sequence keeps its cells between turns, so a
follow-up prefills only the new turn."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from localmed.images import Image
from localmed.runtimes.base import GenerationParams, GenerationStats, Runtime
from localmed.runtimes.batch_process import BatchClient
from localmed.runtimes.messages import Done, Event, Failed, Piece
from localmed.runtimes.vision import Part

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
        self._tokenized: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        self._tokenizing = threading.Lock()  # the screen's fit check beside a reply's worker

    def notices(self) -> list[str]:
        return self.client.notices()  # the client reloads a dead engine at once

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
        params = params or GenerationParams()
        tokens, _ = self._begin(prompt, params)  # type: ignore[arg-type]
        images = () if isinstance(prompt, str) else \
            tuple(part for part in prompt if isinstance(part, Image))
        events: queue.Queue[Event] = queue.Queue()
        rid = self._current = self.client.submit(tokens, params, tuple(stop), events.put,
                                                 images=images)
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

    def revive(self) -> None:
        self.client.revive()

    @property
    def pid(self) -> int | None:
        return self.client.pid

    def close(self) -> None:
        self.client.close()
