"""``localmed quantize``: checkpoint → one or several GGUF files, with provenance.

Order of work, so that mistakes cost nothing: resolve the source, open and check the checkpoint,
plan every tensor, check the output folder and free disk space, then hash inputs, convert, and
quantize. Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from localmed import paths
from localmed.atomic import (
    atomic_path,
    remove_stale_temporaries,
    temp_path_for,
    write_text_atomic,
)
from localmed.documents import CALIBRATION_FIELDS, read_documents
from localmed.errors import (
    ConverterError,
    DiskSpaceError,
    OutputError,
    UnsupportedQuantError,
)
from localmed.gguf_header import read_header
from localmed.provenance import gguf_key
from localmed.public_data import calibration_path
from localmed.quants import DIRECT_TENSOR_TYPE, QUANT_TYPES, QuantType
from quantize.checkpoint import sha256_file
from quantize.conversion import NATIVE, Conversion, Source, prepare
from quantize.conversion import resolve_source as resolve_source  # the quantize command's API
from quantize.gguf_out import copy_with_metadata, planned_bytes, write_gguf
from quantize.imatrix import (
    ImportanceMatrix,
    check_matches,
    dataset_label,
    read_imatrix,
    write_imatrix,
)
from quantize.llama_cpp_source import (
    run_converter,
)
from quantize.llama_quant import llama_quantize, llama_requires_imatrix


def check_output_dir(out_dir: Path) -> None:
    """The folder exists (created if needed) and can be written; temporaries that a killed run
    left there (SIGKILL, power loss) are removed first, so they cost no disk space."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out_dir, f"cannot create the output folder: {exc.strerror}") from None
    if not out_dir.is_dir():
        raise OutputError(out_dir, "is not a folder")
    remove_stale_temporaries(out_dir)
    probe = temp_path_for(out_dir / "write-test")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(out_dir, f"output folder is not writable: {exc.strerror}") from None


def check_disk(conv: Conversion, quants: list[QuantType], out_dir: Path, *,
               direct: bool = True, auto_matrix: bool = False) -> None:
    need = sum(conv.estimate_bytes(q) for q in quants)
    if conv.llama_cpp is None and direct:
        if auto_matrix and not any(q.direct for q in quants):
            # the matrix may have to be computed on a temporary Q8_0 model first
            need = max(need, conv.estimate_bytes(QUANT_TYPES["Q8_0"]))
    elif conv.llama_cpp is not None:
        # the converter's file, and each output once more while its metadata is added
        need += conv.estimate_bytes(_llama_cpp_outtype(conv, quants))
        need += max(conv.estimate_bytes(q) for q in quants)
    elif any(not q.direct for q in quants) and conv.intermediate not in quants:
        need += conv.estimate_bytes(conv.intermediate)
    free = shutil.disk_usage(out_dir).free
    if need * 1.02 > free:
        raise DiskSpaceError(out_dir, need, free)


class _AmountColumn(ProgressColumn):
    """Bytes and bytes/s for the file tasks; ``done/total chunks`` for a task made with
    ``unit="chunks"`` (the importance matrix's calibration run)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> RenderableType:
        unit = task.fields.get("unit")
        if unit:
            total = "?" if task.total is None else f"{task.total:.0f}"
            return Text(f"{task.completed:.0f}/{total} {unit}", style="progress.download")
        return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), _AmountColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


@dataclass
class Output:
    """One file ``localmed quantize`` wrote."""

    quant: str
    path: Path
    manifest: Path
    bytes: int
    converter: str = NATIVE


def output_path(out_dir: Path, name: str, quant: QuantType) -> Path:
    return out_dir / f"{name}.{quant.name}.gguf"


def check_output_name(name: str) -> str:
    """A base name for output files: it cannot leave the output folder or hide."""
    if not name or name != Path(name).name or name.startswith(".") or "/" in name \
            or "\\" in name:
        raise OutputError(name, "--name must be a plain file name (no folders, no leading dot)")
    return name


def check_outputs(out_dir: Path, name: str, quants: list[QuantType]) -> None:
    for quant in quants:
        final = output_path(out_dir, name, quant)
        if final.is_dir():
            raise OutputError(final, "is a folder; the GGUF cannot be written there")


AUTO_CHUNKS, AUTO_CTX = 32, 512
"""Calibration run of ``--imatrix auto``: 32 chunks of 512 tokens (about 40 PubMedQA abstracts)."""


@dataclass
class AutoImatrix:
    """``--imatrix auto``: the cached medical matrix of this source, or one computed on the
    intermediate file before quantizing."""

    texts: list[str]
    dataset: str
    """The calibration text's name and sha256, as the matrix records it."""
    cache: Path


