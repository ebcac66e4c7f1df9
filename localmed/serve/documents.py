"""``serve --docs NAME`` and the embedding model behind it: chat completions answered from the
clinic's documents, with the passages they were given as ``citations``; and ``/v1/embeddings``
(OpenAI's shape) wherever an embedding model is loaded, so that Open WebUI and scripts can use
localmed as their embedder.

A chat completion's last message, when it is the user's, is the question: the index is searched
for it (off the event loop, before the request waits for a slot), and the passages that fit go
into that message above the question, numbered; earlier messages are sent as the client wrote
them. Nothing clears the relevance floor: nothing is added, and the response says it is not
grounded.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localmed.retrieval.embedder import Embedder
from localmed.retrieval.grounding import (
    Grounding,
    fit_passages,
    grounded_question,
    passage_budget,
)
from localmed.retrieval.search import Retriever
from localmed.templates import Message

_IMAGE_MARKER = re.compile(r"<localmed-image-[0-9a-f]+-\d+>")


@dataclass
class ServedDocs:
    """The index (and its embedding model) a server answers from; or an embedding model alone
    (``serve --embed MODEL``)."""

    retriever: Retriever | None
    embedder: Embedder | None
    embedding_id: str = ""
    k: int = 5
    """Passages a question gets at most."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def index(self) -> str:
        return self.retriever.name if self.retriever is not None else ""

    def ground(self, messages: list[Message], tokenize: Callable[[str], list[int]],
               render: Callable[[list[Message]], str], n_ctx: int, max_tokens: int
               ) -> tuple[list[Message], Grounding | None]:
        """The messages to render, with the passages in the last one (a user's), and what was
        given; ``(messages, None)`` where there is no index or no question."""
        retriever = self.retriever
        if retriever is None or not messages or messages[-1].role != "user":
            return messages, None
        question = _IMAGE_MARKER.sub("", messages[-1].content).strip()
        if not question:
            return messages, None
        with self._lock:  # one SQLite connection and one vector cache for every request
            found = retriever.search(question, k=self.k)
            folder = str(retriever.index.meta("folder", ""))
        if not found.grounded:
            return messages, Grounding(retriever.name, (), False, tuple(found.notes), folder)
        reserve = min(max_tokens, n_ctx // 4)
        room = n_ctx - reserve - len(tokenize(render(messages)))
        budget = min(passage_budget(n_ctx, reserve), room)
        kept = fit_passages(found.passages, lambda t: len(tokenize(t)), budget)
        grounding = Grounding(retriever.name, tuple(kept), bool(kept), tuple(found.notes),
                              folder)
        if not kept:
            return messages, grounding
        asked = Message("user", grounded_question(messages[-1].content, grounding))
        return [*messages[:-1], asked], grounding

    def embed(self, texts: list[str]) -> Any:
        """The embedding model's :class:`~localmed.runtimes.embedding.Embeddings` of
        ``texts``, as they are (no prefix: a client that embeds for its own index decides)."""
        assert self.embedder is not None
        return self.embedder.embed_raw(texts)

    def close(self) -> None:
        from localmed.retrieval.catalog import close_retriever

        if self.retriever is not None:
            close_retriever(self.retriever)
        elif self.embedder is not None:
            self.embedder.close()
