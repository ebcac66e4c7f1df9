"""``localmed chat``, ``plan`` and ``doctor``: the commands that load a model to run it."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from rich.markup import escape

from localmed import library
from localmed.cli.common import (
    console,
    err_console,
    model_options,
    port_number,
    positive,
    rpc_option,
    rpc_workers,
    size,
    speculation_option,
)
from localmed.cli.progress import progress_bars
from localmed.errors import LocalmedError, SpeculationError
from localmed.extras import EXTRAS, install_command, missing
from localmed.runtimes.base import GenerationParams
from localmed.runtimes.speculation import speculating


def _chat_model(args: argparse.Namespace):
    from huggingface_hub import constants

    from localmed.chat import resolve_chat_model, stdin_is_interactive
    from localmed.errors import ModelNotAvailableError
    from localmed.registry import Registry

    registry = Registry.load()
    try:
        return resolve_chat_model(args.model, registry, quant=args.quant)
    except ModelNotAvailableError as missing:
        if constants.HF_HUB_OFFLINE or not stdin_is_interactive():
            raise
        entry = registry[missing.model_id]
        if entry.gguf_repos:
            from localmed.planner import gib
            from localmed.pull import pull
            from localmed.quant_choice import estimated_bytes

            size = gib(estimated_bytes(missing.quant, int(entry.parameters_b * 1e9)))
            answer = input(f"{entry.id} {missing.quant} is not here. Pull the ready-made GGUF "
                           f"from {entry.gguf_repos[0]} (~{size})? [y/N] ")
            if answer.strip().lower() not in {"y", "yes"}:
                raise
            with err_console().status(f"pulling {entry.gguf_repos[0]}…"):
                pull(f"{entry.id}:{missing.quant}", token=os.environ.get("HF_TOKEN"),
                     registry=registry)
            return resolve_chat_model(args.model, registry, quant=args.quant)
        size = entry.parameters_b * 2
        answer = input(f"{entry.id} {missing.quant} is not here. Download {entry.repo} "
                       f"(~{size:.0f} GB of weights) and quantize it now? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            raise
        from localmed.quantize.pipeline import resolve_source, run_quantize
        from localmed.quants import get_quant

        source = resolve_source(entry.id, registry, token=os.environ.get("HF_TOKEN"))
        with progress_bars(err_console()) as progress:
            run_quantize(source, [get_quant(missing.quant)], progress=progress)
        return resolve_chat_model(args.model, registry, quant=args.quant)


def cmd_chat(args: argparse.Namespace) -> int:
    from localmed.chat import ChatSession, open_runtime
    from localmed.tui.chat_screen import FLUSH_SECONDS

    if args.web:
        return _chat_web(args)
    if args.port is not None or args.sessions is not None:
        raise LocalmedError("--port and --sessions are for --web (the chat in a browser)")
    err = err_console()
    with err.status("preparing the model…"):
        model = _chat_model(args)
        # The engine sends text as often as the screen shows it, and wakes the app no more.
        runtime = open_runtime(model, n_ctx=args.ctx, gpu_layers=args.gpu_layers,
                               threads=args.threads, batch_seconds=FLUSH_SECONDS,
                               projector=args.mmproj,
                               speculation=speculating(args.speculation, args.draft),
                               draft=args.draft, rpc=rpc_workers(args))
    try:
        session = ChatSession.open(model, runtime, template=args.template,
                                   save_history=args.save, system=args.system or "")
        session.params = dataclasses.replace(session.params, max_tokens=args.max_tokens,
                                             ignore_eos=args.ignore_eos,
                                             temperature=args.temperature)
        session.docs_k = args.passages
        if args.docs:
            from localmed.retrieval.catalog import open_retriever

            with err.status(f"opening the document index {args.docs}…"):
                session.set_docs(open_retriever(args.docs))
    except BaseException:
        runtime.close()
        raise
    if session.template_choice.fallback:
        err.print(f"[yellow]note:[/] prompt template {escape(session.template_choice.reason)}")
    from localmed.tui.app import run_chat

    run_chat(session)
    return 0


def _chat_web(args: argparse.Namespace) -> int:
    """`chat --web`: the model is found (or pulled, or made) here, once, before anything is
    served; every browser tab then runs `localmed chat` with the same arguments. A GGUF is
    loaded here too, once, for --sessions conversations, and the tabs share that engine."""
    from localmed import formats
    from localmed.tui.chat_screen import FLUSH_SECONDS
    from localmed.tui.web import check_port_free, serve_chat

    args.port = 8000 if args.port is None else args.port
    sessions = args.sessions or 1
    check_port_free(args.port)
    if args.docs:
        from localmed.retrieval.catalog import index_file

        index_file(args.docs)  # an unknown index is one line, before anything is served
    with err_console().status("finding the model…"):
        model = _chat_model(args)
    chat_args = [args.model]
    for flag, value in (("--quant", args.quant), ("--ctx", args.ctx),
                        ("--gpu-layers", args.gpu_layers), ("--threads", args.threads),
                        ("--template", args.template), ("--system", args.system),
                        ("--max-tokens", args.max_tokens), ("--mmproj", args.mmproj),
                        ("--docs", args.docs), ("--passages", args.passages),
                        ("--draft", args.draft), ("--rpc", args.rpc),
                        ("--rpc-secret", args.rpc_secret),
                        ("--temperature", args.temperature)):
        if value is not None:
            chat_args += [flag, str(value)]
    if args.save:
        chat_args.append("--save")
    if args.ignore_eos:
        chat_args.append("--ignore-eos")
    if args.insecure_rpc:
        chat_args.append("--insecure-rpc")
    workers = rpc_workers(args)
    speculation = speculating(args.speculation, args.draft)
    if speculation:
        chat_args.append("--speculation")
    title = f"localmed chat: {model.label}"
    if formats.format_of(model.path).name != "gguf":  # transformers: a model per tab
        serve_chat(chat_args, port=args.port, title=title, sessions=sessions)
        return 0
    from localmed.runtimes.batch_process import BatchClient, BatchOptions
    from localmed.runtimes.hub import EngineHub
    from localmed.runtimes.prompt_cache import CACHE_REUSE

    with err_console().status(f"loading the model for {sessions} conversation(s)…"):
        client = BatchClient(model.path, BatchOptions(sessions, args.ctx, args.gpu_layers,
                                                      args.threads, projector=args.mmproj,
                                                      cache_reuse=CACHE_REUSE,
                                                      speculation=speculation,
                                                      draft=args.draft, rpc=workers),
                             batch_seconds=FLUSH_SECONDS)
    hub = EngineHub(client)
    try:
        serve_chat(chat_args, port=args.port, title=title, sessions=sessions,
                   environment=hub.environment(), shared=True)
    finally:
        hub.close()
        client.close()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from localmed import formats
    from localmed.chat import resolve_chat_model
    from localmed.errors import ModelNotAvailableError
    from localmed.planner import gib
    from localmed.registry import Registry
    from localmed.runtimes import hardware
    from localmed.runtimes.base import describe_plan

    registry = Registry.load()
    try:  # plan never offers a download: a model not here is estimated instead
        model = resolve_chat_model(args.model, registry, quant=args.quant)
    except ModelNotAvailableError as missing:
        if missing.model_id not in registry:  # a pulled model lacking this quant
            raise
        return _plan_estimate(registry[missing.model_id], missing, args)
    hw = hardware.detect()
    # One header read: the footprint serves the plan and the quant suggestion.
    info, footprint = formats.footprint(model.path)
    beside = ""
    if info.format == "gguf":
        from localmed.errors import ProjectorError
        from localmed.projector import pair, with_projector

        try:
            pairing = pair(model.path, args.mmproj)
        except ProjectorError as refused:
            beside = f"images: off: {refused}"
        else:
            footprint = with_projector(footprint, pairing)
            if pairing.projector is not None:
                beside = (f"images: {pairing.projector.path.name} "
                          f"({gib(pairing.projector.file_bytes)}, counted in the plan)")
            elif pairing.lost:
                beside = f"images: off: {pairing.absent}"
        if args.draft is not None:
            from localmed.runtimes.draft_model import with_draft

            footprint = with_draft(footprint, model.path, args.draft)
            beside = "\n".join(filter(None, (beside, f"draft: {args.draft.name} "
                                              f"({gib(args.draft.stat().st_size)}, its cells "
                                              "too, counted in the plan)")))
    elif args.draft is not None:
        raise SpeculationError("--draft needs a GGUF: llama.cpp's engine drafts")
    if args.rpc or args.worker_memory is not None:
        return _plan_split(f"[bold]{escape(model.label)}[/]  {info.quant}, "
                           f"{gib(info.file_bytes)} {info.format.upper()}, {info.block_count} "
                           "layers", footprint, hw, args, beside)
    plan = formats.format_of(model.path).plan_footprint(footprint, formats.LoadOptions(
        n_ctx=args.ctx, gpu_layers=args.gpu_layers, threads=args.threads), hw)
    out = console()
    out.print(f"[bold]{escape(model.label)}[/]  {info.quant}, {gib(info.file_bytes)} "
              f"{info.format.upper()}, {info.block_count} layers")
    out.print(_machine_line(hw))
    if beside:
        out.print(escape(beside))
    # One recommendation: where the model does not fit, the plan's hint is the suggestion
    # printed below it (a quant smaller than the model's own).
    choice = _choose_quant(info, footprint, model.path, plan.n_ctx, hw,
                           below=None if plan.fits else info.quant)
    if not plan.fits:
        plan = dataclasses.replace(plan, suggestion=choice.quant if choice else None)
    out.print(escape(describe_plan(plan)))
    docs_fit = _plan_docs(args.docs, plan, hw) if getattr(args, "docs", None) else True
    _suggest_quant(choice, info, model.path, plan.n_ctx, hw)
    return 0 if plan.fits and docs_fit else 1


def _plan_docs(name: str, plan, hw) -> bool:
    """`plan --docs NAME`: the index's embedding model planned in what the chat model leaves,
    and how many of its passages a question gets at this context."""
    import dataclasses as dc

    from localmed import formats
    from localmed.planner import gib, plan_offload
    from localmed.retrieval import catalog
    from localmed.retrieval.embedder import EmbedderSpec
    from localmed.retrieval.grounding import PER_PASSAGE_OVERHEAD, passage_budget
    from localmed.retrieval.store import DocsIndex
    from localmed.runtimes.load import EMBED_BATCH

    with DocsIndex(catalog.index_file(name)) as index:
        _, _, passages, _ = index.counts()
        chars = index.db.execute("SELECT avg(length(text)) FROM passages").fetchone()[0] or 0
        stored = index.meta("embedder")
    out = console()
    tokens = int(chars / 4) + PER_PASSAGE_OVERHEAD  # ~4 characters a token in English prose
    reserve = min(GenerationParams.max_tokens, plan.n_ctx // 4)
    budget = passage_budget(plan.n_ctx, reserve)
    fit = min(5, budget // max(tokens, 1))
    out.print(f"documents: {escape(name)}, {passages:,} passages of ~{tokens} tokens: "
              f"{fit} of them fit a question at {plan.n_ctx} tokens of context (up to {budget} "
              f"tokens for passages beside a {reserve}-token reply; --passages bounds them)")
    if not stored:
        out.print("  no embedding model (BM25 only): nothing more to load")
        return True
    spec = EmbedderSpec.from_json(stored)
    path = Path(spec.path)
    if not path.is_file():
        out.print(f"  [yellow]its embedding model {escape(spec.name)} is not at "
                  f"{escape(spec.path)}[/]")
        return False
    info, footprint = formats.footprint(path)
    left = dc.replace(hw, ram_available=max(hw.ram_available - plan.ram_needed, 0),
                      vram_free=max(hw.vram_free - plan.vram_needed, 0))
    embed_plan = plan_offload(footprint, left, n_ctx=min(footprint.n_ctx_train, EMBED_BATCH))
    where = embed_plan.label
    out.print(f"  embedding model {escape(spec.name)} ({info.quant}, {gib(info.file_bytes)}): "
              f"{where}, needs {gib(embed_plan.ram_needed)} RAM"
              + (f" and {gib(embed_plan.vram_needed)} VRAM" if embed_plan.vram_needed else "")
              + " beside the chat model: "
              + ("fits" if embed_plan.fits else "[bold red]does not fit[/]")
              + f" (together {gib(plan.ram_needed + embed_plan.ram_needed)} of "
              f"{gib(hw.ram_available)} RAM)")
    return embed_plan.fits


def _machine_line(hw) -> str:
    from localmed.planner import gib

    return (f"machine: {hw.backend.upper()}"
            + (f" {escape(hw.device)}, {gib(hw.vram_free)} VRAM free" if hw.vram_total else "")
            + f", {gib(hw.ram_available)} of {gib(hw.ram_total)} RAM available")


def _plan_split(title: str, footprint, hw, args: argparse.Namespace, beside: str) -> int:
    """`plan --rpc`: each machine's layers and memory, before any weight is sent."""
    from localmed.cli.worker import plan_over_workers
    from localmed.runtimes.base import describe_plan

    if not args.rpc:
        raise LocalmedError("--worker-memory goes with --rpc HOST:PORT[,...]")
    if args.draft is not None:
        raise LocalmedError("--draft with --rpc: a draft model is not split over workers yet")
    plan, workers = plan_over_workers(footprint, hw, args, args.ctx)
    out = console()
    out.print(title)
    out.print(_machine_line(hw))
    out.print(escape(workers))
    if beside:
        out.print(escape(beside))
    out.print(escape(describe_plan(plan)))
    return 0 if plan.fits else 1


