"""A llama.cpp model and a context of several sequences, made one way for the engine's model
(:mod:`localmed.runtimes.batch`) and its draft (:mod:`localmed.runtimes.draft_model`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from localmed.errors import GGUFFileError


def load_model(llama: Any, path: Path, gpu_layers: int, what: str = "") -> Any:
    """A llama.cpp model with ``gpu_layers`` on the GPU; a file llama.cpp cannot load is a
    :class:`GGUFFileError` (``what``: which model, in its message)."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise GGUFFileError(Path(path), f"llama.cpp could not load it{what}")
    return model


def sequences_context(llama: Any, model: Any, *, n_ctx: int, n_batch: int, n_parallel: int,
                      threads: int | None, flash_attention: bool) -> Any:
    """A context of ``n_parallel`` sequences, each its own ``n_ctx / n_parallel`` cells (None:
    llama.cpp could not make it)."""
    cores = os.cpu_count() or 1
    params = llama.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_parallel
    params.kv_unified = False
    params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attention
                              else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    # llama_cpp.Llama's defaults: half the cores for one token, all of them for batches
    params.n_threads = threads or max(cores // 2, 1)
    params.n_threads_batch = threads or cores
    return llama.llama_init_from_model(model, params)
