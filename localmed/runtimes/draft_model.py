"""A draft model for speculative decoding (``--draft MODEL``): a small model of the target's
vocabulary proposes each reply's next tokens, and the target checks them all in one step
(:mod:`localmed.runtimes.speculation` sizes the drafts; :class:`~localmed.runtimes.batch.
BatchEngine` checks them).

The draft has a llama.cpp context of its own beside the target's, one sequence per slot (its
own cells per sequence, as llama-server's ``--model-draft`` has). It is fed lazily: when a reply
asks for a draft, the draft's cells of that slot are cut back to what they share with the
reply's tokens (the prompt and what was sampled; a rejected draft's tokens are not among them)
and the rest is decoded, every drafting reply in the same batches; then the draft decodes
greedily, one position at a time for every drafting reply at once, and a reply's draft stops
where the chance that the target takes all of it (the product of the draft's top
probabilities) falls below what one more drafted token costs.

The pair is checked as llama.cpp checks it (``common_speculative_are_compatible``): the same
tokenizer, the same BOS and EOS where they are added, vocabularies within 128 tokens of each
other, and the same text for every token from id 5 on; in the GGUF headers before the target is
loaded (:func:`check_pair`), and again with llama.cpp's own vocabularies once both are.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import EngineError, SpeculationError
from localmed.planner import ModelFootprint
from localmed.runtimes.llama_context import load_model, sequences_context

VOCAB_SIZE_SLACK = 128
"""Tokens two vocabularies may differ by (llama.cpp's ``SPEC_VOCAB_MAX_SIZE_DIFFERENCE``)."""

VOCAB_CHECK_FROM = 5
"""The first token id whose text must match (``SPEC_VOCAB_CHECK_START_TOKEN_ID``: ids below are
special tokens that converters number differently)."""

RECURRENT = ("mamba", "mamba2", "rwkv6", "rwkv7", "rwkv6qwen2", "arwkv7")
"""Architectures whose state cannot drop a rejected draft's tokens (llama.cpp's recurrent
ones; hybrids are refused once loaded)."""


def check_pair(target: Path, draft: Path) -> None:
    """Refuse, in one line, a draft that cannot draft for ``target``: read from both GGUF
    headers (no weights), before anything is loaded."""
    from gguf import Keys

    from localmed.formats.gguf import read_header_checked

    model, small = read_header_checked(Path(target)), read_header_checked(Path(draft))
    arch = small.fields[Keys.General.ARCHITECTURE]
    if arch in RECURRENT:
        raise SpeculationError(f"{draft.name} cannot draft: a {arch} model's state cannot drop "
                               "the draft tokens the model rejects")
    reason = _vocab_mismatch(
        (model.fields.get(Keys.Tokenizer.MODEL), small.fields.get(Keys.Tokenizer.MODEL)),
        *((f.get(Keys.Tokenizer.ADD_BOS), f.get(Keys.Tokenizer.BOS_ID),
           f.get(Keys.Tokenizer.ADD_EOS), f.get(Keys.Tokenizer.EOS_ID))
          for f in (model.fields, small.fields)),
        (len(model.tokens), len(small.tokens)), (model.tokens, small.tokens))
    if reason:
        raise SpeculationError(f"{draft.name} cannot draft for {Path(target).name}: {reason}")


def _vocab_mismatch(kinds: tuple[object, object], target: tuple[Any, ...],
                    draft: tuple[Any, ...], sizes: tuple[int, int],
                    texts: tuple[list[Any], list[Any]] | None = None) -> str:
    """Why two vocabularies differ ("" where they match): their tokenizers' kinds, (add BOS,
    BOS id, add EOS, EOS id) of each, their sizes and (where given) their token texts."""
    if kinds[0] != kinds[1]:
        return f"its tokenizer is {kinds[1]!r}, the model's {kinds[0]!r}"
    for name, at in (("BOS", 0), ("EOS", 2)):
        add, ids = (bool(target[at]), bool(draft[at])), (target[at + 1], draft[at + 1])
        if add[0] != add[1] or (add[0] and ids[0] != ids[1]):
            return (f"its {name} token (id {ids[1]}, added: {add[1]}) is not the model's "
                    f"(id {ids[0]}, added: {add[0]})")
    if abs(sizes[0] - sizes[1]) > VOCAB_SIZE_SLACK:
        return f"its vocabulary has {sizes[1]:,} tokens, the model's {sizes[0]:,}"
    tokens, draft_tokens = texts or ([], [])
    for i in range(VOCAB_CHECK_FROM, min(len(tokens), len(draft_tokens))):
        if bytes(tokens[i]) != bytes(draft_tokens[i]):
            return (f"another vocabulary (token {i} is {bytes(draft_tokens[i])!r} there, "
                    f"{bytes(tokens[i])!r} in the model)")
    return ""


def with_draft(footprint: ModelFootprint, target: Path, draft: Path | None) -> ModelFootprint:
    """The footprint of ``target`` with its draft's counted beside it, once the pair is checked
    (:func:`check_pair`): the draft's weights with the model's embeddings (on the GPU where the
    model is), its cells with the model's (a sequence per slot, as long as the model's)."""
    if draft is None:
        return footprint
    from localmed.formats.gguf import read_gguf_footprint

    check_pair(target, draft)
    small = read_gguf_footprint(Path(draft))[1]
    return dataclasses.replace(
        footprint, other_bytes=footprint.other_bytes + small.weights_bytes,
        kv_bytes_per_token=footprint.kv_bytes_per_token + small.kv_bytes_per_token)


class DraftModel:
    """The draft's model and context, and what each slot's cells hold."""

    def __init__(self, llama: Any, path: Path, target: Any, *, n_parallel: int, n_ctx: int,
                 gpu_layers: int, threads: int | None, n_batch: int,
                 flash_attention: bool) -> None:
        self._llama = llama
        self._model = load_model(llama, path, gpu_layers, " (the draft model)")
        self._ctx = None
        try:
            if llama.llama_model_is_recurrent(self._model) or llama.llama_model_is_hybrid(
                    self._model):
                raise SpeculationError(f"{Path(path).name} cannot draft: its state cannot drop "
                                       "the draft tokens the model rejects")
            self._check_vocab(Path(path), target)
            self._ctx = sequences_context(llama, self._model, n_ctx=n_ctx, n_batch=n_batch,
                                          n_parallel=n_parallel, threads=threads,
                                          flash_attention=flash_attention)
            if not self._ctx:
                raise EngineError(f"llama.cpp could not make a {n_ctx}-token context for the "
                                  "draft model (out of memory?)")
        except BaseException:
            self.close()
            raise
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch
        self.n_ctx_seq = int(llama.llama_n_ctx_seq(self._ctx))
        self._n_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model)))
        self._target_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(target)))
        self.held: list[list[int]] = [[] for _ in range(n_parallel)]
        """The tokens in each slot's cells of the draft."""

    def _check_vocab(self, path: Path, target: Any) -> None:
        """llama.cpp's own vocabularies, as llama.cpp compares them (their texts were compared
        in the headers: :func:`check_pair`)."""
        llama = self._llama
        vocabs = [llama.llama_model_get_vocab(m) for m in (target, self._model)]
        kinds = tuple(int(llama.llama_vocab_type(v)) for v in vocabs)
        sides = [(llama.llama_vocab_get_add_bos(v), llama.llama_vocab_bos(v),
                  llama.llama_vocab_get_add_eos(v), llama.llama_vocab_eos(v)) for v in vocabs]
        sizes = (int(llama.llama_vocab_n_tokens(vocabs[0])),
                 int(llama.llama_vocab_n_tokens(vocabs[1])))
        reason = _vocab_mismatch(kinds, sides[0], sides[1], sizes)
        if reason:
            raise SpeculationError(f"{path.name} cannot draft for this model: {reason}")

    def propose(self, wants: dict[int, tuple[list[int], int]], cost: float
                ) -> tuple[dict[int, list[int]], int, float]:
        """Drafts for ``wants`` (by slot: the reply's tokens so far, and how many it may draft),
        each stopped where the draft's confidence in all of it falls below ``cost``; and the
        decodes it took and their seconds (0, 0 where it fed a new prompt: not a step's
        cost)."""
        started = time.perf_counter()
        pending: dict[int, list[int]] = {}
        fed = 0
        for slot, (tokens, size) in wants.items():
            held = self.held[slot]
            keep = 0
            limit = min(len(held), len(tokens) - 1)  # (the last one is fed: its logits)
            while keep < limit and held[keep] == tokens[keep]:
                keep += 1
            if keep < len(held) and not self._llama.llama_memory_seq_rm(self._memory, slot,
                                                                       keep, -1):
                self._llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
                keep = 0
            del held[keep:]
            size = min(size, self.n_ctx_seq - len(tokens) - 1)
            if size > 0:
                pending[slot] = tokens[keep:]
                fed += len(tokens) - keep
        drafts: dict[int, list[int]] = {slot: [] for slot in pending}
        confidence = dict.fromkeys(pending, 1.0)
        # the tokens the draft lacks (as many batches as they take), then a position a decode
        tops, decodes = self._decode(pending), 1
        while tops:
            nxt: dict[int, list[int]] = {}
            for slot, (token, p) in tops.items():
                confidence[slot] *= p
                if confidence[slot] < cost or token >= self._target_vocab:
                    continue
                drafts[slot].append(token)
                if len(drafts[slot]) < wants[slot][1]:
                    nxt[slot] = [token]
            tops = self._decode(nxt) if nxt else {}
            decodes += bool(nxt)
        if fed > 2 * len(pending):
            return drafts, 0, 0.0
        return drafts, decodes, time.perf_counter() - started

    def _decode(self, tokens: dict[int, list[int]]) -> dict[int, tuple[int, float]]:
        """Feed each slot's ``tokens`` into its cells (batches of ``n_batch``): the draft's
        likeliest next token of each slot, and its probability."""
        llama, batch = self._llama, self._batch
        queue = [(slot, i, t) for slot in sorted(tokens) for i, t in enumerate(tokens[slot])]
        tops: dict[int, tuple[int, float]] = {}
        for start in range(0, len(queue), self.n_batch):
            rows: dict[int, int] = {}
            chunk = queue[start:start + self.n_batch]
            for n, (slot, i, token) in enumerate(chunk):
                held = self.held[slot]
                batch.token[n], batch.pos[n] = token, len(held)
                held.append(token)
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, slot
                batch.logits[n] = last = i == len(tokens[slot]) - 1
                if last:
                    rows[slot] = n
            batch.n_tokens = len(chunk)
            status = llama.llama_decode(self._ctx, batch)
            if status != 0:  # no draft this step (the target's step goes on without one);
                for slot in tokens:  # what the draft holds is unknown now: it starts again
                    llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
                    self.held[slot].clear()
                return {}
            for slot, n in rows.items():
                row = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, n),
                                            shape=(self._n_vocab,))
                top = int(np.argmax(row))
                tops[slot] = top, float(1.0 / np.exp(row - row[top]).sum())
        return tops

    def close(self) -> None:
        llama = self._llama
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None
