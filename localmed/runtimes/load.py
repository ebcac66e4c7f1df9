"""Loading llama.cpp's engines: the options a model is loaded with, its plan for this machine
(refused when it does not fit, before any weight is read), and the engine: the multi-sequence
:class:`~localmed.runtimes.batch.BatchEngine` (with its vision projector), or an embedding model's
:class:`~localmed.runtimes.embedding.EmbeddingEngine`. An engine process (chat, serve) and
:class:`~localmed.runtimes.local.LocalRuntime` (bench) load through here alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BatchOptions:
    """How to load a model for several sequences; None leaves the choice to the planner."""

    n_parallel: int
    n_ctx_seq: int | None = None
    """Tokens each sequence may hold (prompt and reply); None: the model's, at most 4096."""
    gpu_layers: int | None = None
    threads: int | None = None
    cache_ram: int = 0
    """Bytes of host memory for the cells of conversations whose slot was taken (0: none)."""
    projector: Path | None = None
    """The vision projector (``--mmproj``); None: the one beside the model, if any."""
    embedding: bool = False
    """An embedding model (:mod:`localmed.runtimes.embedding`): it answers :class:`Embed`, and
    generates nothing."""
    pooling: str = ""
    """An embedding model's pooling where its GGUF declares none."""
    cache_reuse: int = 0
    """Runs of cells this long are moved back past turns a chat left out (0: none; the chat's
    :data:`~localmed.runtimes.prompt_cache.CACHE_REUSE`)."""
    speculation: bool = False
    """Replies draft their next tokens by prompt lookup (:mod:`localmed.runtimes.speculation`;
    ``--speculation``; off by default until it pays on the machines it runs on: README)."""
    draft: Path | None = None
    """A draft model drafts instead of the lookup (``--draft``; with ``speculation`` only)."""
    rpc: Any = None
    """Workers that hold part of the model's layers (``--rpc``: a
    :class:`~localmed.rpc.workers.Workers`); None: this machine alone."""


def load_engine(path: Path, options: BatchOptions, machine: Any = None
                ) -> tuple[Any, Any, Any, str]:
    """Plan (for ``machine``, a :class:`~localmed.planner.Hardware`; None: this one), refuse
    what cannot fit, and load: the engine, its model's info, the plan, and why it takes no
    images ("": it does)."""
    from localmed.formats.gguf import read_gguf_footprint
    from localmed.planner import plan_offload, refuse_unless_fits
    from localmed.projector import pair, with_projector
    from localmed.runtimes import hardware
    from localmed.runtimes.batch import BatchEngine
    from localmed.runtimes.draft_model import with_draft

    info, footprint = read_gguf_footprint(path)
    machine = machine or hardware.detect()
    if options.embedding:
        from localmed.runtimes.embedding import EmbeddingEngine

        plan = refuse_unless_fits(plan_offload(footprint, machine,
                                               n_ctx=min(footprint.n_ctx_train, EMBED_BATCH),
                                               gpu_layers=options.gpu_layers), path)
        return (EmbeddingEngine(path, gpu_layers=plan.n_gpu_layers_arg, threads=options.threads,
                                n_batch=EMBED_BATCH, pooling=options.pooling), info, plan,
                "an embedding model")
    draft = options.draft if options.speculation else None
    pairing = pair(path, options.projector)
    per_sequence = options.n_ctx_seq or min(footprint.n_ctx_train, 4096)
    # (a draft of another vocabulary: refused here, before a weight is read)
    footprint = with_draft(with_projector(footprint, pairing), path, draft)
    if options.rpc is not None:
        plan = _split(path, footprint, machine, options,
                      n_ctx=per_sequence * options.n_parallel, draft=draft)
    else:
        plan = refuse_unless_fits(plan_offload(footprint, machine,
                                               n_ctx=per_sequence * options.n_parallel,
                                               gpu_layers=options.gpu_layers), path)
    engine = BatchEngine(path, n_parallel=options.n_parallel, n_ctx=plan.n_ctx,
                         gpu_layers=plan.n_gpu_layers_arg, threads=options.threads,
                         cache_ram=options.cache_ram, flash_attention=plan.flash_attention,
                         projector=pairing.projector.path if pairing.projector else None,
                         cache_reuse=options.cache_reuse, speculation=options.speculation,
                         draft=draft)
    return engine, info, plan, pairing.absent


def _split(path: Path, footprint: Any, machine: Any, options: BatchOptions, *, n_ctx: int,
           draft: Path | None) -> Any:
    """The plan of the model's layers over this machine and the workers (``--rpc``): each
    checked, linked (once a process: :func:`~localmed.rpc.workers.endpoints`) and made a device
    of llama.cpp's, and the split refused, naming the machine, where one lacks the memory;
    before any weight is sent."""
    from localmed.errors import ModelTooLargeError, WorkerError
    from localmed.rpc.split import plan_split
    from localmed.rpc.workers import endpoints
    from localmed.runtimes.ggml_rpc import add_workers

    if draft is not None:
        raise WorkerError("--draft with --rpc: a draft model is not split over workers yet; "
                          "leave one out")
    if machine.backend != "cpu":
        raise WorkerError("--rpc with this machine's GPU: not yet (the split counts this "
                          "machine's RAM); run it on a CPU build, or without --rpc")
    infos = options.rpc.check()
    plan, _ = plan_split(footprint, machine,
                         [(str(w), i.free) for w, i in zip(options.rpc.workers, infos, strict=True)],
                         n_ctx=n_ctx, remote_layers=options.gpu_layers)
    if not plan.fits:
        raise ModelTooLargeError(path, plan.reasons[-1], None, plan)
    found, new = endpoints(options.rpc)
    if new:
        add_workers(found)
    return plan


EMBED_BATCH = 512
"""Tokens an embedding model's batch holds (``llama_cpp.Llama``'s default ``n_batch``); a text
longer than that (or than the model's context) is cut to it."""
