"""llama.cpp's multi-sequence engine in this process, as one :class:`ScoringRuntime`: what bench
scores and measures with, and what ``chat`` runs with ``in_process``.

The engine is the one an engine process runs for chat and serve (:mod:`localmed.runtimes.batch`):
one loader, one sampler chain, one token loop, here driven from the caller's thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from localmed.runtimes.base import GenerationParams, GenerationStats, ScoringRuntime
from localmed.runtimes.messages import Done, Failed, Piece, Request


class LocalRuntime(ScoringRuntime):
    """One sequence of a :class:`~localmed.runtimes.batch.BatchEngine` loaded here."""

    def __init__(self, engine: Any, info: Any, plan: Any) -> None:
        self.engine = engine
        self.info = info
        self.plan = plan
        self.last_stats = GenerationStats()
        self._stop = threading.Event()
        self._ids = itertools.count(1)

    @classmethod
    def load(cls, path: Path, *, n_ctx: int | None = None, gpu_layers: int | None = None,
             threads: int | None = None, hardware: Any = None,
             speculation: bool = False, draft: Path | None = None,
             rpc: Any = None) -> LocalRuntime:
        """Plan for ``hardware`` (None: this machine; the context: ``n_ctx``, else the
        model's, at most 4096), refuse what cannot fit, then load."""
        from localmed.runtimes.load import BatchOptions, load_engine

        # llama.cpp's messages go to llama-cpp-python's logger: in this process only its
        # errors reach the terminal (an engine process writes them all to its log file)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        engine, info, plan, _ = load_engine(
            Path(path), BatchOptions(1, n_ctx, gpu_layers, threads, speculation=speculation,
                                       draft=draft, rpc=rpc),
            hardware)
        return cls(engine, info, plan)

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx_seq

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_bos=add_bos)

    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        params = params or GenerationParams()
        tokens, _ = self._begin(prompt, params)
        rid = next(self._ids)
        engine = self.engine
        engine.submit(Request(rid, tokens, params, tuple(stop)))
        try:
            while True:
                events = engine.cancel(rid) if self._stop.is_set() else engine.step()
                for event in events:
                    if isinstance(event, Piece):
                        yield event.text
                    elif isinstance(event, Done):
                        self.last_stats = event.stats
                        return
                    elif isinstance(event, Failed):
                        raise event.error
        finally:
            if rid in engine.request_ids():  # the caller left midway
                engine.cancel(rid)

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.next_logits(tokens)

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.sequence_logits(tokens)

    def close(self) -> None:
        self.engine.close()
