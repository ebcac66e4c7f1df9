"""``localmed quantize``, ``localmed imatrix`` and ``localmed install-converter``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.filesize import decimal as human_bytes
from rich.markup import escape

from localmed import paths
from localmed.cli_common import console, err_console
from localmed.errors import LocalmedError


def _source(args: argparse.Namespace, registry: object):
    from dataclasses import replace

    from quantize.pipeline import resolve_source

    source = resolve_source(args.source, registry, revision=args.revision,
                            token=os.environ.get("HF_TOKEN"))
    if args.name:
        source = replace(source, name=args.name, entry=registry.get(args.name) or source.entry)
    return source


def cmd_quantize(args: argparse.Namespace) -> int:
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry
    from quantize.pipeline import run_quantize

    registry = Registry.load()
    out_dir = Path(args.out).expanduser() if args.out else paths.models_dir()
    if args.format == "gptq":
        from quantize.gptq import GPTQSettings, run_gptq

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
    source = _source(args, registry)
    outputs = run_quantize(source, quants, out_dir, allow_pickle=args.allow_pickle,
                           threads=args.threads, console=err_console(), converter=args.converter,
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

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from localmed import formats
    from localmed.atomic import atomic_path
    from localmed.documents import CALIBRATION_FIELDS, read_documents
    from localmed.public_data import calibration_path
    from localmed.quants import QUANT_TYPES
    from localmed.registry import Registry
    from quantize.checkpoint import sha256_file
    from quantize.imatrix import dataset_label, write_imatrix
    from quantize.imatrix_engine import compute_imatrix
    from quantize.pipeline import check_output_name, run_quantize

    calibration = Path(args.calibration).expanduser() if args.calibration else calibration_path()
    if not calibration.is_file():
        raise LocalmedError(f"no calibration text at {calibration}; get PubMedQA abstracts with "
                            "`localmed data pull calibration`, or pass --calibration FILE")
    texts = read_documents(calibration, fields=CALIBRATION_FIELDS)
    if not texts:
        raise LocalmedError(f"{calibration}: no text in it")
    err = err_console()
    source = Path(args.source).expanduser()
    registry = Registry.load()
    if not source.exists() and args.source in registry:  # its local Q8_0 or F16, if made
        local = [paths.models_dir() / f"{args.source}.{q}.gguf" for q in ("Q8_0", "F16", "BF16")]
        source = next((p for p in local if p.is_file()), source)
    with tempfile.TemporaryDirectory(prefix="localmed-imatrix-") as tmp:
        if source.is_file() and formats.format_of(source).name == "gguf":
            gguf_path, name = source, source.name.split(".")[0]
        else:  # a checkpoint: a Q8_0 of it fits in RAM where its fp32 would not
            src = _source(args, registry)
            gguf_path = run_quantize(src, [QUANT_TYPES["Q8_0"]], Path(tmp), console=err)[0].path
            name = src.name
        out = Path(args.out).expanduser() if args.out else \
            paths.models_dir() / f"{check_output_name(name)}.imatrix.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Progress(TextColumn("[bold]imatrix"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("chunks"), TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task("imatrix", total=None)
            matrix = compute_imatrix(
                gguf_path, texts, n_ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                progress=lambda done, total, _: bar.update(task, completed=done, total=total))
    matrix.datasets = [dataset_label(calibration, sha256_file(calibration))]
    with atomic_path(out) as tmp_out:
        write_imatrix(tmp_out, matrix)
    partial = matrix.partial()
    if partial:
        err.print(f"[yellow]note:[/] {len(partial)} tensors have experts that no calibration "
                  f"token reached (e.g. {partial[0]}); llama.cpp weights those uniformly")
    console().print(f"[green]wrote[/] {out}  ({len(matrix.sums)} tensors, "
                    f"{matrix.chunk_count} chunks of {matrix.chunk_size} tokens from "
                    f"{calibration.name})")
    return 0


def cmd_install_converter(args: argparse.Namespace) -> int:
    from quantize.llama_cpp_source import PINNED, install_converter

    err = err_console()
    folder = install_converter(Path(args.sdist) if args.sdist else None,
                               log=lambda text: err.print(escape(text)))
    console().print(f"[green]installed[/] llama.cpp's converter from {PINNED} in {folder}")
    return 0
