"""One reply in the multi-sequence engine: where its prompt is, what it has sampled, and what it
sends on: text held back while it could still be a stop string, UTF-8 decoded across tokens,
log probabilities sent just before the text of their tokens, and its end said once
(:class:`Done`, with why it stopped)."""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Any

from localmed.runtimes.base import GenerationStats, StopReason, StopStringFilter
from localmed.runtimes.messages import Done, Event, Logprobs, Piece, Request, TokenLogprob
from localmed.runtimes.speculation import Drafter
from localmed.runtimes.vocab import Vocabulary


@dataclass
class Reply:
    request: Request
    slot: int
    sampler: Any
    """Its llama.cpp sampler chain (the engine frees it when the reply ends)."""
    budget: int
    """Tokens it may generate: its max_tokens, or what is left of its sequence's context."""
    stats: GenerationStats
    stops: StopStringFilter
    fed: int = 0
    """Prompt tokens in the cache."""
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(
        errors="replace"))
    next_token: int | None = None
    """Sampled, not yet fed back."""
    logits_at: int = -1
    """Where its logits are in this step's batch (-1: none this step)."""
    started: float = field(default_factory=time.perf_counter)
    first: float = 0.0
    pending: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Those of tokens whose text has not been sent yet."""
    bytes_sent: int = 0
    bytes_reported: int = 0
    """Text sent on, and text of the tokens whose entries were sent (UTF-8 bytes)."""
    flushed: float = 0.0
    """When text was last sent on (0: never, so the first piece goes at once)."""
    drafter: Drafter | None = None
    """Its speculation (None: off)."""

    @property
    def id(self) -> int:
        return self.request.id

    def take(self, token: int, vocab: Vocabulary, logits: Any = None) -> bool:
        """A sampled token: its text held for sending, or the reply's end. True when the reply
        has ended (``stats.stopped_by`` says why)."""
        stats, params = self.stats, self.request.params
        if stats.generated_tokens == 0:
            self.first = time.perf_counter()
            stats.prefill_seconds = self.first - self.started
        if not params.ignore_eos and vocab.ends(token):
            stats.stopped_by = StopReason.EOS
            return True
        stats.generated_tokens += 1
        stats.token_ids.append(token)
        if logits is not None:
            self.logprobs.append(vocab.logprob_entry(logits, token, self.request.logprobs or 0))
        piece = self.decoder.decode(vocab.token_bytes(token))
        if piece and (text := self.stops.feed(piece)):
            self.pending.append(text)
        if self.stops.hit:
            stats.stopped_by = StopReason.STOP
        elif stats.generated_tokens >= self.budget:
            stats.stopped_by = (StopReason.LENGTH if self.budget == params.max_tokens
                                else StopReason.CONTEXT)
        if stats.stopped_by:
            return True
        self.next_token = token
        if self.drafter is not None:
            self.drafter.lookup.append(token)
        return False

    def flush(self, now: float, flush_seconds: float) -> list[Event]:
        """The text held, once it is ``flush_seconds`` older than the last piece sent."""
        if not self.pending or now - self.flushed < flush_seconds:
            return []
        events = self.send("".join(self.pending))
        self.pending.clear()
        self.flushed = now
        return events

    def send(self, text: str, *, last: bool = False) -> list[Event]:
        """A piece of text, after the log probabilities of the tokens it holds: those whose
        text has gone out (a token held back as a possible stop string waits; at the end, the
        tokens of a stop string that was cut are left out)."""
        events: list[Event] = []
        self.bytes_sent += len(text.encode())
        if self.logprobs:
            keep = 0
            for entry in self.logprobs:
                if self.bytes_reported >= self.bytes_sent and not (
                        last and self.stats.stopped_by is not StopReason.STOP):
                    break
                self.bytes_reported += len(entry.bytes)
                keep += 1
            if keep:
                events.append(Logprobs(self.id, self.logprobs[:keep]))
                del self.logprobs[:keep]
        if text:
            events.append(Piece(self.id, text))
        return events

    def end(self) -> list[Event]:
        """Its last text and its :class:`Done`."""
        if self.first:
            self.stats.decode_seconds = time.perf_counter() - self.first
        tail = self.stops.flush() + self.decoder.decode(b"", final=True)
        events = self.send("".join(self.pending) + tail, last=True)
        events.append(Done(self.id, self.stats))
        return events


@dataclass
class Outcome:
    """What one request produced, run to its end in the caller's thread
    (:meth:`~localmed.runtimes.batch.BatchEngine.run`)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token (with ``Request.logprobs``)."""
    stats: GenerationStats | None = None
    """The :class:`Done` event's (None: the request failed)."""
    error: Exception | None = None
