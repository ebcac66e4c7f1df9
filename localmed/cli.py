"""The ``localmed`` command.

Every user mistake surfaces as a :class:`~localmed.errors.LocalmedError`: printed as one line on
stderr, exit status 2, no traceback. Ctrl-C exits 130 after the command has cleaned up.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from rich import box
from rich.filesize import decimal as human_bytes
from rich.markup import escape
from rich.table import Table

from localmed import __version__, cli_quantize, cli_run, paths
from localmed.cli_common import console, err_console
from localmed.errors import LocalmedError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# --- models ---------------------------------------------------------------------------------------

def converter_path(architecture: str) -> str:
    """Which converter ``localmed quantize`` uses for an architecture."""
    from quantize.families import native_architectures

    return "localmed" if architecture in native_architectures() else "llama.cpp"


def cmd_models(args: argparse.Namespace) -> int:
    from localmed.registry import Registry

    registry = Registry.load()
    models_dir = Path(args.dir) if args.dir else paths.models_dir()
    if args.paths:
        out = console()
        out.print(f"registry files: {', '.join(str(p) for p in registry.files)}")
        out.print(f"user registry:  {paths.user_registry_path()}")
        out.print(f"models folder:  {models_dir}")
        return 0
    local = sorted(models_dir.glob("*.gguf")) if models_dir.is_dir() else []
    if args.json:
        rows = []
        for entry in registry.values():
            rows.append({
                "id": entry.id, "name": entry.name, "repo": entry.repo,
                "architecture": entry.architecture, "parameters_b": entry.parameters_b,
                "context_length": entry.context_length, "template": entry.template,
                "license": entry.license, "gated": entry.gated,
                "default_quant": entry.default_quant, "scores": dict(entry.scores),
                "converter": converter_path(entry.architecture),
                "local_quants": _local_quants(local, entry.id),
            })
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"localmed models  (local files: {models_dir})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id / hub repo", no_wrap=True)
    table.add_column("model")
    table.add_column("template")
    table.add_column("converter")
    table.add_column("local quants")
    for entry in registry.values():
        quants = [q + ("*" if q == entry.default_quant else "")
                  for q in _local_quants(local, entry.id)]
        gated = ", [yellow]gated[/]" if entry.gated else ""
        table.add_row(
            f"[bold]{entry.id}[/]\n[dim]{entry.repo}[/]",
            f"{entry.architecture.removesuffix('ForCausalLM')} {entry.parameters_b:g}B, "
            f"{entry.context_length // 1024}k ctx\n[dim]{escape(entry.license)}[/]{gated}",
            entry.template,
            converter_path(entry.architecture),
            ", ".join(quants) if quants else f"[dim]none[/]\n[dim]default {entry.default_quant}[/]",
        )
    console().print(table)
    return 0


def _local_quants(files: list[Path], model_id: str) -> list[str]:
    prefix = f"{model_id}."
    return [f.name[len(prefix):-len(".gguf")] for f in files if f.name.startswith(prefix)]


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
    tensors = getattr(info, "n_tensors", 0)
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
    if info.provenance:
        for key, value in info.provenance.rows():
            table.add_row(escape(key), escape(value))
    else:
        table.add_row("provenance", "[dim]none (not written by localmed)[/]")
    out.print(table)
    return 0


# --- bench ----------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from localmed.bench.command import run

    return run(args, console(), err_console())


# --- entry point ----------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: …``) and exit status 2, like ours."""

    def error(self, message: str) -> NoReturn:
        err_console().print(f"[bold red]error:[/] {escape(self.prog)}: {escape(message)} "
                            f"(see {escape(self.prog)} --help)", soft_wrap=True)
        raise SystemExit(EXIT_USER_ERROR)


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not {what}")
    return value


def positive(text: str) -> int:
    return _integer(text, 1, "a positive number")


def non_negative(text: str) -> int:
    return _integer(text, 0, "zero or more")