def run_quantize(source: Source, quants: list[QuantType], out_dir: Path | None = None, *,
                 allow_pickle: bool = False, threads: int | None = None,
                 console: Console | None = None, converter: str = "auto",
                 imatrix: Path | str | None = None,
                 calibration: Path | None = None, direct: bool = True) -> list[Output]:
    """Convert ``source`` to every quant in ``quants``; returns the files written.

    ``imatrix``: a file in llama.cpp's GGUF imatrix format (used for every quantized type), or
    ``"auto"`` (for the types of 4 bits and fewer: the cached medical matrix of this source, or
    one computed from ``calibration`` text, PubMedQA abstracts by default), or None. llama.cpp's
    quantizer weights its rounding error by it, and the I-quants become possible.

    ``direct``: on localmed's converter path, write llama.cpp-quantized files straight from the
    checkpoint (quantize/direct.py), with no full-size intermediate on disk; False takes the
    F16/BF16-intermediate path (also the only one when llama.cpp's converter is used).
    """
    console = console or Console(stderr=True)
    out_dir = out_dir or paths.models_dir()
    check_output_name(source.name)
    auto = imatrix == "auto"
    matrix_file = Path(imatrix) if imatrix is not None and not auto else None
    matrix = read_imatrix(matrix_file) if matrix_file is not None else None
    auto_texts: list[str] = []
    calibration = calibration or calibration_path()
    if auto and any(q.low_bit for q in quants):
        if calibration.is_file():
            auto_texts = read_documents(calibration, fields=CALIBRATION_FIELDS)
        elif any(q.needs_imatrix for q in quants):
            raise UnsupportedQuantError(
                next(q.name for q in quants if q.needs_imatrix),
                f"needs an importance matrix, and there is no calibration text at {calibration}"
                ": get it with `localmed data pull calibration`, or pass --imatrix FILE")
    missing = [q.name for q in quants if q.needs_imatrix and matrix is None and not auto_texts]
    if missing:
        raise UnsupportedQuantError(missing[0], "needs an importance matrix (--imatrix FILE)")
    conv = prepare(source, allow_pickle=allow_pickle, converter=converter)
    if matrix is not None and matrix_file is not None:
        if conv.family is not None:  # the native plan names every GGUF tensor already
            check_matches(matrix, {p.name: tuple(reversed(p.shape)) for p in conv.plan},
                          matrix_file, source.name)
        conv.imatrix, conv.imatrix_file = matrix, matrix_file
        conv.imatrix_sha256 = sha256_file(matrix_file)
        conv.imatrix_quants = frozenset(q.name for q in quants if not q.direct)
    for quant in quants:
        if quant.ternary_only and "BitNet" not in conv.checkpoint.architecture:
            raise UnsupportedQuantError(quant.name, f"stores weights as -1/0/1, for ternary "
                                        f"(BitNet) models only; this is a "
                                        f"{conv.checkpoint.architecture} checkpoint")
    check_output_dir(out_dir)
    check_outputs(out_dir, source.name, quants)
    check_disk(conv, quants, out_dir, direct=direct, auto_matrix=bool(auto_texts))
    if conv.llama_cpp is not None:
        console.print(f"[dim]converter: {conv.converter} ({conv.why})[/]")
    else:
        check_layouts(conv, [q for q in quants if not q.direct and not (
            matrix is not None or (auto_texts and q.low_bit))], out_dir)
    if auto and any(q.low_bit for q in quants) and not auto_texts:
        console.print(f"[yellow]note:[/] no medical calibration text at {calibration}: "
                      "quantizing without an importance matrix (`localmed data pull "
                      "calibration` makes --imatrix auto compute one)")

    with _bar(console) as bar:
        files = list(conv.checkpoint.iter_input_files())
        task = bar.add_task("hash inputs", total=sum(p.stat().st_size for p in files))
        for path in files:
            conv.input_hashes[path.name] = sha256_file(path)
            bar.advance(task, path.stat().st_size)
        pending = _auto_imatrix(conv, quants, auto_texts, calibration, console)

        outputs: list[Output] = []
        # localmed's converter writes F32/F16/BF16/Q8_0 itself; the rest, and everything on the
        # llama.cpp path, comes from llama.cpp's quantizer on an intermediate file.
        native = conv.llama_cpp is None
        via_llama = [q for q in quants if not (native and q.direct)]
        for quant in quants:
            if quant not in via_llama:
                outputs.append(_write_direct(conv, quant,
                                             output_path(out_dir, source.name, quant), bar))
        if via_llama and native and direct:
            if pending is not None:
                with _calibration_model(conv, out_dir, outputs, bar) as model:
                    _compute_auto_imatrix(conv, pending, model, threads, bar)
            with _skeleton(conv, out_dir) as skeleton:
                for quant in via_llama:
                    outputs.append(_write_streamed(conv, quant, skeleton,
                                                   output_path(out_dir, source.name, quant),
                                                   threads, bar))
        elif via_llama:
            base_file = _intermediate(conv, out_dir, outputs, bar) if native else \
                _converted_by_llama_cpp(conv, quants, out_dir, bar)
            with base_file as base:
                if pending is not None:
                    _compute_auto_imatrix(conv, pending, base, threads, bar)
                for quant in via_llama:
                    outputs.append(_write_llama(conv, quant, base,
                                                output_path(out_dir, source.name, quant),
                                                threads, bar))
    return outputs


