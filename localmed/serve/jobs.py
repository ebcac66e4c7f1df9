"""The one engine behind ``localmed serve``: the model served, and the first-come queue of
requests (jobs) that its single worker thread runs, one reply at a time."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, TextIO

from localmed.conversation import DISCLAIMER
from localmed.errors import EngineDiedError
from localmed.runtimes.base import GenerationParams, Runtime
from localmed.templates import PromptTemplate


@dataclass
class ServedModel:
    """What the server offers: one model, its template and sampling defaults."""

    id: str
    runtime: Runtime
    template: PromptTemplate
    advisory: str
    defaults: GenerationParams = field(default_factory=GenerationParams)

    def notice(self) -> dict[str, Any]:
        info = self.runtime.info
        return {"disclaimer": DISCLAIMER, "advisory": self.advisory, "model_file": info.path.name,
                "quant": info.label}


@dataclass
class Job:
    """One request's generation: waits in the queue, then streams into ``events``."""

    prompt: str
    params: GenerationParams
    stop: tuple[str, ...]
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """The engine's one worker: jobs run one at a time, in arrival order, each to its end."""

    def __init__(self, runtime: Runtime, log: TextIO) -> None:
        self.runtime = runtime
        self.log = log
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="localmed-engine-queue",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._lock:
            if self._current is job:
                self.runtime.stop()

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self.runtime.stop()
        self._jobs.put(None)
        self._thread.join(30)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            with self._lock:
                self._current = job
            try:
                for piece in self.runtime.stream(job.prompt, job.params, stop=job.stop):
                    job.events.put(("piece", piece))
                job.events.put(("done", self.runtime.last_stats))
            except EngineDiedError as died:
                # Reloaded before the request hears of it: a client that retries at once
                # finds the model there.
                self._restart(died)
                job.events.put(("error", died))
            except Exception as exc:  # answered to this request; the server goes on
                job.events.put(("error", exc))
            finally:
                with self._lock:
                    self._current = None

    def reload(self, died: EngineDiedError) -> None:
        """Reload a dead engine, unless another thread did already."""
        if not self.runtime.alive:
            with self._lock:
                self._restart(died)

    def _restart(self, died: EngineDiedError) -> None:
        print(f"localmed serve: {died}; reloading the model", file=self.log, flush=True)
        if self.runtime.restartable:
            try:
                self.runtime.restart()
            except Exception as exc:
                print(f"localmed serve: reloading failed: {exc}", file=self.log, flush=True)