def layers(text: str) -> int:
    return _integer(text, -1, "a number of layers (-1: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="localmed",
        description="Open medical LLMs on an offline laptop. Not medical advice: for use by "
                    "medical professionals, who verify every output.",
    )
    parser.add_argument("--version", action="version", version=f"localmed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)

    p = sub.add_parser("models", help="list the model registry and which quants exist locally")
    p.add_argument("--dir", help="models folder to look in (default: the data dir)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--paths", action="store_true", help="show where registry and models live")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("templates", help="list the prompt templates")
    p.set_defaults(func=cmd_templates)

    p = sub.add_parser("quantize", help="convert a Hugging Face checkpoint to GGUF")
    p.add_argument("source", metavar="SOURCE",
                   help="registry id (internist-7b), hub repo id (owner/name) or local folder")
    p.add_argument("--quant", "-q", default="Q4_K_M",
                   help="comma-separated quant types, e.g. Q4_K_M,Q8_0 (default: Q4_K_M)")
    p.add_argument("--out", "-o", help="output folder (default: the data dir, where chat and "
                   "bench look)")
    p.add_argument("--name", help="base name of the output files (default: the model id); a "
                   "registry id also attaches that model's advisory and template")
    p.add_argument("--format", default="gguf", choices=["gguf", "gptq"],
                   help="output format (default: gguf)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--threads", type=positive, help="threads for llama.cpp's quantizer")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin (pickle) weights, loaded with weights_only=True")
    p.add_argument("--imatrix", metavar="auto|none|FILE", default="auto",
                   help="importance matrix: weights the quantization error, and makes the "
                   "I-quants (IQ1_*, IQ2_*) and Q2_K_S possible. auto (default): for types of 4 "
                   "bits and fewer, this model's cached medical matrix, or one computed from "
                   "--calibration text; FILE: llama.cpp's GGUF imatrix format (llama-imatrix, "
                   "localmed imatrix)")
    p.add_argument("--converter", choices=["auto", "localmed", "llama.cpp"], default="auto",
                   help="auto (default): localmed's streaming converter for the families it "
                   "implements, llama.cpp's convert_hf_to_gguf.py for every other one")
    p.add_argument("--via-intermediate", action="store_true",
                   help="quantize from a full F16/BF16 file written first (llama.cpp's own "
                   "pipeline; needs that much more disk). Default: straight from the "
                   "checkpoint, byte-identical, on localmed's converter path")
    gptq = p.add_argument_group("GPTQ (--format gptq; needs pip install 'localmed[gptq]')")
    gptq.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    gptq.add_argument("--group-size", type=int, default=128, help="default 128; -1: per column")
    gptq.add_argument("--desc-act", action="store_true", help="activation order (slower, "
                      "sometimes more accurate)")
    gptq.add_argument("--calibration", metavar="FILE", help="calibration text for GPTQ and for "
                      "--imatrix auto: .jsonl with 'question' or 'text', or .txt (default: "
                      "PubMedQA abstracts)")
    gptq.add_argument("--samples", type=positive, default=128, help="calibration texts to use")
    p.set_defaults(func=cli_quantize.cmd_quantize)

    def model_options(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
        p.add_argument("model", metavar="MODEL", nargs="?" if optional else None,
                       help="registry id (internist-7b), a .gguf file, or 'demo'")
        p.add_argument("--quant", "-q", help="which local quant of a registry model "
                       "(default: its default quant)")
        p.add_argument("--ctx", type=positive, help="context size in tokens (default: the model's, "
                       "at most 4096)")
        p.add_argument("--gpu-layers", type=layers, help="layers to offload to the GPU (-1: all); "
                       "default: as many as fit")
        p.add_argument("--threads", type=positive, help="CPU threads for llama.cpp")

    p = sub.add_parser("chat", help="chat with a model in the terminal (offline)")
    model_options(p)
    p.add_argument("--template", "-t", help="prompt template (default: the one in the GGUF, "
                   "else the registry's)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--save", action="store_true", help="save conversations (mode 0600) in the "
                   "data folder; off by default")
    p.add_argument("--max-tokens", type=positive, default=1024, help="longest reply, in tokens "
                   "(default 1024)")
    # benchmarks/decode_overhead.py forces the same token count on every path with it
    p.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cli_run.cmd_chat)

    from localmed.cli_serve import add_parsers

    add_parsers(sub, model_options, positive)

    p = sub.add_parser("plan", help="how a model would be loaded: GPU layers, memory, and why")
    model_options(p)
    p.set_defaults(func=cli_run.cmd_plan)

    p = sub.add_parser("doctor", help="what the installed llama.cpp supports, and the devices "
                       "and memory it sees")
    model_options(p, optional=True)
    p.set_defaults(func=cli_run.cmd_doctor)

    p = sub.add_parser("bench", help="accuracy lost to quantization on medical question sets")
    p.add_argument("model", metavar="MODEL", help="registry id (its GGUFs in the models folder) "
                   "or a folder of GGUFs")
    p.add_argument("--quants", help="comma-separated quants to compare (default: all found)")
    p.add_argument("--reference", default="F16", help="what the others are compared with "
                   "(default: F16, so the difference is quantization alone)")
    p.add_argument("--suites", help="comma-separated: medqa, medmcqa, pubmedqa, mmlu_medical "
                   "(default: all four, unless --data is given)")
    p.add_argument("--data", action="append", metavar="FILE.jsonl",
                   help="a custom question set (repeatable), named after the file")
    p.add_argument("--limit", type=positive, help="score only the first N questions of each set")
    p.add_argument("--shots", type=non_negative, default=0, help="worked examples before each question "
                   "(the first K of each set, not scored)")
    p.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                   help="plain text (default, right for base models) or the model's template")
    p.add_argument("--text", metavar="FILE", help="medical text for perplexity and full-"
                   "vocabulary KLD (.jsonl with 'question', or .txt with blank-line documents)")
    p.add_argument("--text-docs", type=non_negative, default=8, help="documents of it to use (0: none)")
    p.add_argument("--ctx", type=positive, default=2048, help="context for question prompts")
    p.add_argument("--threads", type=positive, help="CPU threads for llama.cpp")
    p.add_argument("--out", "-o", help="results folder (default: the data dir's bench/MODEL); "
                   "rerunning into it with the same settings resumes")
    p.add_argument("--fresh", action="store_true", help="start over in --out, discarding the "
                   "results of an earlier run there")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("imatrix", help="compute a medical importance matrix (llama.cpp's "
                       "format) for quantizing with --imatrix")
    p.add_argument("source", metavar="SOURCE", help="a .gguf (Q8_0 or F16), a checkpoint "
                   "folder, a registry id or a hub repo id")
    p.add_argument("--calibration", metavar="FILE", help="calibration text: .jsonl with "
                   "'text' or 'question', or .txt (default: PubMedQA abstracts)")
    p.add_argument("--chunks", type=positive, help="chunks of --ctx tokens to run (default: "
                   "all the text gives)")
    p.add_argument("--ctx", type=positive, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--threads", type=positive, help="CPU threads for llama.cpp")
    p.add_argument("--out", "-o", help="output file (default: <models folder>/NAME.imatrix.gguf)")
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.set_defaults(func=cli_quantize.cmd_imatrix)

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

    p = sub.add_parser("install-converter", help="download llama.cpp's converter of the pinned "
                       "release (for architectures localmed does not convert itself)")
    p.add_argument("--sdist", metavar="FILE", help="take it from this llama-cpp-python source "
                   "archive instead of downloading it")
    p.set_defaults(func=cli_quantize.cmd_install_converter)

    p = sub.add_parser("info", help="describe a model (GGUF file or GPTQ folder): "
                       "architecture, quant, template, provenance")
    p.add_argument("file", metavar="MODEL", help="a .gguf file or a GPTQ folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every temporary file is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM (systemd, kill) and SIGHUP (a closed terminal) end a command as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def failure_message(exc: BaseException) -> str | None:
    """The one line a user sees for an expected failure; None for a bug (shown as a traceback)."""
    if isinstance(exc, LocalmedError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{where}out of disk space; the partial file was removed"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}permission denied ({exc.strerror})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            return f"{where}{exc.strerror}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _signals_as_interrupts():
            return args.func(args)
    except Terminated as stop:
        err_console().print(f"[yellow]terminated[/] ({signal.Signals(stop.signum).name}): no "
                            "partial files were left behind")
        return 128 + stop.signum
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/]: no partial files were left behind")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = failure_message(exc)
        if message is None:
            raise
        err_console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