def _auto_imatrix(conv: Conversion, quants: list[QuantType], texts: list[str],
                  calibration: Path, console: Console) -> AutoImatrix | None:
    """Reuse this source's cached medical matrix, or say that one must be computed."""
    if not texts:
        return None
    digest = sha256_file(calibration)
    key = hashlib.sha256(json.dumps([conv.input_hashes, digest, AUTO_CHUNKS, AUTO_CTX],
                                    sort_keys=True).encode()).hexdigest()[:12]
    cache = paths.data_dir() / "imatrix" / f"{conv.source.name}-{key}.imatrix.gguf"
    conv.imatrix_quants = frozenset(q.name for q in quants if q.low_bit)
    if cache.is_file():
        console.print(f"[dim]imatrix: reusing {cache}[/]")
        _use_imatrix(conv, read_imatrix(cache), cache)
        return None
    return AutoImatrix(texts, dataset_label(calibration, digest), cache)


def _compute_auto_imatrix(conv: Conversion, pending: AutoImatrix, base: Path,
                          threads: int | None, bar: Progress) -> None:
    from quantize.imatrix_engine import compute_imatrix

    task = bar.add_task("imatrix (medical)", total=AUTO_CHUNKS, unit="chunks")
    matrix = compute_imatrix(base, pending.texts, n_ctx=AUTO_CTX, chunks=AUTO_CHUNKS,
                             threads=threads,
                             progress=lambda done, total, _: bar.update(task, completed=done,
                                                                         total=total))
    matrix.datasets = [pending.dataset]
    pending.cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pending.cache) as tmp:
        write_imatrix(tmp, matrix)
    _use_imatrix(conv, matrix, pending.cache)


def _use_imatrix(conv: Conversion, matrix: ImportanceMatrix, path: Path) -> None:
    conv.imatrix, conv.imatrix_file, conv.imatrix_sha256 = matrix, path, sha256_file(path)


def _write_direct(conv: Conversion, quant: QuantType, final: Path, bar: Progress) -> Output:
    target = DIRECT_TENSOR_TYPE[quant.name]
    task = bar.add_task(f"convert {quant.name}", total=planned_bytes(conv.plan, target))
    with atomic_path(final) as tmp:
        write_gguf(tmp, conv.family, conv.plan, target, int(quant.ftype),
                   lambda writer: conv.add_metadata(writer, quant),
                   progress=lambda n: bar.advance(task, n))
    return _finish(conv, quant, final)


@contextlib.contextmanager
def _temporary(conv: Conversion, out_dir: Path, kind: QuantType, role: str,
               bar: Progress | None = None, *, skeleton: bool = False) -> Iterator[Path]:
    """A hidden temporary GGUF of a direct type in the output folder, removed afterwards
    (``skeleton``: its header over a sparse, unwritten data region)."""
    tmp = temp_path_for(out_dir / f"{conv.source.name}.{kind.name}.{role}.gguf")
    try:
        target = DIRECT_TENSOR_TYPE[kind.name]
        progress = None
        if bar is not None:
            task = bar.add_task(f"convert {kind.name} ({role})",
                                total=planned_bytes(conv.plan, target))
            progress = lambda n: bar.advance(task, n)  # noqa: E731
        write_gguf(tmp, conv.family, conv.plan, target, int(kind.ftype),
                   lambda writer: conv.add_metadata(writer, kind), progress=progress,
                   skeleton=skeleton)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def _intermediate(conv: Conversion, out_dir: Path, outputs: list[Output],
                  bar: Progress) -> Iterator[Path]:
    """The F16/BF16 file llama.cpp quantizes from: a requested output, or a temporary one."""
    existing = next((o.path for o in outputs if o.quant == conv.intermediate.name), None)
    if existing is not None:
        yield existing
        return
    with _temporary(conv, out_dir, conv.intermediate, "intermediate", bar) as tmp:
        yield tmp


