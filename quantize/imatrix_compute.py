"""Computing an importance matrix the way llama.cpp's ``llama-imatrix`` does, in llama.cpp.

The model (a GGUF: Q8_0 or F16 of a 7B fits a 16 GB laptop where its fp32 checkpoint does not)
runs on calibration text chunk by chunk; llama.cpp's scheduler eval callback (``cb_eval``) is
asked about every node, and for each matrix multiplication inside the blocks (the output head
left out, as llama-imatrix does by default) the squares of its input activations are summed per
input column, with token counts; for MoE (``MUL_MAT_ID``) each expert only over the tokens
routed to it. The callback reads ``ggml_tensor`` through a ctypes mirror of the pinned ggml's
struct; only the CPU backend is used, so activations are in host memory.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import ImatrixError
from localmed.quantize.imatrix import ImportanceMatrix
from localmed.quantize.llama_quant import captured_llama_log

GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID = 29, 30
"""Positions in the pinned ggml's ``enum ggml_op`` (ggml/include/ggml.h)."""
GGML_TYPE_F32 = 0
MIN_TOKENS = 16
"""llama-imatrix ignores multiplications of fewer tokens (warm-up, tails)."""


class GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the pinned ggml (GGML_MAX_DIMS 4, GGML_MAX_SRC 10,
    GGML_MAX_OP_PARAMS 64, GGML_MAX_NAME 64)."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32), ("src", ctypes.POINTER(GGMLTensor) * 10),
    ("view_src", ctypes.POINTER(GGMLTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _view(t: GGMLTensor, dims: int) -> np.ndarray:
    """The float32 data of ``t`` as an array over its first ``dims`` dimensions (strided)."""
    shape = tuple(int(t.ne[i]) for i in reversed(range(dims)))
    strides = tuple(int(t.nb[i]) for i in reversed(range(dims)))
    size = max(s * (n - 1) for s, n in zip(strides, shape, strict=True)) + 4
    raw = (ctypes.c_char * size).from_address(t.data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.float32),
                                           shape=shape, strides=strides)


class Collector:
    """Accumulates in_sum2 and counts per weight from the eval callback."""

    def __init__(self, include_output: bool = False) -> None:
        self.matrix = ImportanceMatrix()
        self.include_output = include_output
        self.failure: BaseException | None = None

    def _wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.include_output and name == "output.weight")

    def __call__(self, tensor_p: int, ask: bool, user_data: int) -> bool:
        try:
            t = ctypes.cast(tensor_p, ctypes.POINTER(GGMLTensor)).contents
            if t.op not in (GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID):
                return False
            weight, acts = t.src[0].contents, t.src[1].contents
            name = weight.name.decode("utf-8", "replace").split("#")[-1]
            if ask:
                if t.op == GGML_OP_MUL_MAT_ID:
                    return True
                return (acts.ne[1] >= MIN_TOKENS and acts.type == GGML_TYPE_F32
                        and self._wanted(name))
            if not self._wanted(name):
                return True
            if t.op == GGML_OP_MUL_MAT:
                self._dense(name, acts)
            else:
                self._experts(name, weight, acts, t.src[2].contents)
        except BaseException as exc:  # never let an exception cross into C
            self.failure = exc
        return True

    def _dense(self, name: str, acts: GGMLTensor) -> None:
        x = _view(acts, 4).reshape(-1, int(acts.ne[0])).astype(np.float64)
        sums = self.matrix.sums.setdefault(name, np.zeros(int(acts.ne[0]), np.float32))
        counts = self.matrix.counts.setdefault(name, np.zeros(1, np.float32))
        sums += (x * x).sum(0).astype(np.float32)
        counts += x.shape[0]

    def _experts(self, name: str, weight: GGMLTensor, acts: GGMLTensor,
                 ids: GGMLTensor) -> None:
        # ids [n_used, n_tokens] (int32); acts [cols, n_used or 1, n_tokens]
        n_experts, cols = int(weight.ne[2]), int(acts.ne[0])
        x = _view(acts, 3)  # [n_tokens, n_used', cols]
        shape = (int(ids.ne[1]), int(ids.ne[0]))
        strides = (int(ids.nb[1]), int(ids.nb[0]))
        raw = (ctypes.c_char * (strides[0] * shape[0])).from_address(ids.data)
        routed = np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.int32),
                                                 shape=shape, strides=strides)
        sums = self.matrix.sums.setdefault(name, np.zeros(n_experts * cols, np.float32))
        counts = self.matrix.counts.setdefault(name, np.zeros(n_experts, np.float32))
        per = sums.reshape(n_experts, cols)
        for slot in range(shape[1]):
            rows = x[:, slot % x.shape[1], :].astype(np.float64)
            experts = routed[:, slot]
            np.add.at(per, experts, (rows * rows).astype(np.float32))
            np.add.at(counts, experts, 1)


def compute_imatrix(gguf_path: Path, texts: Sequence[str], *, n_ctx: int = 512,
                    chunks: int | None = None, threads: int | None = None,
                    progress: Callable[[int, int, float], None] | None = None,
                    ) -> ImportanceMatrix:
    """Run ``gguf_path`` over the calibration ``texts`` (joined, cut into ``n_ctx``-token
    chunks, each starting with BOS as llama-imatrix does) and collect the matrix.

    ``progress(done, total, seconds_per_chunk)`` is called after every chunk.
    """
    import llama_cpp

    with captured_llama_log():  # llama.cpp's load and context logs stay off the terminal
        return _compute(llama_cpp, gguf_path, texts, n_ctx, chunks, threads, progress)


def _compute(llama_cpp: Any, gguf_path: Path, texts: Sequence[str], n_ctx: int,
             chunks: int | None, threads: int | None,
             progress: Callable[[int, int, float], None] | None) -> ImportanceMatrix:
    collector = Collector()
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if not model:
        raise ImatrixError(gguf_path, "llama.cpp could not load it")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        text = "\n\n".join(texts).encode("utf-8")
        room = len(text) + 16
        tokens = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, room, False, False)
        ids = np.ctypeslib.as_array(tokens)[: max(n, 0)].copy()
        total = len(ids) // n_ctx
        if chunks is not None:
            total = min(total, chunks)
        if total < 1:
            raise ImatrixError(gguf_path, f"the calibration text has {len(ids)} tokens, less "
                               f"than one {n_ctx}-token chunk")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.cb_eval = callback
        if threads:
            cparams.n_threads = cparams.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ImatrixError(gguf_path, "llama.cpp could not create a context")
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        try:
            bos = llama_cpp.llama_vocab_bos(vocab)
            memory = llama_cpp.llama_get_memory(ctx)
            for chunk in range(total):
                start = time.perf_counter()
                part = ids[chunk * n_ctx:(chunk + 1) * n_ctx].astype(np.int32)
                if bos >= 0:
                    part[0] = bos
                llama_cpp.llama_memory_clear(memory, True)
                # Logits for every token, as llama-imatrix asks: otherwise the last layer
                # works on the last token alone and its matrices go uncounted.
                for i, token in enumerate(part.tolist()):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, True
                batch.n_tokens = len(part)
                if llama_cpp.llama_decode(ctx, batch):
                    raise ImatrixError(gguf_path, f"llama.cpp failed on chunk {chunk + 1}")
                if collector.failure is not None:
                    raise collector.failure
                collector.matrix.chunk_count += 1
                if progress:
                    progress(chunk + 1, total, time.perf_counter() - start)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    collector.matrix.chunk_size = n_ctx
    return collector.matrix
