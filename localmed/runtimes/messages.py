"""What crosses the pipe between an engine process and its clients, typed.

One module says it all. The llama.cpp engine (:mod:`localmed.runtimes.batch_process`): a client
(``localmed serve``, ``localmed chat``, a browser tab of ``chat --web``) sends a
:class:`Request` to start a reply and :class:`Cancel`, :class:`Tokenize`, :class:`JsonGrammar`
or :class:`Close` (an embedding model's engine takes :class:`Embed` in place of requests); the
engine first says :class:`Ready` (or :class:`Failed` with no id), then answers each message
that names an id with its events: :class:`Logprobs` and :class:`Piece` any number of times,
then one :class:`Done`, :class:`Answer` or :class:`Failed`. The same event
objects reach each request's own queue, so a server or a chat matches on their type, never on
a string. The generic engine process (:mod:`localmed.runtimes.process`, a GPTQ folder's
transformers, and bench's scorer) takes one thing at a time: :class:`Generate`,
:class:`Tokenize`, :class:`Score` or :class:`Close`, answered with the same events (id 0).

They are pickled (``multiprocessing`` connections over a pipe or a private Unix socket); every
field is a plain value or one of localmed's own picklable types.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from localmed.formats.info import ModelInfo
from localmed.images import Image
from localmed.planner import OffloadPlan
from localmed.runtimes.base import GenerationParams, GenerationStats

# --- client -> engine -----------------------------------------------------------------------------


@dataclass
class Request:
    """One reply to generate: the prompt's tokens and how to sample."""

    id: int
    tokens: list[int]
    params: GenerationParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    grammar: str | None = None
    logprobs: int | None = None
    """Report each token's log probability and this many alternatives (None: none)."""
    cache_prompt: bool = True
    """Start from a slot's cells that hold the prompt's beginning (False: prefill it whole)."""
    images: tuple[Image, ...] = ()
    """The images whose placeholder ids ``tokens`` holds (an image-text model's)."""


@dataclass(frozen=True)
class Cancel:
    """Stop a request, running or waiting (its client left, or the user pressed stop)."""

    id: int


@dataclass(frozen=True)
class Tokenize:
    """Token ids of ``text`` (or of its parts, text and images, where images go), answered
    beside running decodes."""

    id: int
    text: str | tuple[str | Image, ...]
    add_bos: bool = True


@dataclass(frozen=True)
class JsonGrammar:
    """llama.cpp's grammar for any JSON object (``schema`` None) or for one JSON schema."""

    id: int
    schema: dict[str, Any] | None


@dataclass(frozen=True)
class Embed:
    """Vectors of ``texts`` (an embedding model's engine): answered with
    :class:`~localmed.runtimes.embedding.Embeddings`."""

    id: int
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Generate:
    """Stream a reply to ``prompt`` (the generic engine), in pieces at most ``batch_seconds``
    apart."""

    prompt: str
    params: GenerationParams
    stop: tuple[str, ...]
    batch_seconds: float


@dataclass(frozen=True)
class Score:
    """Logits after ``tokens`` (the generic engine): for the next token, or at ``every``
    position."""

    tokens: list[int]
    every: bool = False


@dataclass(frozen=True)
class Close:
    """The client is done; the engine (or, behind a hub, this client's share) ends."""


Command = Request | Cancel | Tokenize | JsonGrammar | Embed | Generate | Score | Close


def received(conn: Any) -> Iterator[Any]:
    """What comes over a pipe (a ``multiprocessing`` connection), until :class:`Close` or the
    pipe's end (the other side gone)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, Close):
            return
        yield message


# --- engine -> client -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The model is loaded: what it is, how it was placed, tokens each sequence holds."""

    info: ModelInfo
    plan: OffloadPlan
    n_ctx: int
    n_parallel: int
    no_images: str = ""
    """Why the model takes no images ("": it takes them)."""
    host_cache: int = 0
    """Bytes of host memory that keep the cells of conversations whose slot another took
    (0: none; such a conversation is prefilled again)."""
    sliding_window: int = 0
    """The model's sliding-window width in tokens (0: none): its window is checkpointed."""
    embedding_size: int = 0
    """An embedding model's vector size (0: a model that generates)."""
    pooling: str = ""
    """An embedding model's pooling (``mean``, ``cls``, ``last``)."""


@dataclass(frozen=True)
class Piece:
    """Text of a reply, in order (several tokens' worth, joined while the engine batches)."""

    id: int
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model (before sampling), and the most
    likely tokens' (``top``, most likely first; empty where none were asked for)."""

    token: str
    """Its text (invalid UTF-8, part of a character, as U+FFFD)."""
    logprob: float
    bytes: bytes
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Logprobs:
    """The log probabilities of the tokens whose text comes in the next piece."""

    id: int
    entries: list[TokenLogprob]


@dataclass(frozen=True)
class Done:
    """A reply ended (``stats.stopped_by`` says why): the last event of its request."""

    id: int
    stats: GenerationStats


@dataclass(frozen=True)
class Answer:
    """The value a :class:`Tokenize` or :class:`JsonGrammar` asked for."""

    id: int
    value: Any


@dataclass(frozen=True)
class Failed:
    """A request refused or broken (``id`` None: the engine could not start)."""

    id: int | None
    error: Exception


Event = Piece | Logprobs | Done | Answer | Failed
STREAMED = (Piece, Logprobs)
"""Events a request gets several of; any other is its last."""
