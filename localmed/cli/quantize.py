"""``localmed quantize``, ``localmed imatrix`` and ``localmed install-converter``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.filesize import decimal as human_bytes
from rich.markup import escape

from localmed import library
from localmed.cli.common import console, err_console, positive
from localmed.cli.progress import progress_bars
from localmed.extras import require


def _source(args: argparse.Namespace, registry: object):
    from dataclasses import replace

    from localmed.quantize.pipeline import resolve_source

    source = resolve_source(args.source, registry, revision=args.revision,
                            token=os.environ.get("HF_TOKEN"))
    if args.name:
        source = replace(source, name=args.name, entry=registry.get(args.name) or source.entry)
    return source


def cmd_quantize(args: argparse.Namespace) -> int:
    from localmed.quantize.pipeline import run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry

    registry = Registry.load()
    out_dir = Path(args.out).expanduser() if args.out else library.models_dir()
    if args.format == "gptq":
        require("gptq", "quantize --format gptq")
        from localmed.quantize.gptq import GPTQSettings, run_gptq

        settings = GPTQSettings(bits=args.bits, group_size=args.group_size,
                                desc_act=args.desc_act, samples=args.samples,
                                calibration=Path(args.calibration) if args.calibration else None)
        settings.check()
        source = _source(args, registry)
        folder = run_gptq(source, out_dir, settings)
        console().print(f"[green]wrote[/] {folder}  (GPTQ {settings.bits}-bit, group "
                         f"{settings.group_size}; loads with transformers and vLLM)")
        return 0
    imatrix: Path | str | None = args.imatrix if args.imatrix in ("auto", "none") else \
        Path(args.imatrix).expanduser()
    quants = parse_quant_list(args.quant, imatrix=imatrix != "none")
    if args.converter == "llama.cpp":
        require("convert", "--converter llama.cpp")
    source = _source(args, registry)
    with progress_bars(err_console()) as progress:
        outputs = run_quantize(source, quants, out_dir, allow_pickle=args.allow_pickle,
                               threads=args.threads, progress=progress,
                               converter=args.converter,
                               imatrix=None if imatrix == "none" else imatrix,
                               calibration=Path(args.calibration).expanduser()
                               if args.calibration else None, direct=not args.via_intermediate)
    out = console()
    for output in outputs:
        out.print(f"[green]wrote[/] {output.path}  ({human_bytes(output.bytes)}, {output.quant}, "
                  f"converted by {output.converter})")
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    """Compute a medical importance matrix in llama.cpp's format (llama-imatrix's method)."""
    import tempfile

    from localmed import formats
    from localmed.atomic import atomic_path
    from localmed.calibration import load_calibration
    from localmed.quantize.imatrix import write_imatrix
    from localmed.quantize.imatrix_compute import compute_imatrix
    from localmed.quantize.pipeline import run_quantize
    from localmed.quantize.preflight import check_output_name
    from localmed.quants import QUANT_TYPES
    from localmed.registry import Registry

    calibration = load_calibration(Path(args.calibration) if args.calibration else None)
    err = err_console()
    source = Path(args.source).expanduser()
    registry = Registry.load()
    if not source.exists() and args.source in registry:  # its local Q8_0 or F16, if made
        source = next(iter(library.local_files(args.source, ("Q8_0", "F16", "BF16"))), source)
    with tempfile.TemporaryDirectory(prefix="localmed-imatrix-") as tmp, \
            progress_bars(err) as progress:
        if source.is_file() and formats.format_of(source).name == "gguf":
            gguf_path, name = source, source.name.split(".")[0]
        else:  # a checkpoint: a Q8_0 of it fits in RAM where its fp32 would not
            src = _source(args, registry)
            gguf_path = run_quantize(src, [QUANT_TYPES["Q8_0"]], Path(tmp),
                                     progress=progress)[0].path
            name = src.name
        out = Path(args.out).expanduser() if args.out else \
            library.imatrix_path(check_output_name(name))
        out.parent.mkdir(parents=True, exist_ok=True)
        task = progress.add_task("imatrix", total=None, unit="chunks")
        matrix = compute_imatrix(
            gguf_path, list(calibration.texts), n_ctx=args.ctx, chunks=args.chunks,
            threads=args.threads,
            progress=lambda done, total, _: progress.update(task, completed=done, total=total))
    matrix.datasets = [calibration.label]
    with atomic_path(out) as tmp_out:
        write_imatrix(tmp_out, matrix)
    partial = matrix.partial()
    if partial:
        err.print(f"[yellow]note:[/] {len(partial)} tensors have experts that no calibration "
                  f"token reached (e.g. {partial[0]}); llama.cpp weights those uniformly")
    console().print(f"[green]wrote[/] {out}  ({len(matrix.sums)} tensors, "
                    f"{matrix.chunk_count} chunks of {matrix.chunk_size} tokens from "
                    f"{calibration.path.name})")
    return 0


def cmd_install_converter(args: argparse.Namespace) -> int:
    from localmed.quantize.llama_cpp_source import PINNED, install_converter

    err = err_console()
    folder = install_converter(Path(args.sdist) if args.sdist else None,
                               log=lambda text: err.print(escape(text)))
    console().print(f"[green]installed[/] llama.cpp's converter from {PINNED} in {folder}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's commands."""
    p = sub.add_parser("quantize", help="convert a Hugging Face checkpoint to GGUF (downloads "
                       "it from the hub when SOURCE is not a local folder)")
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
    p.set_defaults(func=cmd_quantize)


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
    p.set_defaults(func=cmd_imatrix)


    p = sub.add_parser("install-converter", help="download llama.cpp's converter of the pinned "
                       "release (for architectures localmed does not convert itself)")
    p.add_argument("--sdist", metavar="FILE", help="take it from this llama-cpp-python source "
                   "archive instead of downloading it")
    p.set_defaults(func=cmd_install_converter)
