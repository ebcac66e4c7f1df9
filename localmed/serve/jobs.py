"""The engine behind ``localmed serve``: what is served, and how requests reach the model.

A GGUF is served by the multi-sequence engine (:mod:`localmed.runtimes.batch_process`): up to
``--parallel`` replies decode together, later requests wait in arrival order, and beyond
``--queue`` waiting ones a request is refused at once. A GPTQ folder (transformers) is served one
reply at a time by :class:`SerialJobs`. Either way admission is decided before a request waits:
:meth:`Jobs.admit` counts what is running and queued and refuses, never blocks.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from localmed.conversation import DISCLAIMER
from localmed.errors import EngineDiedError, LocalmedError
from localmed.formats.info import ModelInfo
from localmed.images import Image
from localmed.runtimes.base import GenerationParams, Runtime
from localmed.runtimes.messages import Done, Event, Failed, Piece
from localmed.runtimes.vision import Part
from localmed.templates import PromptTemplate


class ServerBusyError(LocalmedError):
    """Every slot and queue place is taken: answered at once with 503 and Retry-After."""


class UnsupportedError(LocalmedError):
    """A request field this engine cannot honour (a grammar on transformers, say)."""


@dataclass
class ServedModel:
    """What the server offers: one model, its template and sampling defaults."""

    id: str
    info: ModelInfo
    template: PromptTemplate
    advisory: str
    defaults: GenerationParams = field(default_factory=GenerationParams)
    cache_prompt: bool = True
    """Whether a request may continue from a slot's cells (``--no-cache-prompt``: never)."""
    no_images: str = "it reads text only"
    """Why a request with images is refused ("": the model takes them)."""

    def notice(self) -> dict[str, Any]:
        return {"disclaimer": DISCLAIMER, "advisory": self.advisory,
                "model_file": self.info.path.name, "quant": self.info.label}


@dataclass
class Job:
    """One request's generation: admitted, then streams into ``events``."""

    prompt: str
    params: GenerationParams
    stop: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    seed: int | None = None
    grammar: str | None = None
    logprobs: int | None = None
    """OpenAI's top_logprobs when logprobs are asked for (0: the chosen token's only)."""
    cache_prompt: bool = True
    """Continue from a slot's cells that hold the prompt's beginning (llama-server's field)."""
    images: tuple[Image, ...] = ()
    """The images whose placeholder ids ``tokens`` holds."""
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    """Where the engine puts the reply's events (:mod:`localmed.runtimes.messages`; anything
    with a thread-safe ``put``)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    handle: int | None = None
    """The engine's id for it, once submitted."""


