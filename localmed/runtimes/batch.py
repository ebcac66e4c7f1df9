"""Several replies at once on one llama.cpp context: continuous batching for ``localmed serve``.

One context holds ``n_parallel`` sequences, each with its own share of the KV cache
(``n_ctx / n_parallel`` tokens, as ``llama-server -np N`` splits it). Every :meth:`BatchEngine.step`
is one ``llama_decode``: the next token of each sequence that is generating, then as much of
the waiting prompts as the batch holds (a long prompt is fed in chunks, so the others keep
decoding between them). Each sequence samples with its own llama.cpp sampler chain — the chain
``llama_cpp.Llama`` builds (:mod:`localmed.runtimes.vocab`) — with its own seed and, for JSON
replies, llama.cpp's grammar sampler; what a reply sends on is :mod:`localmed.runtimes.reply`'s.

A finished or cancelled sequence leaves its slot at once, and the slot keeps its cells: the next
request whose prompt starts the same way (the same conversation, one turn on, as every OpenAI
client sends the whole history) prefills only what is new (:mod:`localmed.runtimes.prompt_cache`
chooses the slot, and keeps other conversations' cells in host memory when their slot is taken;
:mod:`localmed.runtimes.slot_cells` moves the cells).
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
``llama_decode``, ``llama_sampler_sample``, ``llama_get_logits_ith``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from localmed.errors import ContextFullError, EngineError, ImageError
from localmed.images import Image
from localmed.runtimes.base import GenerationStats, StopReason, StopStringFilter
from localmed.runtimes.draft_model import DraftModel
from localmed.runtimes.llama_context import load_model, sequences_context
from localmed.runtimes.messages import Done, Event, Failed, Logprobs, Piece, Request
from localmed.runtimes.reply import Outcome, Reply
from localmed.runtimes.scoring import Scoring
from localmed.runtimes.slot_cells import SlotCells
from localmed.runtimes.speculation import Drafter, PromptLookup, StepCost
from localmed.runtimes.vision import Part, Vision, placeholder
from localmed.runtimes.vocab import Vocabulary, json_grammar

__all__ = ["NO_PROJECTOR", "BatchEngine", "Outcome", "json_grammar"]

NO_PROJECTOR = "this model was loaded without an image projector (mmproj): it reads text only"


class BatchEngine(Scoring):
    """A GGUF loaded for ``n_parallel`` sequences decoded together (and scoring between
    replies: :class:`~localmed.runtimes.scoring.Scoring`)."""

    def __init__(self, path: Path, *, n_parallel: int, n_ctx: int, gpu_layers: int = 0,
                 threads: int | None = None, n_batch: int = 512, cache_ram: int = 0,
                 flash_attention: bool = False, projector: Path | None = None,
                 cache_reuse: int = 0, speculation: bool = False,
                 draft: Path | None = None) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        self._model = load_model(llama_cpp, path, gpu_layers)
        self._ctx = sequences_context(llama_cpp, self._model, n_ctx=n_ctx, n_batch=n_batch,
                                      n_parallel=n_parallel, threads=threads,
                                      flash_attention=flash_attention)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not make a {n_ctx}-token context for "
                              f"{n_parallel} sequences (out of memory?)")
        self.vocab = Vocabulary(llama_cpp, self._model)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Reply] = {}  # by request id
        self.n_swa = int(llama_cpp.llama_model_n_swa(self._model))
        # (a recurrent model's state cannot drop a rejected draft's tokens)
        self.speculation = speculation and not (llama_cpp.llama_model_is_recurrent(self._model)
                                                or llama_cpp.llama_model_is_hybrid(self._model))
        self.cells = SlotCells(llama_cpp, self._ctx, n_parallel, n_swa=self.n_swa,
                               cache_ram=cache_ram, cache_reuse=cache_reuse)
        self.host_cache = self.cells.host_cache
        self._slots = self.cells.slots
        self.vision: Vision | None = None
        self.draft_model: DraftModel | None = None
        try:
            if projector is not None:
                self.vision = Vision(projector, self._model, gpu=gpu_layers != 0,
                                     threads=threads or os.cpu_count() or 1)
            if self.speculation and draft is not None:  # on the GPU if the model is, whole
                whole = gpu_layers < 0 or gpu_layers > llama_cpp.llama_model_n_layer(self._model)
                self.draft_model = DraftModel(llama_cpp, draft, self._model,
                                              n_parallel=n_parallel, n_ctx=n_ctx,
                                              gpu_layers=-1 if whole else 0, threads=threads,
                                              n_batch=n_batch, flash_attention=flash_attention)
        except BaseException:
            self.close()
            raise
        # (until measured, a draft model's step costs what reading its weights does)
        self.step_cost = StepCost(draft_prior=Path(draft).stat().st_size / Path(path).stat()
                                  .st_size if self.draft_model is not None else 0.0)

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
        return self.vocab.tokenize(prompt, add_bos=add_bos)

    def check_grammar(self, grammar: str) -> None:
        """Refuse a grammar llama.cpp does not parse, before any request waits on it."""
        self.vocab.check_grammar(grammar)

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
        feed: dict[int, tuple[Reply, list[int]]] = {}  # by slot
        generating: list[Reply] = []
        for seq in order:  # the generating ones first: one token each
            seq.logits_at = -1
            if seq.next_token is not None:
                generating.append(seq)
                if self.n_swa and seq.stats.generated_tokens == 1:  # the prompt's window
                    self.cells.checkpoint(seq.slot)  # for this conversation's follow-ups
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
        decoding = len(feed) == len(generating)  # no prompt in this step
        drafted = self._draft(generating, room, feed) if self.speculation else 0
        # In slot order: with a KV cache per sequence, llama.cpp puts in one ubatch only
        # sequences whose ids come in increasing consecutive order, and splits the rest into
        # more ubatches, each of which reads all the weights again (served 4 streams in the
        # order their requests came: 1.5x the time per token).
        for slot in sorted(feed):
            seq, tokens = feed[slot]
            last = seq.fed == len(seq.request.tokens)  # generating, or the prompt's end
            checked = 1 + len(seq.drafter.draft) if last and seq.drafter is not None else 1
            for token in tokens[:-checked]:
                add(token, slot, False)
            if last:
                seq.logits_at = n
            for token in tokens[-checked:]:
                add(token, slot, last)
        batch.n_tokens = n
        if n == 0:
            return events
        started = time.perf_counter()
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed (status {status}) with {n} tokens of "
                              f"{len(order)} sequences")
        now = time.monotonic()
        for seq in order:
            if seq.logits_at < 0:
                continue
            if self._sample(seq):
                events += self._finish(seq)
            else:
                events += seq.flush(now, flush_seconds)
        if decoding and self.speculation:  # what drafts cost, for the next steps' drafts
            self.step_cost.record(len(generating), drafted, time.perf_counter() - started)
        return events

    def _draft(self, generating: list[Reply], room: int,
               feed: dict[int, tuple[Reply, list[int]]]) -> int:
        """Each generating reply's draft, fed after its next token in what room the batch has
        left: by lookup (free to propose), else from the draft model, if there is one (its
        decodes counted in a token's cost). How many tokens were drafted."""
        replies = len(generating)
        cost = self.step_cost.cost(replies, drafting=False)
        if cost >= 1.0:  # (a full batch: no draft pays, none probes)
            return 0
        full = self.step_cost.cost(replies)
        wants: dict[int, tuple[list[int], int]] = {}
        for left, seq in enumerate(reversed(generating)):
            assert seq.drafter is not None
            cells = len(self._slots[seq.slot].cells)
            limit = min(room // (left + 1), seq.budget - seq.stats.generated_tokens - 1,
                        self.n_ctx_seq - cells - 2)
            room -= len(seq.drafter.propose(limit, cost))
            if (self.draft_model is not None and not seq.drafter.draft and limit > 0
                    and not seq.drafter.resting and not seq.request.images
                    and (size := min(seq.drafter.size(full), limit))):
                wants[seq.slot] = seq.drafter.lookup.tokens, size
                room -= size
        if wants:
            assert self.draft_model is not None
            drafts, decodes, seconds = self.draft_model.propose(wants, full)
            self.step_cost.drafted(decodes, seconds)
            for slot, draft in drafts.items():
                feed[slot][0].drafter.draft = draft  # type: ignore[union-attr]
        for seq in generating:
            feed[seq.slot][1].extend(seq.drafter.draft)  # type: ignore[union-attr]
        return sum(len(seq.drafter.draft) for seq in generating)  # type: ignore[union-attr]

    def _sample(self, seq: Reply) -> bool:
        """Sample ``seq``'s next token (and, past a draft, each position in turn while the
        sampler chooses the draft's token); the rejected part of a draft leaves the cells.
        True when the reply has ended."""
        llama = self._llama
        draft = seq.drafter.draft if seq.drafter is not None else []
        accepted, ended = 0, False
        for at in range(seq.logits_at, seq.logits_at + len(draft) + 1):
            logits = None
            if seq.request.logprobs is not None:  # the model's distribution, before sampling
                logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, at),
                                               shape=(self.vocab.n_vocab,)).copy()
            token = int(llama.llama_sampler_sample(seq.sampler, self._ctx, at))
            ended = seq.take(token, self.vocab, logits)
            if ended or accepted == len(draft) or token != draft[accepted]:
                break
            accepted += 1
        if draft:
            rejected = len(draft) - accepted
            if rejected:
                cells = self._slots[seq.slot].cells
                self.cells.cut(seq.slot, len(cells) - rejected)
            seq.stats.drafted_tokens += len(draft)
            seq.stats.accepted_tokens += accepted
            self.step_cost.taken(seq.drafter.taken(accepted), accepted)  # type: ignore[union-attr]
        return ended

    def _put(self, i: int, token: int, slot: int, logits: bool) -> None:
        """Place ``token`` at index ``i`` of the batch, next in ``slot``'s cells."""
        cells, batch = self._slots[slot].cells, self._batch
        batch.token[i] = token
        batch.pos[i] = len(cells)
        cells.append(token)
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _feed_images(self, seq: Reply) -> list[Event]:
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
                self.cells.cut(seq.slot, len(cells))
                return [Failed(seq.request.id, failed)]
            cells += tokens[seq.fed:run]
            seq.fed = run
        return []

    def _admit(self) -> None:
        busy = {seq.slot for seq in self._running.values()}
        free = [s for s in range(self.n_parallel) if s not in busy]
        while self._waiting and free:
            request = self._waiting.popleft()
            tokens = request.tokens
            slot, cached = self.cells.take(free, tokens, reuse=request.cache_prompt)
            free.remove(slot)
            room = self.n_ctx_seq - len(tokens)
            stats = GenerationStats(prompt_tokens=len(tokens), cached_tokens=cached)
            self._running[request.id] = Reply(
                request, slot, self.vocab.sampler(request),
                min(request.params.max_tokens, room), stats=stats,
                stops=StopStringFilter(request.stop), fed=cached,
                drafter=Drafter(PromptLookup(tokens), self.step_cost.acceptance)
                if self.speculation else None)

    def _finish(self, seq: Reply) -> list[Event]:
        del self._running[seq.request.id]
        self._llama.llama_sampler_free(seq.sampler)
        return seq.end()

    def close(self) -> None:
        llama = self._llama
        if self.vision is not None:
            self.vision.close()
            self.vision = None
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None
        for seq in list(self._running.values()):
            llama.llama_sampler_free(seq.sampler)
        self._running.clear()
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)
