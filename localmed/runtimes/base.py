"""The Runtime interface that chat, bench and serve use; implementations are engines.

A :class:`Runtime` is a loaded model: it streams text pieces for a prompt, stops at once when
asked (from any thread), counts tokens, and reports its context size and offload. A
:class:`ScoringRuntime` scores too (bench's option letters and text log-likelihoods). llama.cpp's
is one multi-sequence engine (:mod:`localmed.runtimes.batch`): in this process
(:mod:`localmed.runtimes.local`, bench) or in an engine process
(:mod:`localmed.runtimes.batch_process`, chat and serve); transformers' (GPTQ) is
:mod:`localmed.runtimes.hf`. Which one a model gets is decided by :mod:`localmed.formats`.
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from localmed.errors import ContextFullError, EngineError
from localmed.formats.info import ModelInfo
from localmed.planner import OffloadPlan, gib


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. Defaults are conservative: clinical answers, not creative writing."""

    max_tokens: int = 1024
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    """Generate ``max_tokens`` whatever the model says (benchmarks force a token count with
    it); never set for answers."""


class StopReason(str, enum.Enum):
    """Why a reply ended: one set of names for every engine and every caller."""

    EOS = "eos"
    """The model ended it (an end-of-generation token)."""
    STOP = "stop"
    """A stop string came."""
    LENGTH = "length"
    """``max_tokens`` were generated."""
    CONTEXT = "context"
    """The sequence's context is full."""
    USER = "user"
    """The caller stopped or cancelled it."""


@dataclass
class GenerationStats:
    """Counts and timings of the last generation."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose cells were kept from an earlier request (not prefilled again)."""
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: StopReason | None = None
    """Why the reply ended (None: it has not)."""
    token_ids: list[int] = field(default_factory=list)
    """The generated tokens, in order (the end-of-generation token excluded)."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    """Tokens proposed by speculation and checked, and those of them the sampler chose."""

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token's time is prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


class Runtime(ABC):
    """A loaded model that streams text."""

    info: ModelInfo
    plan: OffloadPlan
    last_stats: GenerationStats

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Context size, in tokens."""

    @abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|eot_id|>`` parsed as such)."""

    def count_tokens(self, text: str, *, add_bos: bool = True) -> int:
        return len(self.tokenize(text, add_bos=add_bos))

    @abstractmethod
    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the reply to ``prompt`` piece by piece; stats land in ``last_stats``."""

    _stop: threading.Event
    """Set by :meth:`stop`, cleared when a generation begins; made by each implementation."""

    def stop(self) -> None:
        """Ask a running ``stream`` to end after the current token (thread-safe)."""
        self._stop.set()

    def share_stop(self, event: threading.Event) -> None:
        """Take ``event`` as the stop flag: an engine process hands its runtime the event its
        parent sets, so the parent's :meth:`stop` reaches this token loop."""
        self._stop = event

    @property
    def alive(self) -> bool:
        """Whether the model can answer; a runtime in this process is, until :meth:`close`."""
        return True

    @property
    def restartable(self) -> bool:
        """Whether :meth:`restart` can bring back a model whose runtime died."""
        return False

    def notices(self) -> list[str]:
        """What the engine did on its own since last asked (loaded the model again after it
        died between replies), one sentence each, for the app to say; then forgotten."""
        return []

    def restart(self) -> None:
        """Load the model again after its runtime died; the caller's state is kept."""
        raise EngineError("this model runs inside the app and cannot be reloaded")

    def revive(self) -> None:  # noqa: B027 (a runtime in the app's process cannot die alone)
        """Load the model again in the background if it is down (the reload after its death
        failed); returns at once."""

    @abstractmethod
    def close(self) -> None:
        """Free the model."""

    # --- shared by the implementations ----------------------------------------------------------

    def _check_fits(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.n_ctx:
            raise ContextFullError(f"{len(tokens)} tokens do not fit the {self.n_ctx}-token "
                                   "context")

    def _begin(self, prompt: str, params: GenerationParams) -> tuple[list[int], int]:
        """Tokens of the prompt and how many may be generated; resets ``last_stats``."""
        tokens = self.tokenize(prompt)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise ContextFullError(f"the prompt has {len(tokens)} tokens; the context holds "
                                   f"{self.n_ctx}")
        self.last_stats = GenerationStats(prompt_tokens=len(tokens))
        self._stop.clear()
        return tokens, min(params.max_tokens, room)

    def _ended(self, stops: StopStringFilter, budget: int, params: GenerationParams) -> bool:
        """After a token: record why generation ends, if it does."""
        stats = self.last_stats
        if stops.hit:
            stats.stopped_by = StopReason.STOP
        elif self._stop.is_set():
            stats.stopped_by = StopReason.USER
        elif stats.generated_tokens >= budget:
            stats.stopped_by = (StopReason.LENGTH if budget == params.max_tokens
                               else StopReason.CONTEXT)
        return bool(stats.stopped_by)


class ScoringRuntime(Runtime):
    """A Runtime that scores: the logits after a prompt, and at each of its positions."""

    @abstractmethod
    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (float32, whole vocabulary) for the token after ``tokens``.

        The longest prefix shared with the previous call is not evaluated again, so a few-shot
        prefix common to every question costs one evaluation in all.
        """

    @abstractmethod
    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` (shape ``[len(tokens), n_vocab]``)."""


class StopStringFilter:
    """Holds back text that might be the start of a stop string, and cuts at one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        """Text that is safe to show now."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


def batched(pieces: Iterable[str], seconds: float) -> Iterator[str]:
    """Streamed text joined into one piece per ``seconds`` at most (0: each as it comes), the
    rest when the stream ends: whoever reads it wakes that often, not once per token."""
    pending: list[str] = []
    last = time.monotonic()
    for piece in pieces:
        pending.append(piece)
        if time.monotonic() - last >= seconds:
            yield "".join(pending)
            pending.clear()
            last = time.monotonic()
    if pending:
        yield "".join(pending)


def describe_plan(plan: OffloadPlan) -> str:
    """One paragraph for `localmed plan` and the model info screen."""
    lines = [f"{plan.label}, context {plan.n_ctx} tokens"]
    lines += [f"  - {reason}" for reason in plan.reasons]
    if plan.backend == "rpc":
        lines.append(f"  needs {gib(plan.ram_needed)} RAM here, {gib(plan.vram_needed)} on the "
                     "workers")
    else:
        lines.append(f"  needs {gib(plan.ram_needed)} RAM" +
                     (f", {gib(plan.vram_needed)} VRAM" if plan.vram_needed else ""))
    if not plan.fits:
        lines.append("  does not fit" + (f": try --quant {plan.suggestion}"
                                         if plan.suggestion else ""))
    return "\n".join(lines)