class Jobs(ABC):
    """Admission (running + queued at most ``parallel + queue``) over an engine."""

    def __init__(self, parallel: int, queue_size: int, log: TextIO) -> None:
        self.parallel = parallel
        self.queue_size = queue_size
        self.log = log
        self._in_flight = 0
        self._admission = threading.Lock()

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Tokens one reply may hold, prompt included."""

    @property
    def no_images(self) -> str:
        """Why requests with images are refused ("": the engine takes them)."""
        return "a GPTQ folder runs on transformers, through which localmed reads no images"

    @property
    def host_cache(self) -> int:
        """Bytes of host memory for conversations whose slot another took (0: none)."""
        return 0

    @property
    def sliding_window(self) -> int:
        """The model's sliding-window width in tokens (0: none)."""
        return 0

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The prompt's tokens, without waiting on a running reply (where the engine allows)."""

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """The grammar that holds a reply to JSON (to ``schema``, if given)."""
        raise UnsupportedError("response_format needs llama.cpp's grammar sampler: serve a GGUF")

    @abstractmethod
    def _start(self, job: Job, on_end: Callable[[], None]) -> None:
        """Hand an admitted job to the engine; ``on_end`` once its last event is out."""

    @abstractmethod
    def cancel(self, job: Job) -> None:
        """Stop a job's reply (its client left); other jobs go on."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def revive(self) -> None:
        """Load the model again in the background if it is down (its reload after a death
        failed): a request that found it so asks, and is answered at once."""

    def admit(self, job: Job) -> None:
        """Start ``job`` now or queue it, in arrival order; refuse it if all is taken."""
        with self._admission:
            if self._in_flight >= self.parallel + self.queue_size:
                raise ServerBusyError(
                    f"the server is busy: {self.parallel} replies running and "
                    f"{self.queue_size} waiting; retry shortly")
            self._in_flight += 1
            try:
                self._start(job, self._ended)
            except BaseException:
                self._in_flight -= 1
                raise

    def _ended(self) -> None:
        with self._admission:
            self._in_flight -= 1


class BatchJobs(Jobs):
    """The multi-sequence engine: ``parallel`` replies decoded together."""

    def __init__(self, client: Any, queue_size: int, log: TextIO) -> None:
        super().__init__(client.ready.n_parallel, queue_size, log)
        self.client = client

    @property
    def n_ctx(self) -> int:
        return self.client.ready.n_ctx

    @property
    def no_images(self) -> str:
        return self.client.ready.no_images

    @property
    def host_cache(self) -> int:
        return self.client.ready.host_cache

    @property
    def sliding_window(self) -> int:
        return self.client.ready.sliding_window

    def tokenize(self, text: str | Sequence[Part]) -> list[int]:
        return self.client.tokenize(text)

    def json_grammar(self, schema: dict[str, Any] | None) -> str:
        return self.client.json_grammar(schema)

    def _start(self, job: Job, on_end: Callable[[], None]) -> None:
        job.handle = self.client.submit(job.tokens, job.params, job.stop, job.events.put,
                                        seed=job.seed, grammar=job.grammar,
                                        logprobs=job.logprobs,
                                        cache_prompt=job.cache_prompt, images=job.images,
                                        on_end=on_end)

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        if job.handle is not None:
            self.client.cancel(job.handle)

    def revive(self) -> None:
        self.client.revive()

    def close(self) -> None:
        self.client.close()


class SerialJobs(Jobs):
    """One :class:`Runtime`, one reply at a time, in arrival order (transformers' GPTQ)."""

    def __init__(self, runtime: Runtime, queue_size: int, log: TextIO) -> None:
        super().__init__(1, queue_size, log)
        self.runtime = runtime
        self._jobs: queue.Queue[tuple[Job, Callable[[], None]] | None] = queue.Queue()
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="localmed-engine-queue",
                                        daemon=True)
        self._thread.start()

    @property
    def n_ctx(self) -> int:
        return self.runtime.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.runtime.tokenize(text)

    def _start(self, job: Job, on_end: Callable[[], None]) -> None:
        if job.seed is not None or job.params.frequency_penalty or job.params.presence_penalty:
            raise UnsupportedError("'seed', 'frequency_penalty' and 'presence_penalty' need "
                                   "llama.cpp's samplers: serve a GGUF")
        if job.logprobs is not None:
            raise UnsupportedError("'logprobs' needs the llama.cpp engine: serve a GGUF")
        self._jobs.put((job, on_end))

    def cancel(self, job: Job) -> None:
        with self._lock:  # against _work's look at the flag before it starts the job
            job.cancelled.set()
            if self._current is job:
                self.runtime.stop()

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self.runtime.stop()
        self._jobs.put(None)
        self._thread.join(30)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, on_end = item
            try:
                with self._lock:
                    if job.cancelled.is_set():
                        job.events.put(Failed(0, LocalmedError("cancelled")))
                        continue
                    self._current = job
                # A stop() that came before the runtime began its reply is cleared by it:
                # the flag, looked at after every piece, is not.
                with contextlib.closing(self.runtime.stream(job.prompt, job.params,
                                                            stop=job.stop)) as pieces:
                    for piece in pieces:
                        if job.cancelled.is_set():
                            break
                        job.events.put(Piece(0, piece))
                if job.cancelled.is_set():
                    job.events.put(Failed(0, LocalmedError("cancelled")))
                else:
                    job.events.put(Done(0, self.runtime.last_stats))
            except EngineDiedError as died:  # the runtime has loaded the model again
                job.events.put(Failed(0, died))
            except Exception as exc:  # answered to this request; the server goes on
                job.events.put(Failed(0, exc))
            finally:
                with self._lock:
                    self._current = None
                on_end()

    def revive(self) -> None:
        self.runtime.revive()
