"""``localmed serve`` and ``localmed export``: the same models for other tools on this laptop."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.markup import escape

from localmed.cli.common import (
    console,
    err_console,
    model_options,
    non_negative,
    port_number,
    positive,
    rpc_option,
    rpc_workers,
    speculation_option,
)
from localmed.errors import LocalmedError, ServeError
from localmed.runtimes.speculation import speculating

if TYPE_CHECKING:
    from localmed.chat import ChatModel
    from localmed.formats.info import ModelInfo
    from localmed.planner import OffloadPlan
    from localmed.serve.jobs import Jobs
    from localmed.serve.keys import KeyRing

API_KEY_ENV = "LOCALMED_API_KEY"
DEFAULT_QUEUE = 16
DEFAULT_RATE = 120
"""Requests a minute per key beyond loopback: a ward's clients, not one runaway script."""
CTX_GRANULE = 256
"""llama.cpp rounds each sequence's share of the context to a multiple of this."""


def _model(args: argparse.Namespace):
    from localmed.chat import resolve_chat_model
    from localmed.registry import Registry

    return resolve_chat_model(args.model, Registry.load(), quant=args.quant)


MIB = 2**20


def default_cache_ram() -> int:
    """llama-server's --cache-ram default (8192 MiB), at most a quarter of this machine's
    memory: a laptop keeps room for the model and everything else."""
    import psutil

    return min(8192 * MIB, psutil.virtual_memory().total // 4)


def cache_ram(args: argparse.Namespace) -> int:
    """Bytes of host memory for conversations beyond the slots (none without the cache)."""
    if not args.cache_prompt:
        return 0
    return default_cache_ram() if args.cache_ram is None else args.cache_ram * MIB


def default_parallel() -> int:
    """Replies decoded together unless --parallel says: llama-server's automatic 4, fewer on a
    machine with fewer cores (at least 2, so one long reply never holds up everyone)."""
    return min(4, max(2, os.cpu_count() or 1))


def _open(model: ChatModel, args: argparse.Namespace, log: TextIO) -> tuple[ModelInfo, OffloadPlan, Jobs]:
    """The engine for the model's format: several replies at once for a GGUF, one at a time
    for a transformers GPTQ folder."""
    from localmed import formats
    from localmed.serve.jobs import BatchJobs, SerialJobs

    def reloading(line: str) -> None:  # the engine's supervisor reloads at once
        print(f"localmed serve: {line}", file=log, flush=True)

    speculation = speculating(args.speculation, args.draft)

    if formats.format_of(model.path).name == "gguf":
        from localmed.runtimes.batch_process import BatchClient, BatchOptions

        parallel = args.parallel or default_parallel()
        # --ctx is the whole context, split among the replies as llama-server splits -c; each
        # share rounded up to llama.cpp's 256-token granule (what llama.cpp itself does)
        per_reply = -(-args.ctx // parallel // CTX_GRANULE) * CTX_GRANULE if args.ctx else None
        client = BatchClient(model.path, BatchOptions(parallel, per_reply, args.gpu_layers,
                                                      args.threads, cache_ram(args),
                                                      args.mmproj,
                                                      speculation=speculation,
                                                      draft=args.draft,
                                                      rpc=rpc_workers(args)),
                             on_restart=reloading)
        return client.ready.info, client.ready.plan, BatchJobs(client, args.queue, log)
    from localmed.chat import open_runtime

    if args.parallel and args.parallel > 1:
        raise ServeError("--parallel needs a GGUF: a GPTQ folder is served one reply at a time")
    runtime = open_runtime(model, n_ctx=args.ctx, gpu_layers=args.gpu_layers,
                           threads=args.threads, projector=args.mmproj,  # refuses --mmproj
                           on_restart=reloading, speculation=speculation,
                           draft=args.draft, rpc=rpc_workers(args))
    return runtime.info, runtime.plan, SerialJobs(runtime, args.queue, log)


def _taken(jobs: Jobs) -> str:
    """What becomes of a conversation whose slot another took, as the engine loaded it."""
    if jobs.host_cache:
        window = (f", with their {jobs.sliding_window}-token window as each prompt left it"
                  if jobs.sliding_window else "")
        return (f"up to {jobs.host_cache // MIB} MiB of host memory keep those whose slot "
                f"another took (--cache-ram){window}")
    return "one whose slot another took is prefilled again (--cache-ram 0)"


def cmd_serve(args: argparse.Namespace) -> int:
    import faulthandler
    import signal
    import sys
    from concurrent.futures import ThreadPoolExecutor

    # `kill -USR1 PID`: every thread's stack on stderr, for a server that seems stuck (a ward's
    # IT can send it without stopping anyone's replies).
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from localmed import paths
    from localmed.chat import choose_template
    from localmed.provenance import sha256_file
    from localmed.serve.audit import AuditLog
    from localmed.serve.binding import bind, is_loopback
    from localmed.serve.jobs import ServedModel
    from localmed.serve.keys import RateLimit
    from localmed.serve.tls import tls_context

    keys = _keys(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ServeError("--tls-cert and --tls-key go together")
    if args.self_signed:
        if args.tls_cert:
            raise ServeError("--self-signed or --tls-cert/--tls-key: give one")
        from localmed.serve.tls import fingerprint, self_signed_pair

        cert, key, made = self_signed_pair([args.host])
        args.tls_cert, args.tls_key = str(cert), str(key)
        err_console().print(f"{'made' if made else 'using'} a self-signed certificate: "
                            f"{escape(str(cert))}\n  clients pin its SHA-256 fingerprint "
                            f"{fingerprint(cert)}", soft_wrap=True)
    tls = tls_context(Path(args.tls_cert).expanduser(), Path(args.tls_key).expanduser()) \
        if args.tls_cert else None
    loopback = is_loopback(args.host)
    audit_path = Path(args.audit).expanduser() if args.audit else \
        None if loopback or args.no_audit else paths.data_dir() / "audit" / "serve.jsonl"
    err = err_console()
    server = bind(args.host, args.port, keys=keys, log_content=args.log_content, tls=tls,
                  insecure_http=args.insecure_http)
    jobs = None
    try:
        if audit_path is not None:
            server.audit = AuditLog(audit_path, content=args.log_content)
        rate = args.rate_limit if args.rate_limit is not None else \
            (0 if loopback else DEFAULT_RATE)
        server.rate = RateLimit(rate) if rate else None
        with err.status("loading the model…"), ThreadPoolExecutor(1) as pool:
            model = _model(args)
            hashing = pool.submit(sha256_file, model.path) if server.audit else None
            info, plan, jobs = _open(model, args, sys.stderr)
            choice = choose_template(model, info, args.template)
            server.model_sha256 = hashing.result() if hashing else ""
        if args.docs or args.embed:
            with err.status("opening the documents…"):
                server.docs = _docs(args)
        served_id = model.entry.id if model.entry else model.path.stem
        server.attach(ServedModel(served_id, info, choice.template, model.advisory,
                                  cache_prompt=args.cache_prompt, no_images=jobs.no_images),
                      jobs)
        if server.audit is not None:
            server.audit.start(model=served_id, model_file=model.path.name,
                               model_sha256=server.model_sha256, host=args.host,
                               port=args.port, tls=tls is not None,
                               keys=sorted(keys.keys) if keys else [],
                               docs=server.docs.index if server.docs else None)
        # From the banner's first line on, a stop signal stops the server (status 0): a
        # supervisor may send it as soon as it reads a line of the banner.
        try:
            host = f"[{args.host}]" if ":" in args.host else args.host
            scheme = "https" if tls else "http"
            out = console()
            routes = "/v1/models, /v1/chat/completions, /v1/completions" + (
                ", /v1/embeddings" if server.docs and server.docs.embedder else "")
            out.print(f"[bold]localmed serve[/]: {escape(served_id)} at {scheme}://{host}:"
                      f"{args.port}/v1 (OpenAI-compatible: {routes})")
            out.print(f"  template: {escape(choice.reason)}; {escape(plan.label)}")
            if jobs.parallel > 1:
                out.print(f"  {jobs.parallel} replies at once, {jobs.n_ctx} tokens each (context "
                          f"{plan.n_ctx} split {jobs.parallel} ways, as llama-server -np "
                          f"{jobs.parallel} -c {plan.n_ctx} splits it)")
                if args.cache_prompt:
                    out.print(f"  each slot keeps its conversation for the next turn; {_taken(jobs)}")
                else:
                    out.print("  every prompt is prefilled whole (--no-cache-prompt)")
            else:
                out.print(f"  one reply at a time, {jobs.n_ctx} tokens of context")
            if server.docs is not None:
                docs = server.docs
                if docs.retriever is not None:
                    how = "BM25 + " + docs.embedding_id if docs.embedder else "BM25"
                    out.print(f"  documents: {escape(docs.index)} ({escape(how)}): each chat "
                              "completion gets its passages, and `citations` in the response")
                if docs.embedder is not None:
                    out.print(f"  embeddings: {escape(docs.embedding_id)} at /v1/embeddings "
                              f"({docs.embedder.dimensions} numbers a vector)")
            out.print("  images: " + (escape(jobs.no_images) if jobs.no_images else
                                      "taken (PNG, JPEG or WebP, as data: URLs in image_url "
                                      "parts)"))
            out.print(f"  up to {jobs.queue_size} more requests wait in arrival order; beyond that "
                      "503 with Retry-After (--queue)")
            if keys is None:
                who = "no API key (loopback only)"
            elif keys.source is not None:
                who = (f"API keys of {len(keys.keys)} names from {escape(str(keys.source))} "
                       "(SIGHUP reads it again)")
            else:
                who = "API key required"
            rate_said = f"; {server.rate.per_minute} requests a minute per key" if server.rate \
                else ""
            content = "with" if args.log_content else "without"
            out.print(f"  {who}{rate_said}; requests are logged {content} their content")
            if server.audit is not None:
                texts = ", with prompts and replies" if args.log_content else ""
                out.print(f"  audit log: {escape(str(audit_path))} (hash chain{texts}; `localmed "
                          "audit verify FILE` checks it)")
            out.print("  Ctrl-C stops")
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP (raised as an interrupt)
            err.print("localmed serve: stopping")
        return 0
    finally:
        server.server_close()
        if server.audit is not None:
            server.audit.close()
            err.print(f"localmed serve: audit log {server.audit.path}: {server.audit.seq} "
                      f"records, last sha256 {server.audit.prev} (keep this line elsewhere to "
                      "prove the log was not rewritten)", soft_wrap=True)
        if jobs is not None:
            jobs.close()


def _docs(args: argparse.Namespace):
    """The index (``--docs``) and embedding model (``--embed``, else the index's) to serve."""
    from localmed.cli.docs import embedder_spec
    from localmed.retrieval.catalog import open_retriever
    from localmed.retrieval.embedder import Embedder
    from localmed.serve.documents import ServedDocs

    retriever = open_retriever(args.docs, threads=args.threads) if args.docs else None
    embedder = retriever.embedder if retriever is not None else None
    if args.embed and embedder is None:
        spec = embedder_spec(args.embed)
        embedder = Embedder(spec, threads=args.threads)
    elif args.embed and embedder is not None and embedder_spec(args.embed).identity != \
            embedder.spec.identity:
        from localmed.retrieval.catalog import close_retriever

        close_retriever(retriever)  # type: ignore[arg-type]
        raise ServeError(f"--embed {args.embed} is not the model {args.docs} was indexed with "
                         f"({embedder.spec.name}): leave --embed out, or re-index with it")
    return ServedDocs(retriever, embedder, embedder.spec.name if embedder else "",
                      k=args.passages)


def _keys(args: argparse.Namespace) -> KeyRing | None:
    from localmed.serve.keys import KeyRing

    if args.api_key_file:
        if args.api_key:
            raise ServeError("--api-key and --api-key-file: give one")
        return KeyRing.load(Path(args.api_key_file).expanduser())
    key = args.api_key or os.environ.get(API_KEY_ENV)
    return KeyRing.single(key) if key else None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from localmed.serve.audit import verify

    path = Path(args.file).expanduser()
    state = verify(path)
    out = console()
    if state.broken is not None:
        err_console().print(f"[bold red]altered:[/] {escape(str(path))}: {escape(str(state.broken))}"
                            f" ({state.records} records before it are intact)", soft_wrap=True)
        return 1
    out.print(f"{escape(str(path))}: {state.records} records, chain intact; last sha256 "
              f"{state.head}", soft_wrap=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from localmed import export

    if not args.ollama and args.lmstudio is None:
        raise LocalmedError("say where to: --ollama DIR and/or --lmstudio [DIR]")
    model = _model(args)
    source = export.prepare(model.path, model.entry, template=args.template, n_ctx=args.ctx,
                            for_ollama=bool(args.ollama))
    out = console()
    if args.ollama:
        path, command = export.export_ollama(source, Path(args.ollama).expanduser())
        out.print(f"[green]wrote[/] {path}  (template {source.template}, "
                  f"{len(source.stops)} stop strings, num_ctx {source.n_ctx})")
        for note in (*source.notes, *([source.ollama_images] if source.ollama_images else [])):
            out.print(f"[yellow]note:[/] {escape(note)}")
        out.print(f"then: {escape(command)}", soft_wrap=True)
    if args.lmstudio is not None:
        folder = Path(args.lmstudio).expanduser() if args.lmstudio else \
            export.lmstudio_models_dir()
        target = export.export_lmstudio(source, folder, copy=args.copy)
        how = "copied" if args.copy else "linked"
        out.print(f"[green]{how}[/] {target}  (LM Studio: My Models → localmed)")
        if source.projector is not None:
            out.print(f"[green]{how}[/] its vision projector beside it as mmproj-"
                      f"{escape(source.projector.name)} (LM Studio reads images with it)")
        if not source.info.chat_template:
            out.print(f"[yellow]note:[/] the GGUF has no embedded chat template; in LM Studio "
                      f"choose the '{source.template}' prompt format for it")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's commands."""
    p = sub.add_parser("serve", help="an OpenAI-compatible API on this laptop (loopback by "
                       "default; offline)")
    model_options(p)
    speculation_option(p)
    rpc_option(p)
    p.add_argument("--template", "-t", help="prompt template (default: the one in the GGUF, "
                   "else the registry's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=port_number, default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set "
                   f"{API_KEY_ENV})")
    p.add_argument("--api-key-file", metavar="FILE", help="keys with names, one 'name key' per "
                   "line, readable by you alone; read again on SIGHUP")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--self-signed", action="store_true", help="serve HTTPS with a key pair "
                   "made once for this machine (0600, in the config folder); prints the "
                   "fingerprint for clients to pin")
    p.add_argument("--insecure-http", action="store_true", help="beyond loopback, serve plain "
                   "HTTP anyway (keys and patient text readable on the network)")
    p.add_argument("--audit", metavar="FILE", help="append a hash-chained record of each "
                   "request to FILE (default beyond loopback: <data dir>/audit/serve.jsonl)")
    p.add_argument("--no-audit", action="store_true", help="beyond loopback, keep no audit log")
    p.add_argument("--rate-limit", type=non_negative, metavar="N", help="requests a minute for "
                   f"each key (default {DEFAULT_RATE} beyond loopback, none on it; 0: none)")
    p.add_argument("--parallel", "-np", type=positive, help="replies decoded together "
                   f"(default: {default_parallel()} here; --ctx is split among them)")
    p.add_argument("--queue", type=non_negative, default=DEFAULT_QUEUE, help="requests that "
                   f"may wait beyond those (default {DEFAULT_QUEUE}); more get 503 at once")
    p.add_argument("--log-content", action="store_true", help="log prompts and settings of "
                   "each request (off: only method, path, status, token counts, time)")
    p.add_argument("--cache-ram", type=non_negative, metavar="MiB", help="host memory for the "
                   "cells of conversations whose slot another one took, so their follow-ups "
                   f"are not prefilled again (default: {default_cache_ram() // MIB} MiB here, "
                   "llama-server's 8192 or a quarter of this machine's memory; 0: none)")
    p.add_argument("--mmproj", metavar="FILE", type=Path, help="the vision projector of an "
                   "image-text model (default: the one beside the model, as `localmed quantize` "
                   "and `localmed pull` put it)")
    p.add_argument("--docs", metavar="NAME", help="answer chat completions from a document "
                   "index (localmed docs add FOLDER makes one); responses carry `citations`")
    p.add_argument("--embed", metavar="MODEL", help="serve this embedding model at "
                   "/v1/embeddings (with --docs, the index's own is served)")
    p.add_argument("--passages", type=positive, default=5, help="--docs: passages a question "
                   "gets at most (default 5; fewer where its context has no room)")
    p.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false",
                   help="prefill every prompt whole: each reply depends on its request alone "
                   "(slower follow-ups; see README)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("audit", help="check a serve audit log")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = audit_sub.add_parser("verify", help="report the first record that was edited, "
                             "deleted, reordered or cut off (exit 1)")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("export", help="hand a GGUF to Ollama (Modelfile) or LM Studio")
    model_options(p)
    p.add_argument("--template", "-t", help="prompt template, if the GGUF's cannot be "
                   "recognised")
    p.add_argument("--ollama", metavar="DIR", help="write DIR/Modelfile and print the `ollama "
                   "create` command")
    p.add_argument("--lmstudio", metavar="DIR", nargs="?", const="", help="place the GGUF in "
                   "LM Studio's models folder (default ~/.lmstudio/models)")
    p.add_argument("--copy", action="store_true", help="copy into LM Studio's folder instead "
                   "of linking")
    p.set_defaults(func=cmd_export)
