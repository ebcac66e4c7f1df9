"""Sentence embeddings from llama.cpp's embedding mode: what ``localmed docs`` indexes with.

The GGUF declares its pooling (mean for all-MiniLM and bge, CLS for MedCPT, last token for
Qwen3-Embedding) and llama.cpp pools in the graph; each vector comes back L2-normalised, so a
dot product is the cosine. Texts are packed whole into one batch until it holds ``n_batch``
tokens or as many sequences as llama.cpp allows, as ``llama_cpp.Llama.embed`` packs them: one
``llama_decode`` embeds them all. A text longer than the model's context is cut to it (and
counted); the caller decides what to do with a long query (:mod:`localmed.retrieval.embedder`).

Everything here is llama-cpp-python's public low-level API.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localmed.errors import EngineError, GGUFFileError

POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
POOLING_IDS = {name: number for number, name in POOLING.items()}


@dataclass(frozen=True)
class Embeddings:
    """Vectors of some texts, and how many of those texts were cut to the context."""

    vectors: np.ndarray
    """float32, one L2-normalised row per text."""
    tokens: int
    truncated: int


class EmbeddingEngine:
    """A GGUF embedding model loaded for batches of texts."""

    def __init__(self, path: Path, *, gpu_layers: int = 0, threads: int | None = None,
                 n_batch: int = 512, pooling: str = "") -> None:
        """``pooling`` (``mean``, ``cls``, ``last``): what to pool by where the GGUF declares
        nothing (a checkpoint converted without sentence-transformers' files)."""
        import llama_cpp

        self._llama = llama = llama_cpp
        params = llama.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        self._model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise GGUFFileError(Path(path), "llama.cpp could not load it")
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(self._model))
        self.n_batch = max(min(n_batch, self.n_ctx_train), 32)
        cores = os.cpu_count() or 1
        ctx_params = llama.llama_context_default_params()
        ctx_params.embeddings = True
        ctx_params.pooling_type = llama.LLAMA_POOLING_TYPE_UNSPECIFIED  # the GGUF's own
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = self.n_batch
        # llama_cpp.Llama(embedding=True)'s settings: a batch holds as many texts as tokens
        ctx_params.n_seq_max = min(self.n_batch, llama.llama_max_parallel_sequences())
        ctx_params.kv_unified = True
        ctx_params.n_threads = ctx_params.n_threads_batch = threads or max(cores // 2, 1)
        self._ctx = llama.llama_init_from_model(self._model, ctx_params)
        if self._ctx and pooling and llama.llama_pooling_type(self._ctx) == \
                llama.LLAMA_POOLING_TYPE_NONE:
            llama.llama_free(self._ctx)
            ctx_params.pooling_type = POOLING_IDS[pooling]
            self._ctx = llama.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise EngineError(f"llama.cpp could not make an embedding context of "
                              f"{self.n_batch} tokens (out of memory?)")
        self.n_seq_max = int(llama.llama_n_seq_max(self._ctx))
        self.pooling = POOLING.get(int(llama.llama_pooling_type(self._ctx)), "?")
        if self.pooling in ("none", "rank"):
            self.close()
            raise GGUFFileError(Path(path), f"not a sentence-embedding model: it declares "
                                f"pooling '{self.pooling}' (an embedding GGUF declares mean, "
                                "cls or last)")
        self.n_embd = int(llama.llama_model_n_embd(self._model))
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(self.n_batch, 0, self.n_seq_max)

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens of ``text`` with its own special tokens around it (``[CLS]`` …
        ``[SEP]``); special tokens written in the text are read as text."""
        data = text.encode("utf-8")
        size = len(data) + 8
        tokens = (self._llama.llama_token * size)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, size, True, False)
        if n < 0:
            size = -n
            tokens = (self._llama.llama_token * size)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, size, True,
                                           False)
        return list(tokens[:n])

    def embed(self, texts: Sequence[str]) -> Embeddings:
        out = np.zeros((len(texts), self.n_embd), dtype=np.float32)
        total = truncated = 0
        group: list[tuple[int, list[int]]] = []  # (row, tokens) in the batch being filled
        filled = 0
        for row, text in enumerate(texts):
            tokens = self.tokenize(text)
            if len(tokens) > self.n_batch:
                tokens = tokens[:self.n_batch]
                truncated += 1
            total += len(tokens)
            if group and (filled + len(tokens) > self.n_batch or len(group) >= self.n_seq_max):
                self._decode(group, out)
                group, filled = [], 0
            group.append((row, tokens))
            filled += len(tokens)
        if group:
            self._decode(group, out)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return Embeddings(out / np.maximum(norms, 1e-12), total, truncated)

    def _decode(self, group: list[tuple[int, list[int]]], out: np.ndarray) -> None:
        llama, batch = self._llama, self._batch
        n = 0
        for seq, (_, tokens) in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # every token an output: the pooling reads them all
                n += 1
        batch.n_tokens = n
        llama.llama_memory_clear(self._memory, True)
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed (status {status}) embedding {len(group)} "
                              "texts")
        for seq, (row, _) in enumerate(group):
            pointer = llama.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise EngineError("llama.cpp returned no pooled embedding")
            out[row] = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_embd,))

    def close(self) -> None:
        llama = self._llama
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama.llama_model_free(self._model)
            self._model = None