def _plan_estimate(entry, missing, args: argparse.Namespace) -> int:
    """`plan` for a registry model that is not on disk: its footprint estimated from the
    registry's shape and llama.cpp's bits per weight, marked as such."""
    from localmed.planner import estimate_footprint, gib, plan_offload
    from localmed.runtimes import hardware
    from localmed.runtimes.base import describe_plan

    shape = entry.model_shape()
    if shape is None:
        raise LocalmedError(f"{missing}; the registry gives no shape (layers, kv_heads, "
                            f"head_dim) for {entry.id} to estimate it from before download")
    footprint = estimate_footprint(shape, missing.quant)
    hw = hardware.detect()
    title = (f"[bold]{escape(entry.id)}[/]  {missing.quant}, not on this machine: [bold]an "
             f"estimate[/] from the registry ({entry.parameters_b:g}B parameters, "
             f"{shape.layers} layers) and llama.cpp's bits per weight\n"
             f"  ~{gib(footprint.weights_bytes)} GGUF")
    if args.rpc or args.worker_memory is not None:
        status = _plan_split(title, footprint, hw, args, "")
        console().print(f"to get it: {escape(missing.command)}")
        return status
    plan = plan_offload(footprint, hw, n_ctx=args.ctx, gpu_layers=args.gpu_layers)
    out = console()
    out.print(title)
    out.print(_machine_line(hw))
    out.print(escape(describe_plan(plan)))
    out.print(f"to get it: {escape(missing.command)}")
    return 0 if plan.fits else 1