@contextlib.contextmanager
def _calibration_model(conv: Conversion, out_dir: Path, outputs: list[Output],
                       bar: Progress) -> Iterator[Path]:
    """A model to compute ``--imatrix auto``'s matrix on, when no intermediate file exists: a
    requested F32/F16/BF16/Q8_0 output, or a temporary Q8_0 file (half of F16's disk; Q8_0's KLD
    to F16 is ~1e-3, far below what a calibration text's choice moves a matrix by)."""
    existing = next((o.path for o in outputs if o.quant in DIRECT_TENSOR_TYPE), None)
    if existing is not None:
        yield existing
        return
    with _temporary(conv, out_dir, QUANT_TYPES["Q8_0"], "calibration", bar) as tmp:
        yield tmp


def _skeleton(conv: Conversion, out_dir: Path) -> contextlib.AbstractContextManager[Path]:
    """The intermediate file's header over a sparse, unwritten data region."""
    return _temporary(conv, out_dir, conv.intermediate, "skeleton", skeleton=True)


def check_layouts(conv: Conversion, unweighted: list[QuantType], out_dir: Path) -> None:
    """Types llama.cpp will refuse for this model without a matrix, refused before any work.

    Which tensors need one depends on the model (rows too short for a type fall back to IQ2
    types on a small model, for IQ3_XXS): llama.cpp's own layout pass decides, as a dry run on
    the skeleton."""
    if not unweighted:
        return
    with _skeleton(conv, out_dir) as skeleton:
        for quant in unweighted:
            tensor = llama_requires_imatrix(skeleton, quant, label=conv.source.label)
            if tensor:
                raise UnsupportedQuantError(
                    quant.name, f"llama.cpp needs an importance matrix for this model at this "
                    f"type ({tensor}): use --imatrix auto (the default) or --imatrix FILE")


def _overrides(conv: Conversion, quant: QuantType) -> dict[str, str]:
    """Keys a native intermediate carries for another type: set on llama.cpp's output."""
    return {gguf_key("quant"): quant.name, gguf_key("created"): conv.created,
            **{gguf_key(k): v for k, v in conv._imatrix_fields(quant).items()}}


def _write_streamed(conv: Conversion, quant: QuantType, skeleton: Path, final: Path,
                    threads: int | None, bar: Progress) -> Output:
    """llama.cpp lays the file out from the skeleton; ggml's row quantizers fill it from the
    checkpoint (quantize/direct.py)."""
    from quantize.direct import fill_tensors

    matrix = conv.imatrix_for(quant)
    estimate = conv.estimate_bytes(quant)
    plan_task = bar.add_task(f"lay out {quant.name} (llama.cpp)", total=estimate)
    task = bar.add_task(f"quantize {quant.name}", total=estimate)
    with atomic_path(final) as tmp:
        _run_interruptible(lambda: llama_quantize(
            skeleton, tmp, quant, threads=threads, metadata=_overrides(conv, quant),
            imatrix=matrix, progress=lambda n: bar.update(plan_task, completed=n),
            label=conv.source.label))
        size = tmp.stat().st_size
        bar.update(plan_task, total=size, completed=size)
        bar.update(task, total=size)
        fill_tensors(tmp, conv.plan, DIRECT_TENSOR_TYPE[conv.intermediate.name], matrix=matrix,
                     threads=threads or os.cpu_count() or 1,
                     progress=lambda n: bar.advance(task, n))
        bar.update(task, completed=size)  # the header, written by llama.cpp, counts too
    return _finish(conv, quant, final)


def _llama_cpp_outtype(conv: Conversion, quants: list[QuantType]) -> QuantType:
    """What llama.cpp's converter writes: F32 when F32 is asked for, else F16/BF16."""
    return QUANT_TYPES["F32"] if QUANT_TYPES["F32"] in quants else conv.intermediate


