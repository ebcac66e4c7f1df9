"""``localmed models``, ``templates``, ``info`` and ``data pull``: what is known and on disk."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.filesize import decimal as human_bytes
from rich.markup import escape
from rich.table import Table

from localmed import library, paths
from localmed.cli.common import OneLineParser, console, err_console
from localmed.errors import LocalmedError


def converter_path(architecture: str) -> str:
    """Which converter ``localmed quantize`` uses for an architecture."""
    from localmed.quantize.families import native_architectures

    return "localmed" if architecture in native_architectures() else "llama.cpp"


def cmd_models(args: argparse.Namespace) -> int:
    from localmed.registry import Registry

    registry = Registry.load()
    models_dir = Path(args.dir) if args.dir else library.models_dir()
    if args.paths:
        out = console()
        out.print(f"registry files: {', '.join(str(p) for p in registry.files)}")
        out.print(f"user registry:  {paths.user_registry_path()}")
        out.print(f"models folder:  {models_dir}")
        return 0
    if args.json:
        rows = []
        for entry in registry.values():
            rows.append({
                "id": entry.id, "kind": entry.kind, "name": entry.name, "repo": entry.repo,
                "architecture": entry.architecture, "parameters_b": entry.parameters_b,
                "context_length": entry.context_length, "template": entry.template,
                "license": entry.license, "gated": entry.gated,
                "default_quant": entry.default_quant, "scores": dict(entry.scores),
                "converter": converter_path(entry.architecture),
                "local_quants": library.local_quants(entry.id, models_dir),
            })
        print(json.dumps(rows, indent=2))
        return 0
    out = console()
    table = _models_table(registry, models_dir, narrow=False)
    if out.measure(table, options=out.options.update_width(10_000)).maximum > out.width:
        table = _models_table(registry, models_dir, narrow=True)
    out.print(table)
    return 0


def _models_table(registry: object, models_dir: Path, *, narrow: bool) -> Table:
    """One model per row, nothing cut: two lines in five columns where the terminal is wide
    enough (~120 columns), else three short lines in four (the longest hub repo sets the first:
    80 columns hold it)."""
    table = Table(title=f"localmed models  (local files: {models_dir})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, leading=1)
    # (a repo longer than the registry's own wraps at 80 columns rather than lose its end)
    table.add_column("id / hub repo" + (" / licence" if narrow else ""), no_wrap=not narrow)
    table.add_column("model", no_wrap=True)
    if narrow:
        table.add_column("template\nconverter", no_wrap=True)
    else:
        table.add_column("template", no_wrap=True)
        table.add_column("converter", no_wrap=True)
    table.add_column("local quants", no_wrap=True)
    for entry in registry.values():
        quants = [q + ("*" if q == entry.default_quant else "")
                  for q in library.local_quants(entry.id, models_dir)]
        family = entry.architecture.removesuffix("ForCausalLM").removesuffix(
            "ForConditionalGeneration")
        if entry.kind == "embedding":  # BertModel, NomicBertModel: a column of its own width
            family = "BERT" if "Bert" in family else family.removesuffix("Model")
        licence = escape(entry.license) + (", [yellow]gated[/]" if entry.gated else "")
        converter = converter_path(entry.architecture)
        ctx = f"{entry.context_length // 1024}k" if entry.context_length >= 1024 else \
            str(entry.context_length)
        template = entry.template or "[dim](embeds)[/]"  # an embedding model: no template
        if narrow:
            local = "\n".join(quants) if quants else \
                f"[dim]none\ndefault\n{entry.default_quant}[/]"
            table.add_row(f"[bold]{entry.id}[/]\n[dim]{entry.repo}[/]\n[dim]{licence}[/]",
                          f"{family}\n{entry.parameters_b:g}B\n{ctx} ctx",
                          f"{template}\n[dim]{converter}[/]", local)
        else:
            local = ", ".join(quants) if quants else \
                f"[dim]none[/]\n[dim]default {entry.default_quant}[/]"
            table.add_row(f"[bold]{entry.id}[/]\n[dim]{entry.repo}[/]",
                          f"{family} {entry.parameters_b:g}B, {ctx} ctx\n[dim]{licence}[/]",
                          template, converter, local)
    return table


# --- templates ------------------------------------------------------------------------------------

def cmd_templates(args: argparse.Namespace) -> int:
    from localmed.templates import GGUF_TEMPLATE, TEMPLATES

    table = Table(title="prompt templates", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("format")
    table.add_column("stop strings")
    for template in TEMPLATES.values():
        table.add_row(template.name, escape(template.description),
                      escape(", ".join(repr(s) for s in template.stop)))
    table.add_row(GGUF_TEMPLATE, "the Jinja chat template embedded in the GGUF (sandboxed)", "")
    console().print(table)
    return 0


# --- data -----------------------------------------------------------------------------------------

def cmd_data_pull(args: argparse.Namespace) -> int:
    """The one command that downloads data sets (chat and bench never touch the network)."""
    from localmed.bench.suites import suites_dir
    from localmed.public_data import SUITE_NAMES, calibration_path, pull_calibration, pull_suite

    names = args.names or [*SUITE_NAMES, "calibration"]
    unknown = sorted(set(names) - {*SUITE_NAMES, "calibration"})
    if unknown:
        raise LocalmedError(f"unknown data set(s) {', '.join(unknown)}; known: "
                            f"{', '.join([*SUITE_NAMES, 'calibration'])}")
    out = console()
    for name in names:
        target = calibration_path() if name == "calibration" else suites_dir() / f"{name}.jsonl"
        if target.is_file() and not args.force:
            out.print(f"{name}: already at {target}")
            continue
        with err_console().status(f"downloading {name} …"):
            pull_calibration(target) if name == "calibration" else pull_suite(name, target)
        out.print(f"[green]wrote[/] {target}")
    return 0


# --- info -----------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from localmed import formats

    info = formats.describe(Path(args.file))
    if args.json:
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(info).items()}
        record["provenance"] = info.provenance.to_manifest() if info.provenance else None
        print(json.dumps(record, indent=2, default=str))
        return 0
    out = console()
    table = Table(show_header=False, box=None, title=str(info.path), title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("name", escape(info.name))
    table.add_row("format", info.format)
    table.add_row("architecture", info.architecture)
    table.add_row("quant", info.quant)
    table.add_row("size", f"{human_bytes(info.file_bytes)} ({info.file_bytes:,} bytes)")
    tensors = info.n_tensors
    table.add_row("parameters", f"{info.n_parameters:,}" + (f" in {tensors} tensors"
                                                             if tensors else ""))
    table.add_row("layers", str(info.block_count))
    table.add_row("context length", str(info.context_length))
    if info.chat_template:
        first = info.chat_template.strip().splitlines()[0]
        table.add_row("chat template", f"embedded ({len(info.chat_template)} chars): "
                      f"{escape(first[:70])}{'…' if len(first) > 70 else ''}")
    else:
        table.add_row("chat template", "[yellow]none embedded[/] (chat uses the registry "
                      "default, and says so)")
    table.add_row("BOS / EOS", escape(f"{info.bos_token!r} / {info.eos_token!r}"))
    if images := _images_row(info):
        table.add_row("images", images)
    if info.provenance:
        for key, value in info.provenance.rows():
            table.add_row(escape(key), escape(value))
    else:
        table.add_row("provenance", "[dim]none (not written by localmed)[/]")
    out.print(table)
    return 0


def _images_row(info) -> str:
    """The vision projector beside an image-text GGUF (or why it is not), for `info`."""
    from localmed.errors import ProjectorError
    from localmed.projector import pair

    if info.format != "gguf":
        return ""
    try:
        pairing = pair(info.path)
    except ProjectorError as refused:
        return f"[yellow]off[/]: {escape(str(refused))}"
    if pairing.projector is not None:
        projector = pairing.projector
        return (f"{escape(projector.path.name)} ({projector.projector_type} projector, "
                f"{human_bytes(projector.file_bytes)}, {projector.image_size} px images)")
    return f"[yellow]off[/]: {escape(pairing.absent)}" if pairing.lost else ""


def cmd_pull(args: argparse.Namespace) -> int:
    import os

    from huggingface_hub.utils import logging as hf_logging

    from localmed.planner import gib
    from localmed.pull import pull
    from localmed.registry import Registry

    # huggingface_hub resumes a dropped connection by itself (Range requests, five tries),
    # warning in two long lines each time; what fails in the end is said in one line below.
    hf_logging.set_verbosity_error()
    folder = Path(args.dir).expanduser() if args.dir else None
    with err_console().status(f"pulling {escape(args.spec)}…"):
        path, provenance = pull(args.spec, revision=args.revision,
                                token=os.environ.get("HF_TOKEN"), folder=folder,
                                registry=Registry.load())
    out = console()
    out.print(f"[green]placed[/] {escape(str(path))}  ({gib(path.stat().st_size)}, "
              f"{provenance.quant}, {escape(provenance.source)}@{provenance.revision[:12]}, "
              "sha256 checked)")
    out.print(f"then: localmed chat {escape(provenance.model_id)} --quant {provenance.quant}  "
              "(or plan, serve, bench, export)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's commands."""
    p = sub.add_parser("pull", help="download a ready-made GGUF from a hub repository "
                       "(owner/name[:QUANT], or a registry ID that names one) into the models "
                       "folder")
    p.add_argument("spec", metavar="REPO[:QUANT]", help="e.g. "
                   "bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M (quant in any case), or ID[:QUANT]")
    p.add_argument("--revision", help="a branch, tag or commit of the repository")
    p.add_argument("--dir", help="models folder to place it in (default: the data dir's)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list the model registry and which quants exist locally")
    p.add_argument("--dir", help="models folder to look in (default: the data dir)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--paths", action="store_true", help="show where registry and models live")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("templates", help="list the prompt templates")
    p.set_defaults(func=cmd_templates)

    p = sub.add_parser("info", help="describe a model (GGUF file or GPTQ folder): "
                       "architecture, quant, template, provenance")
    p.add_argument("file", metavar="MODEL", help="a .gguf file or a GPTQ folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("data", help="download the public medical data sets bench and GPTQ "
                       "use (the only command that fetches data)")
    data = p.add_subparsers(dest="data_command", required=True, metavar="ACTION",
                            parser_class=OneLineParser)
    pull = data.add_parser("pull", help="fetch question suites and calibration text with "
                           "`datasets` into the data folder")
    pull.add_argument("names", nargs="*", metavar="NAME", help="medqa, medmcqa, pubmedqa, "
                      "mmlu_medical, calibration (default: all)")
    pull.add_argument("--force", action="store_true", help="fetch again what is there")
    pull.set_defaults(func=cmd_data_pull)