def _bench_results(info, path) -> Path:
    return library.bench_results_path(info.model_id or path.parent.name)


def _choose_quant(info, footprint, path, n_ctx: int, hw, *, below: str | None = None):
    """The quant to make for this machine at this context: measured by `localmed bench` for
    this model when its results exist, llama.cpp's published order otherwise."""
    from localmed.planner import RAM_OVERHEAD
    from localmed.quant_choice import choose_quant, read_measured

    capacity = hw.ram_available + (0 if hw.unified_memory else hw.vram_free)
    return choose_quant(info.n_parameters, capacity=capacity, below=below,
                        measured=read_measured(_bench_results(info, path)),
                        fixed_bytes=footprint.kv_bytes(n_ctx) + RAM_OVERHEAD)


def _suggest_quant(choice, info, path, n_ctx: int, hw) -> None:
    from localmed.planner import gib

    capacity = hw.ram_available + (0 if hw.unified_memory else hw.vram_free)
    results = _bench_results(info, path)
    out = console()
    if choice is None:
        out.print(f"no quant of {info.n_parameters / 1e9:.1f}B parameters fits "
                  f"{gib(capacity)} with {n_ctx} tokens of context")
        return
    memory = "RAM" if not hw.vram_total else "memory" if hw.unified_memory else "RAM + VRAM"
    out.print(f"suggested quant for this machine at {n_ctx} tokens of context: [bold]"
              f"{escape(choice.label)}[/] (~{gib(choice.bytes)} of weights)")
    out.print(f"  - the lowest KL divergence from full precision ({choice.kld:.4f}) among the "
              f"quants that fit {gib(capacity)} of {memory}, {escape(choice.why)}")
    if choice.measured:
        out.print(f"  - results: {escape(str(results))}")
    if choice.label != info.label:
        from localmed.quants import QUANT_TYPES

        auto = QUANT_TYPES[choice.quant].low_bit
        if choice.label.endswith("+imatrix"):
            how = "(its medical importance matrix is made by default)" if auto else \
                "--imatrix FILE"
        else:
            how = "--imatrix none" if auto else ""
        out.print(f"  - make it: localmed quantize SOURCE --quant {choice.quant} {how}".rstrip())