@contextlib.contextmanager
def _converted_by_llama_cpp(conv: Conversion, quants: list[QuantType], out_dir: Path,
                            bar: Progress) -> Iterator[Path]:
    """llama.cpp's converter's file, as a hidden temporary in the output folder."""
    assert conv.llama_cpp is not None
    kind = _llama_cpp_outtype(conv, quants)
    tmp = temp_path_for(out_dir / f"{conv.source.name}.{kind.name}.llama-cpp.gguf")
    expected = conv.estimate_bytes(kind)
    task = bar.add_task(f"convert {kind.name} (llama.cpp)", total=expected)
    try:
        try:
            run_converter(conv.llama_cpp, conv.checkpoint.folder, tmp, kind.name.lower(),
                          expected_bytes=expected,
                          progress=lambda n: bar.update(task, completed=n))
        except ConverterError as refused:
            if not conv.native_refusal:
                raise
            # Neither converter takes it: say what localmed found, too.
            raise ConverterError(refused.path, conv.llama_cpp.label,
                                 f"{refused.reason}; localmed's converter: "
                                 f"{conv.native_refusal}") from None
        bar.update(task, total=tmp.stat().st_size, completed=tmp.stat().st_size)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def gguf_file_type(path: Path) -> int | None:
    value = read_header(path).fields.get(gguf.Keys.General.FILE_TYPE)
    return value if isinstance(value, int) else None


def _write_llama(conv: Conversion, quant: QuantType, base: Path, final: Path,
                 threads: int | None, bar: Progress) -> Output:
    """Quantize ``base`` with llama.cpp's quantizer. Native intermediates carry localmed's
    metadata already (``quant`` and ``created`` are set as overrides); a file from llama.cpp's
    converter gets it while the quantized file is copied into place."""
    task = bar.add_task(f"quantize {quant.name}", total=conv.estimate_bytes(quant))
    overrides = _overrides(conv, quant)
    matrix = conv.imatrix_for(quant)
    if matrix is not None and conv.family is None:
        check_matches(matrix, {t.name: t.shape for t in read_header(base).tensors},
                      conv.imatrix_file or base, base.name)
    with atomic_path(final) as tmp:
        if conv.llama_cpp is None:
            _run_interruptible(lambda: llama_quantize(
                base, tmp, quant, threads=threads, metadata=overrides, imatrix=matrix,
                progress=lambda n: bar.update(task, completed=n), label=conv.source.label))
        elif gguf_file_type(base) == int(quant.ftype):
            # already the type asked for: only localmed's metadata is added
            copy_with_metadata(base, tmp, conv.metadata(quant),
                               progress=lambda n: bar.update(task, completed=n))
        else:
            staged = temp_path_for(final.with_name(final.name + ".quantized"))
            try:
                _run_interruptible(lambda: llama_quantize(
                    base, staged, quant, threads=threads, imatrix=matrix,
                    progress=lambda n: bar.update(task, completed=n // 2),
                    label=conv.source.label))
                size = staged.stat().st_size
                bar.update(task, total=2 * size, completed=size)
                copy_with_metadata(staged, tmp, conv.metadata(quant),
                                   progress=lambda n: bar.update(task, completed=size + n))
            finally:
                with contextlib.suppress(OSError):
                    staged.unlink()
        bar.update(task, total=tmp.stat().st_size, completed=tmp.stat().st_size)
    return _finish(conv, quant, final)


def _run_interruptible(work: Callable[[], None]) -> None:
    """Run a long C call in a daemon thread, so Ctrl-C reaches Python at once.

    llama_model_quantize cannot be cancelled; on Ctrl-C the caller removes its output and the
    process exits, ending the thread with it.
    """
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="llama-quantize")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failure:
        raise failure[0]


def _finish(conv: Conversion, quant: QuantType, final: Path) -> Output:
    size = final.stat().st_size
    manifest = final.with_name(final.name.removesuffix(".gguf") + ".manifest.json")
    record: dict[str, Any] = {
        "file": final.name,
        "bytes": size,
        "sha256": sha256_file(final),
        "quant": quant.name,
        "architecture": conv.checkpoint.architecture,
        "gguf_architecture": read_header(final).fields[gguf.Keys.General.ARCHITECTURE],
        "parameters": conv.checkpoint.n_parameters(),
        **conv.provenance(quant).to_manifest(),
    }
    write_text_atomic(manifest, json.dumps(record, indent=2) + "\n")
    return Output(quant.name, final, manifest, size, conv.converter)
