"""Scoring for bench, on the multi-sequence engine between replies: the logits of the token
after a text (letter scoring; the first sequence keeps the cells a few-shot prefix shares with
the last call) and at every position of a text (options' log-likelihoods), prefilled in the
engine's first sequence a batch at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from localmed.errors import ContextFullError, EngineError


class Scoring:
    """What :class:`~localmed.runtimes.batch.BatchEngine` scores with (a mixin: it reads the
    engine's context, batch and first sequence's cells)."""

    _llama: Any
    _ctx: Any
    _batch: Any
    cells: Any
    vocab: Any
    n_batch: int
    n_ctx_seq: int
    busy: bool
    _put: Callable[[int, int, int, bool], None]
    """Place a token at a batch index, next in a sequence's cells (with its logits or not)."""

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (float32, the whole vocabulary) for the token after ``tokens``; the cells the
        first sequence shares with them (the last call's few-shot prefix, say) are kept."""
        tokens = self._scorable(tokens)
        keep = self.cells.keep_prefix(0, tokens)
        return self._evaluate(tokens[keep:], every=False)[-1]

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` (``[len(tokens), n_vocab]``), from a
        prefill of them all."""
        tokens = self._scorable(tokens)
        self.cells.clear(0)
        return self._evaluate(tokens, every=True)

    def _scorable(self, tokens: Sequence[int]) -> list[int]:
        if self.busy:
            raise EngineError("the engine scores between replies, and one is running")
        if not tokens or len(tokens) > self.n_ctx_seq:
            raise ContextFullError(f"{len(tokens)} tokens do not fit the {self.n_ctx_seq}-token "
                                   "context")
        return list(tokens)

    def _evaluate(self, tokens: list[int], *, every: bool) -> np.ndarray:
        """Prefill ``tokens`` into the first sequence a batch at a time: the logits of each
        (``every``) or of the last."""
        llama, batch = self._llama, self._batch
        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            for i, token in enumerate(chunk):
                self._put(i, token, 0, every or (last and i == len(chunk) - 1))
            batch.n_tokens = len(chunk)
            status = llama.llama_decode(self._ctx, batch)
            if status != 0:
                self.cells.clear(0)
                raise EngineError(f"llama_decode failed (status {status}) scoring "
                                  f"{len(chunk)} tokens")
            if every:
                rows.append(np.ctypeslib.as_array(llama.llama_get_logits(self._ctx),
                                                  shape=(len(chunk), self.vocab.n_vocab)).copy())
        if not every:
            rows.append(np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, -1),
                                              shape=(1, self.vocab.n_vocab)).copy())
        return np.concatenate(rows) if len(rows) > 1 else rows[0]