def cmd_doctor(args: argparse.Namespace) -> int:
    from localmed.planner import gib
    from localmed.runtimes import hardware

    out = console()
    build = hardware.llama_build()
    backend = build.gpu_backend
    out.print(f"llama-cpp-python {build.version}; ggml backends: {', '.join(build.backends)}")
    offload = f"yes ({backend.upper()})" if build.offload else "no: CPU only"
    out.print(f"GPU offload: {offload}")
    total, available = hardware.ram()
    out.print(f"RAM: {gib(available)} available of {gib(total)}")
    if backend == "cuda":
        devices = hardware.cuda_devices()
        for i, dev in enumerate(devices):
            out.print(f"GPU {i}: {escape(dev.name)}, {gib(dev.free)} free of {gib(dev.total)}")
        if not devices:
            out.print("[yellow]CUDA build, but no NVIDIA GPU is visible (driver? "
                      "CUDA_VISIBLE_DEVICES?)[/]")
    elif backend != "cpu" and backend != "metal":
        out.print(f"{backend.upper()} build: free VRAM is not measured; choose the layers to "
                  "offload with --gpu-layers N (-1: all)")
    elif not build.offload:
        out.print("To offload to an NVIDIA GPU, reinstall with LOCALMED_GPU=cuda "
                  "scripts/install.sh (CMAKE_ARGS=\"-DGGML_CUDA=on\"); Apple Silicon builds "
                  "get Metal by default.")
    out.print("offline: chat, serve and bench (and their engine processes) refuse any "
              "connection beyond this machine; only pull, quantize from the hub and data pull "
              "download")
    for extra in EXTRAS.values():
        if absent := missing(extra.name):
            out.print(f"extra '{extra.name}' ({extra.adds}): not installed (no "
                      f"{', '.join(absent)}): {escape(install_command(extra.name))}")
        else:
            out.print(f"extra '{extra.name}' ({extra.adds}): {_versions(extra.modules)}")
    if args.model:
        out.print()
        args.quant = getattr(args, "quant", None)
        return cmd_plan(args)
    return 0


