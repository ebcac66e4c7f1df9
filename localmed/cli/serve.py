"""``localmed serve`` and ``localmed export``: the same models for other tools on this laptop."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.markup import escape

from localmed.cli.common import console, err_console, model_options
from localmed.errors import LocalmedError

API_KEY_ENV = "LOCALMED_API_KEY"


def _model(args: argparse.Namespace):
    from localmed.chat import resolve_chat_model
    from localmed.registry import Registry

    return resolve_chat_model(args.model, Registry.load(), quant=args.quant)


def cmd_serve(args: argparse.Namespace) -> int:
    from localmed.chat import choose_template, open_runtime
    from localmed.serve.jobs import ServedModel
    from localmed.serve.server import bind

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    err = err_console()
    server = bind(args.host, args.port, api_key=api_key, log_content=args.log_content)
    runtime = None
    try:
        with err.status("loading the model…"):
            model = _model(args)
            runtime = open_runtime(model, n_ctx=args.ctx, gpu_layers=args.gpu_layers,
                                   threads=args.threads)
            choice = choose_template(model, runtime, args.template)
        served_id = model.entry.id if model.entry else model.path.stem
        server.attach(ServedModel(served_id, runtime, choice.template, model.advisory))
        host = f"[{args.host}]" if ":" in args.host else args.host
        out = console()
        out.print(f"[bold]localmed serve[/]: {escape(served_id)} at http://{host}:{args.port}/v1 "
                  "(OpenAI-compatible: /v1/models, /v1/chat/completions, /v1/completions)")
        out.print(f"  template: {escape(choice.reason)}; context {runtime.n_ctx} tokens; "
                  f"{escape(runtime.plan.label)}")
        out.print(f"  {'API key required' if api_key else 'no API key (loopback only)'}; "
                  f"requests are logged {'with' if args.log_content else 'without'} their "
                  "content; Ctrl-C stops")
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP (raised as an interrupt)
            err.print("localmed serve: stopping")
        return 0
    finally:
        server.server_close()
        if runtime is not None:
            runtime.close()


def cmd_export(args: argparse.Namespace) -> int:
    from localmed import export

    if not args.ollama and args.lmstudio is None:
        raise LocalmedError("say where to: --ollama DIR and/or --lmstudio [DIR]")
    model = _model(args)
    source = export.prepare(model.path, model.entry, template=args.template, n_ctx=args.ctx)
    out = console()
    if args.ollama:
        path, command = export.export_ollama(source, Path(args.ollama).expanduser())
        out.print(f"[green]wrote[/] {path}  (template {source.template}, "
                  f"{len(source.stops)} stop strings, num_ctx {source.n_ctx})")
        out.print(f"then: {escape(command)}", soft_wrap=True)
    if args.lmstudio is not None:
        folder = Path(args.lmstudio).expanduser() if args.lmstudio else \
            export.lmstudio_models_dir()
        target = export.export_lmstudio(source, folder, copy=args.copy)
        how = "copied" if args.copy else "linked"
        out.print(f"[green]{how}[/] {target}  (LM Studio: My Models → localmed)")
        if not source.info.chat_template:
            out.print(f"[yellow]note:[/] the GGUF has no embedded chat template; in LM Studio "
                      f"choose the '{source.template}' prompt format for it")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's commands."""
    p = sub.add_parser("serve", help="an OpenAI-compatible API on this laptop (loopback by "
                       "default)")
    model_options(p)
    p.add_argument("--template", "-t", help="prompt template (default: the one in the GGUF, "
                   "else the registry's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set "
                   f"{API_KEY_ENV})")
    p.add_argument("--log-content", action="store_true", help="log prompts and settings of "
                   "each request (off: only method, path, status, token counts, time)")
    p.set_defaults(func=cmd_serve)

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
