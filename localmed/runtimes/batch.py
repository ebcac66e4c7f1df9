"""Several replies at once on one llama.cpp context: continuous batching for ``localmed serve``.

One context holds ``n_parallel`` sequences, each with its own share of the KV cache
(``n_ctx / n_parallel`` tokens, as ``llama-server -np N`` splits it). Every :meth:`BatchEngine.step`
is one ``llama_decode``: the next token of each sequence that is generating, then as much of
the waiting prompts as the batch holds (a long prompt is fed in chunks, so the others keep
decoding between them). Each sequence samples with its own llama.cpp sampler chain — the chain
``llama_cpp.Llama`` builds, so a reply at temperature 0 is the one ``localmed chat`` gives —
with its own seed and, for JSON replies, llama.cpp's grammar sampler.

A finished or cancelled sequence leaves its slot at once, and the slot keeps its cells: the next
request whose prompt starts the same way (the same conversation, one turn on, as every OpenAI
client sends the whole history) prefills only what is new (:mod:`localmed.runtimes.prompt_cache`
chooses the slot, and keeps other conversations' cells in host memory when their slot is taken).
What that changes: llama.cpp's CPU kernels sum a one-token batch (a reply's tokens as they are
generated) in another order than a prefill's, so a follow-up that starts from the cells of the
last reply gets logits that differ from a whole prefill's (up to 0.31 nats among the top five on
SmolLM2, the same top token), and a greedy reply often takes another word somewhere (counted in
``benchmarks/followup.py --agreement``, as often as llama-server's). A request with ``cache_prompt`` false (the server's
``--no-cache-prompt`` for all) is prefilled whole, and its reply depends on it alone.

An image-text model's prompt carries its images as runs of placeholder ids; when a sequence's
prefill reaches one, the image is encoded and decoded into that sequence's cells on its own
(:mod:`localmed.runtimes.vision`, llama.cpp's multimodal library), then the text goes on.

Everything here is llama-cpp-python's public low-level API (``llama_batch_init``,
``llama_decode``, ``llama_sampler_*``, ``llama_memory_seq_rm``, ``llama_state_seq_*``).
"""

from __future__ import annotations

import codecs
import ctypes
import json
import math
import os
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import (
    ContextFullError,
    EngineError,
    GGUFFileError,
    GrammarError,
    ImageError,
)
from localmed.images import Image
from localmed.runtimes.base import GenerationStats, StopReason, StopStringFilter
from localmed.runtimes.messages import (
    Done,
    Event,
    Failed,
    Logprobs,
    Piece,
    Request,
    TokenLogprob,
)
from localmed.runtimes.prompt_cache import (
    MIN_SAVED,
    HostCache,
    SavedState,
    Slot,
    choose_slot,
    common_prefix,
)
from localmed.runtimes.vision import Part, Vision, placeholder

NO_PROJECTOR = "this model was loaded without an image projector (mmproj): it reads text only"

PENALTY_LAST_N = 64
"""Tokens the repeat penalty looks back over: ``llama_cpp.Llama``'s ``last_n_tokens_size``."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """llama.cpp's GBNF for any JSON object (``schema`` None) or for one JSON schema."""
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.JSON_GBNF
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises whatever its walk meets
        raise GrammarError(f"llama.cpp cannot turn this JSON schema into a grammar: "
                           f"{type(exc).__name__}: {exc}") from None


@dataclass
class _Sequence:
    request: Request
    slot: int
    sampler: Any
    budget: int
    stats: GenerationStats
    stops: StopStringFilter
    fed: int = 0
    """Prompt tokens in the cache."""
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(
        errors="replace"))
    next_token: int | None = None
    """Sampled, not yet fed back."""
    logits_at: int = -1
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


@dataclass
class Outcome:
    """What one request produced, run to its end in this thread (:meth:`BatchEngine.run`)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token (with ``Request.logprobs``)."""
    stats: GenerationStats | None = None
    """The :class:`Done` event's (None: the request failed)."""
    error: Exception | None = None