def _versions(modules: tuple[str, ...]) -> str:
    import importlib.metadata

    found = []
    for module in modules:  # their distributions have the same names
        try:
            found.append(f"{module} {importlib.metadata.version(module)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(module)
    return ", ".join(found)


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError(f"{value} is not from 0 to 2")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's commands."""
    p = sub.add_parser("chat", help="chat with a model in the terminal (offline)")
    model_options(p)
    speculation_option(p)
    rpc_option(p)
    p.add_argument("--template", "-t", help="prompt template (default: the one in the GGUF, "
                   "else the registry's)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--mmproj", metavar="FILE", type=Path, help="the vision projector of an "
                   "image-text model (default: the one beside the model); `/image PATH` in the "
                   "chat attaches an image")
    p.add_argument("--docs", metavar="NAME", help="answer from a document index (localmed docs "
                   "add FOLDER makes one): each question gets its passages, each reply lists "
                   "them; /docs NAME and /docs off switch in the chat")
    p.add_argument("--passages", type=positive, default=5, help="passages a question gets at "
                   "most (default 5; fewer where the context has no room)")
    p.add_argument("--save", action="store_true", help="save conversations (mode 0600) in the "
                   "data folder; off by default")
    p.add_argument("--max-tokens", type=positive, default=1024, help="longest reply, in tokens "
                   "(default 1024)")
    p.add_argument("--temperature", type=temperature, default=GenerationParams.temperature,
                   help=f"sampling temperature, 0-2 (default {GenerationParams.temperature}; "
                   "0: the same reply every time)")
    # benchmarks/decode_overhead.py forces the same token count on every path with it
    p.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--web", action="store_true", help="serve the same chat to a browser on "
                   "this machine (127.0.0.1 only) instead of this terminal")
    p.add_argument("--port", type=port_number, help="--web's port (default 8000)")
    p.add_argument("--sessions", type=positive, help="--web: browser tabs chatting at "
                   "once (default 1); a GGUF is loaded once, with a context for each")
    p.set_defaults(func=cmd_chat)


    p = sub.add_parser("plan", help="how a model would be loaded: GPU layers, memory, and why")
    model_options(p)
    p.add_argument("--docs", metavar="NAME", help="a document index chat --docs would answer "
                   "from: its embedding model's memory beside the model's, and how many "
                   "passages fit a question")
    p.add_argument("--mmproj", metavar="FILE", type=Path, help="an image-text model's vision "
                   "projector (default: the one beside the model), counted in the plan")
    p.add_argument("--draft", metavar="GGUF", type=Path, help="a draft model for speculative "
                   "decoding, counted in the plan")
    rpc_option(p)
    p.add_argument("--worker-memory", type=size, metavar="SIZE", help="with --rpc: plan as "
                   "if each worker had SIZE free (32G), asking nothing of them")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("doctor", help="what the installed llama.cpp supports, and the devices "
                       "and memory it sees")
    model_options(p, optional=True)
    p.add_argument("--docs", metavar="NAME", help="with MODEL: a document index's embedding "
                   "model planned beside it")
    p.set_defaults(func=cmd_doctor)