class BatchEngine:
    """A GGUF loaded for ``n_parallel`` sequences decoded together."""

    def __init__(self, path: Path, *, n_parallel: int, n_ctx: int, gpu_layers: int = 0,
                 threads: int | None = None, n_batch: int = 512, cache_ram: int = 0,
                 flash_attention: bool = False, projector: Path | None = None,
                 cache_reuse: int = 0) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise GGUFFileError(Path(path), "llama.cpp could not load it")
        cores = os.cpu_count() or 1
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_parallel
        ctx_params.kv_unified = False  # each sequence its own n_ctx / n_parallel cells
        ctx_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attention
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        # llama_cpp.Llama's defaults: half the cores for one token, all of them for batches
        ctx_params.n_threads = threads or max(cores // 2, 1)
        ctx_params.n_threads_batch = threads or cores
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not make a {n_ctx}-token context for "
                              f"{n_parallel} sequences (out of memory?)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._waiting: deque[Request] = deque()
        self._running: dict[int, _Sequence] = {}  # by request id
        self._slots = [Slot() for _ in range(n_parallel)]
        self._taken = 0  # requests admitted so far: the slots' least-recently-used clock
        # A sliding-window model (Gemma 3, MedGemma) may hold only its last n_swa positions'
        # cells in its sliding-window layers: a prefix is reused only when the cells it needs
        # are there (even with llama.cpp's swa_full, a state read back from host memory lacks
        # them: its follow-ups went wrong by up to 1.6 nats on a tiny Gemma 3), so such a model
        # keeps no host cache; a conversation in its own slot is continued as any other.
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._model))
        self.host_cache = HostCache(0 if self.n_swa else cache_ram)
        # Cells past a removed part of the prompt are moved back where the prompt has them
        # (llama-server's --cache-reuse), where the model's positions can be shifted.
        self.cache_reuse = cache_reuse if not self.n_swa and \
            llama_cpp.llama_memory_can_shift(self._memory) else 0
        self._piece = ctypes.create_string_buffer(256)
        self.vision: Vision | None = None
        if projector is not None:
            try:
                self.vision = Vision(projector, self._model, gpu=gpu_layers != 0,
                                     threads=ctx_params.n_threads_batch)
            except BaseException:
                self.close()
                raise

    # --- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[Part], *, add_bos: bool = True) -> list[int]:
        """Token ids of ``prompt``, special tokens parsed (safe beside a running ``step``):
        a text, or parts of text and images (each image's tokens as its placeholder id)."""
        if not isinstance(prompt, str):
            if not any(isinstance(part, Image) for part in prompt):
                return self.tokenize("".join(prompt), add_bos=add_bos)  # type: ignore[arg-type]
            if self.vision is None:
                raise ImageError(NO_PROJECTOR)
            return self.vision.tokenize(prompt, add_special=add_bos)
        data = prompt.encode("utf-8")
        size = len(data) + 8
        tokens = (self._llama.llama_token * size)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, size,
                                       add_bos and self._add_bos, True)
        if n < 0:
            size = -n
            tokens = (self._llama.llama_token * size)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, size,
                                           add_bos and self._add_bos, True)
        return list(tokens[:n])

    def check_grammar(self, grammar: str) -> None:
        """Refuse a grammar llama.cpp does not parse, before any request waits on it."""
        sampler = self._llama.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise GrammarError("llama.cpp could not parse the grammar made from this schema")
        self._llama.llama_sampler_free(sampler)

    def submit(self, request: Request) -> None:
        """Queue a request; it starts in arrival order when a slot is free."""
        if not request.tokens:
            raise ContextFullError("the prompt is empty")
        if len(request.tokens) >= self.n_ctx_seq:
            raise ContextFullError(f"the prompt has {len(request.tokens)} tokens; each of the "
                                   f"{self.n_parallel} sequences holds {self.n_ctx_seq}")
        if request.tokens[-1] < 0:
            raise ImageError("a prompt cannot end with an image (the reply starts after text)")
        if any(t < 0 for t in request.tokens):
            if self.vision is None:
                raise ImageError(NO_PROJECTOR)
            keys = {placeholder(image) for image in request.images}
            if any(t < 0 and t not in keys for t in request.tokens):
                raise ImageError("the prompt has image tokens of an image the request lacks")
        self._waiting.append(request)

    def cancel(self, request_id: int) -> list[Event]:
        """Stop a request, running or waiting: its :class:`Done` (stopped by the user)."""
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                return [Done(request_id, GenerationStats(stopped_by=StopReason.USER))]
        seq = self._running.get(request_id)
        if seq is None:
            return []
        seq.stats.stopped_by = StopReason.USER
        return self._finish(seq)

    def request_ids(self) -> list[int]:
        """Every request running or waiting."""
        return [*self._running, *(r.id for r in self._waiting)]

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    def run(self, *requests: Request) -> dict[int, Outcome]:
        """Submit ``requests`` and decode in this thread until no request is left: what each
        produced, by id (checks, benchmarks and tests; the engine process streams events)."""
        outcomes = {request.id: Outcome() for request in requests}
        for request in requests:
            self.submit(request)
        while self.busy:
            for event in self.step():
                outcome = outcomes.setdefault(event.id, Outcome())
                if isinstance(event, Piece):
                    outcome.text += event.text
                elif isinstance(event, Logprobs):
                    outcome.logprobs += event.entries
                elif isinstance(event, Done):
                    outcome.stats = event.stats
                elif isinstance(event, Failed):
                    outcome.error = event.error
        return outcomes

    # --- the loop -------------------------------------------------------------------------------

    def step(self, flush_seconds: float = 0.0) -> list[Event]:
        """One ``llama_decode`` over every sequence: the events it produced, :class:`Piece`
        (a sequence's text joined while younger than ``flush_seconds``), :class:`Logprobs`
        and :class:`Done`."""
        self._admit()
        if not self._running:
            return []
        llama = self._llama
        batch = self._batch
        n = 0

        def add(token: int, slot: int, logits: bool) -> None:
            nonlocal n
            self._put(n, token, slot, logits)
            n += 1

        events: list[Event] = []
        for seq in sorted(self._running.values(), key=lambda s: s.slot):
            events += self._feed_images(seq)  # each its own decodes, into its sequence
        order = sorted(self._running.values(), key=lambda s: s.request.id)
        if not order:
            return events
        room = self.n_batch
        feed: dict[int, tuple[_Sequence, list[int]]] = {}  # by slot
        for seq in order:  # the generating ones first: one token each
            seq.logits_at = -1
            if seq.next_token is not None:
                feed[seq.slot] = (seq, [seq.next_token])
                seq.next_token = None
                room -= 1
        for seq in order:  # then prompts, oldest first, as much as the batch holds
            tokens = seq.request.tokens
            if seq.fed < len(tokens) and room > 0:
                take = min(len(tokens) - seq.fed, room)
                if seq.request.images:  # text up to the next image, which goes on its own
                    take = next((i for i, t in enumerate(tokens[seq.fed:seq.fed + take])
                                 if t < 0), take)
                if not take:
                    continue
                feed[seq.slot] = (seq, tokens[seq.fed:seq.fed + take])
                seq.fed += take
                room -= take
        # In slot order: with a KV cache per sequence, llama.cpp puts in one ubatch only
        # sequences whose ids come in increasing consecutive order, and splits the rest into
        # more ubatches, each of which reads all the weights again (served 4 streams in the
        # order their requests came: 1.5x the time per token).
        for slot in sorted(feed):
            seq, tokens = feed[slot]
            for token in tokens[:-1]:
                add(token, slot, False)
            last = seq.fed == len(seq.request.tokens)  # generating, or the prompt's end
            add(tokens[-1], slot, last)
            if last:
                seq.logits_at = n - 1
        batch.n_tokens = n
        if n == 0:
            return events
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed (status {status}) with {n} tokens of "
                              f"{len(order)} sequences")
        now = time.monotonic()
        for seq in order:
            if seq.logits_at < 0:
                continue
            logits = None
            if seq.request.logprobs is not None:  # the model's distribution, before sampling
                logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(
                    self._ctx, seq.logits_at), shape=(self._n_vocab,)).copy()
            token = llama.llama_sampler_sample(seq.sampler, self._ctx, seq.logits_at)
            events += self._take(seq, int(token), logits)
            if seq.request.id in self._running and seq.pending and \
                    now - seq.flushed >= flush_seconds:
                events += self._send(seq, "".join(seq.pending))
                seq.pending.clear()
                seq.flushed = now
        return events

    def _put(self, i: int, token: int, slot: int, logits: bool) -> None:
        """Place ``token`` at index ``i`` of the batch, next in ``slot``'s cells."""
        cells, batch = self._slots[slot].cells, self._batch
        batch.token[i] = token
        batch.pos[i] = len(cells)
        cells.append(token)
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _feed_images(self, seq: _Sequence) -> list[Event]:
        """Evaluate the images that come next in ``seq``'s prompt; a failure ends that
        request alone (its :class:`Failed`)."""
        tokens, cells = seq.request.tokens, self._slots[seq.slot].cells
        while seq.fed < len(tokens) and tokens[seq.fed] < 0:
            key = tokens[seq.fed]
            run = seq.fed
            while run < len(tokens) and tokens[run] == key:
                run += 1
            image = next(i for i in seq.request.images if placeholder(i) == key)
            assert self.vision is not None  # submit refused images without a projector
            try:
                taken = self.vision.evaluate(image, self._ctx, n_past=len(cells),
                                             seq_id=seq.slot, n_batch=self.n_batch)
                if taken != run - seq.fed:
                    raise ImageError(f"{image.name}: {taken} image tokens decoded where the "
                                     f"prompt has {run - seq.fed}")
            except ImageError as failed:
                del self._running[seq.request.id]
                self._llama.llama_sampler_free(seq.sampler)
                self._llama.llama_memory_seq_rm(self._memory, seq.slot, len(cells), -1)
                return [Failed(seq.request.id, failed)]
            cells += tokens[seq.fed:run]
            seq.fed = run
        return []

    def _send(self, seq: _Sequence, text: str, *, last: bool = False
              ) -> list[Event]:
        """A piece of text, after the log probabilities of the tokens it holds: those whose
        text has gone out (a token held back as a possible stop string waits; at the end, the
        tokens of a stop string that was cut are left out)."""
        events: list[Event] = []
        seq.bytes_sent += len(text.encode())
        if seq.logprobs:
            keep = 0
            for entry in seq.logprobs:
                if seq.bytes_reported >= seq.bytes_sent and not (
                        last and seq.stats.stopped_by is not StopReason.STOP):
                    break
                seq.bytes_reported += len(entry.bytes)
                keep += 1
            if keep:
                events.append(Logprobs(seq.request.id, seq.logprobs[:keep]))
                del seq.logprobs[:keep]
        if text:
            events.append(Piece(seq.request.id, text))
        return events

    def _token_bytes(self, token: int) -> bytes:
        n = self._llama.llama_token_to_piece(self._vocab, token, self._piece,
                                             len(self._piece), 0, False)
        return self._piece.raw[:max(n, 0)]

    def _logprob(self, token: int, logprob: float,
                 top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        raw = self._token_bytes(token)
        return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, raw, top)

    def _logprob_entry(self, logits: Any, token: int, top: int) -> TokenLogprob:
        """The token's log probability under the model (log-softmax of its logits) and the
        ``top`` most likely tokens'."""
        peak = float(logits.max())
        log_z = peak + math.log(float(np.exp(logits - peak).sum()))
        negated = -logits  # ascending = most likely first; top <= 20 (the server's bound) < vocab
        best = np.argpartition(negated, top)[:top]
        best = best[np.argsort(negated[best], kind="stable")]
        return self._logprob(token, float(logits[token]) - log_z,
                             tuple(self._logprob(int(t), float(logits[t]) - log_z) for t in best))

    def _admit(self) -> None:
        busy = {seq.slot for seq in self._running.values()}
        free = [s for s in range(self.n_parallel) if s not in busy]
        while self._waiting and free:
            request = self._waiting.popleft()
            tokens = request.tokens
            slot, shared = choose_slot(self._slots, free, tokens, reuse=request.cache_prompt)
            free.remove(slot)
            self._taken += 1
            self._slots[slot].used = self._taken
            cached = self._reuse(slot, tokens, shared, from_host=request.cache_prompt)
            room = self.n_ctx_seq - len(tokens)
            stats = GenerationStats(prompt_tokens=len(tokens), cached_tokens=cached)
            self._running[request.id] = _Sequence(
                request, slot, self._sampler(request), min(request.params.max_tokens, room),
                stats=stats, stops=StopStringFilter(request.stop), fed=cached)

    def _reuse(self, slot: int, tokens: list[int], shared: int, *, from_host: bool) -> int:
        """Make ``slot`` hold the longest prefix of ``tokens`` that it (``shared`` tokens) or
        the host cache has, saving what it held for another conversation first; the number of
        prompt tokens now in its cells (at most all but the last, whose logits are needed)."""
        cells = self._slots[slot].cells
        key, saved = self.host_cache.best(tokens) if from_host else (-1, 0)
        state = self.host_cache.take(key) if saved > shared else None  # before _save evicts it
        if len(cells) - shared >= MIN_SAVED:
            self._save(slot)
        if state is not None:
            shared = saved if self._restore(slot, state) else 0
        keep = min(shared, len(tokens) - 1)
        while 0 < keep < len(tokens) and tokens[keep] < 0 and tokens[keep - 1] == tokens[keep]:
            keep -= 1  # never part of an image: its tokens attend to each other
        memory = self._memory
        if keep and self.cache_reuse:
            keep = self._shift_chunks(slot, tokens, keep)
        if keep == 0 or not self._llama.llama_memory_seq_rm(memory, slot, keep, -1):
            return self._clear(slot)  # nothing to keep, or cells that cannot be cut part way
        del cells[keep:]
        # enough of a sliding-window model's positions for what comes next?
        if self.n_swa and self._llama.llama_memory_seq_pos_min(memory, slot) > \
                max(0, keep - self.n_swa):
            return self._clear(slot)
        return keep

    def _shift_chunks(self, slot: int, tokens: list[int], keep: int) -> int:
        """After the ``keep`` tokens a slot shares with ``tokens``, the runs of at least
        ``cache_reuse`` cells that the prompt has again further on (a chat that left some turns
        out keeps the ones after them) are moved to the prompt's positions, the cells between
        them dropped; the prompt tokens now in the slot's cells."""
        llama, memory, cells = self._llama, self._memory, self._slots[slot].cells
        end = len(tokens) - 1  # the last token is fed: its logits are needed
        at_cells, at_prompt = keep, keep
        while at_cells < len(cells) and at_prompt < end:
            run = 0
            while at_cells + run < len(cells) and at_prompt + run < end and \
                    cells[at_cells + run] == tokens[at_prompt + run] >= 0:  # (not an image's)
                run += 1
            if run < self.cache_reuse:
                at_cells += 1
                continue
            if not llama.llama_memory_seq_rm(memory, slot, at_prompt, at_cells):
                break
            llama.llama_memory_seq_add(memory, slot, at_cells, at_cells + run,
                                       at_prompt - at_cells)
            cells[at_prompt:at_prompt + run] = cells[at_cells:at_cells + run]
            at_cells += run
            at_prompt += run
        del cells[at_prompt:]  # (what is left past it is cut from the memory by the caller)
        return at_prompt

    def _clear(self, slot: int) -> int:
        self._llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._slots[slot].cells.clear()
        return 0

    def _save(self, slot: int) -> None:
        """Copy a slot's cells to the host cache (when it has room for them)."""
        llama, cells = self._llama, self._slots[slot].cells
        if not self.host_cache.limit or not cells:
            return
        size = llama.llama_state_seq_get_size(self._ctx, slot)
        if size > self.host_cache.limit:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(self._ctx, buffer, size, slot)
        if written:  # one copy into bytes (a 7B's conversation can be a gigabyte)
            self.host_cache.put(list(cells), ctypes.string_at(buffer, written))

    def _restore(self, slot: int, state: SavedState) -> bool:
        """Put a state taken from the host cache back into ``slot``."""
        self._clear(slot)
        data = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if not self._llama.llama_state_seq_set_data(self._ctx, data, len(state.data), slot):
            self._clear(slot)
            return False
        self._slots[slot].cells[:] = state.tokens
        return True

    def _sampler(self, request: Request) -> Any:
        """``llama_cpp.Llama``'s chain: penalties, grammar, then greedy or top-k … dist."""
        llama, params = self._llama, request.params
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama.llama_sampler_chain_add(chain, sampler)

        add(llama.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N,
                                               params.repeat_penalty,
                                               params.frequency_penalty,
                                               params.presence_penalty))
        if request.grammar is not None:
            grammar = llama.llama_sampler_init_grammar(self._vocab, request.grammar.encode(),
                                                       b"root")
            if not grammar:
                llama.llama_sampler_free(chain)
                raise GrammarError("llama.cpp could not parse the grammar")
            add(grammar)
        if params.temperature == 0:
            add(llama.llama_sampler_init_greedy())
        else:
            add(llama.llama_sampler_init_top_k(params.top_k))
            add(llama.llama_sampler_init_typical(1.0, 1))
            add(llama.llama_sampler_init_top_p(params.top_p, 1))
            add(llama.llama_sampler_init_min_p(params.min_p, 1))
            add(llama.llama_sampler_init_temp(params.temperature))
            seed = request.seed if request.seed is not None else random.getrandbits(32)
            add(llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _take(self, seq: _Sequence, token: int, logits: Any = None
              ) -> list[Event]:
        """A sampled token: text, or the sequence's end."""
        stats, params = seq.stats, seq.request.params
        if stats.generated_tokens == 0:
            seq.first = time.perf_counter()
            stats.prefill_seconds = seq.first - seq.started
        if not params.ignore_eos and self._llama.llama_vocab_is_eog(self._vocab, token):
            stats.stopped_by = StopReason.EOS
            return self._finish(seq)
        stats.generated_tokens += 1
        stats.token_ids.append(token)
        if logits is not None:
            seq.logprobs.append(self._logprob_entry(logits, token, seq.request.logprobs or 0))
        piece = seq.decoder.decode(self._token_bytes(token))
        if piece and (text := seq.stops.feed(piece)):
            seq.pending.append(text)
        if seq.stops.hit:
            stats.stopped_by = StopReason.STOP
        elif stats.generated_tokens >= seq.budget:
            stats.stopped_by = (StopReason.LENGTH if seq.budget == params.max_tokens
                               else StopReason.CONTEXT)
        if stats.stopped_by:
            return self._finish(seq)
        seq.next_token = token
        return []

    def _finish(self, seq: _Sequence) -> list[Event]:
        del self._running[seq.request.id]
        self._llama.llama_sampler_free(seq.sampler)
        if seq.first:
            seq.stats.decode_seconds = time.perf_counter() - seq.first
        tail = seq.stops.flush() + seq.decoder.decode(b"", final=True)
        events = self._send(seq, "".join(seq.pending) + tail, last=True)
        events.append(Done(seq.request.id, seq.stats))
        return events

    # --- scoring (bench): between replies, in the first sequence -------------------------------

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (float32, the whole vocabulary) for the token after ``tokens``; the cells the
        first sequence shares with them (the last call's few-shot prefix, say) are kept."""
        tokens = self._scorable(tokens)
        cells = self._slots[0].cells
        keep = min(common_prefix(cells, tokens), len(tokens) - 1)
        if not self._llama.llama_memory_seq_rm(self._memory, 0, keep, -1):
            keep = self._clear(0)
        del cells[keep:]
        return self._evaluate(tokens[keep:], every=False)[-1]

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` (``[len(tokens), n_vocab]``), from a
        prefill of them all."""
        tokens = self._scorable(tokens)
        self._clear(0)
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
                self._clear(0)
                raise EngineError(f"llama_decode failed (status {status}) scoring "
                                  f"{len(chunk)} tokens")
            if every:
                rows.append(np.ctypeslib.as_array(llama.llama_get_logits(self._ctx),
                                                  shape=(len(chunk), self._n_vocab)).copy())
        if not every:
            rows.append(np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, -1),
                                              shape=(1, self._n_vocab)).copy())
        return np.concatenate(rows) if len(rows) > 1 else rows[0]

    def close(self) -> None:
        llama = self._llama
        if self.vision is not None:
            self.vision.close()
            self.vision = None
        for seq in list(self._running.values()):
            llama.llama_sampler_free(seq.sampler)
        self._running.clear()
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)
