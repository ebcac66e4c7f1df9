"""The files of a ``localmed quantize`` run: each output written under a temporary name and
renamed when complete, the temporary models it works from (intermediate, calibration, skeleton),
and each output's manifest.

Three ways to an output: localmed's converter writes F32/F16/BF16/Q8_0 itself
(:func:`write_direct`); llama.cpp lays out every other type from a skeleton and ggml's row
quantizers fill it from the checkpoint (:func:`write_streamed`); or llama.cpp's quantizer
quantizes an F16/BF16 intermediate, localmed's or llama.cpp's converter's
(:func:`write_llama`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from localmed import library
from localmed.atomic import atomic_path, temp_path_for, write_text_atomic
from localmed.errors import ConverterError
from localmed.formats.gguf_header import read_header
from localmed.progress import Progress
from localmed.provenance import gguf_key, sha256_file
from localmed.quantize.conversion import NATIVE, Conversion
from localmed.quantize.gguf_out import copy_with_metadata, planned_bytes, write_gguf
from localmed.quantize.imatrix import check_matches
from localmed.quantize.llama_cpp_source import run_converter
from localmed.quantize.llama_quant import llama_quantize
from localmed.quants import DIRECT_TENSOR_TYPE, QUANT_TYPES, QuantType


@dataclass
class Output:
    """One file ``localmed quantize`` wrote."""

    quant: str
    path: Path
    manifest: Path
    bytes: int
    converter: str = NATIVE


def write_direct(conv: Conversion, quant: QuantType, final: Path, progress: Progress) -> Output:
    target = DIRECT_TENSOR_TYPE[quant.name]
    task = progress.add_task(f"convert {quant.name}", total=planned_bytes(conv.plan, target))
    with atomic_path(final) as tmp:
        write_gguf(tmp, conv.family, conv.plan, target, int(quant.ftype),
                   lambda writer: conv.add_metadata(writer, quant),
                   progress=lambda n: progress.advance(task, n))
    return finish(conv, quant, final)


@contextlib.contextmanager
def temporary(conv: Conversion, out_dir: Path, kind: QuantType, role: str,
              progress: Progress | None = None, *, skeleton: bool = False) -> Iterator[Path]:
    """A hidden temporary GGUF of a direct type in the output folder, removed afterwards
    (``skeleton``: its header over a sparse, unwritten data region)."""
    tmp = temp_path_for(out_dir / f"{conv.source.name}.{kind.name}.{role}.gguf")
    try:
        target = DIRECT_TENSOR_TYPE[kind.name]
        on_bytes = None
        if progress is not None:
            task = progress.add_task(f"convert {kind.name} ({role})",
                                     total=planned_bytes(conv.plan, target))
            on_bytes = lambda n: progress.advance(task, n)  # noqa: E731
        write_gguf(tmp, conv.family, conv.plan, target, int(kind.ftype),
                   lambda writer: conv.add_metadata(writer, kind), progress=on_bytes,
                   skeleton=skeleton)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def intermediate(conv: Conversion, out_dir: Path, outputs: list[Output],
                 progress: Progress) -> Iterator[Path]:
    """The F16/BF16 file llama.cpp quantizes from: a requested output, or a temporary one."""
    existing = next((o.path for o in outputs if o.quant == conv.intermediate.name), None)
    if existing is not None:
        yield existing
        return
    with temporary(conv, out_dir, conv.intermediate, "intermediate", progress) as tmp:
        yield tmp


@contextlib.contextmanager
def calibration_model(conv: Conversion, out_dir: Path, outputs: list[Output],
                      progress: Progress) -> Iterator[Path]:
    """A model to compute ``--imatrix auto``'s matrix on, when no intermediate file exists: a
    requested F32/F16/BF16/Q8_0 output, or a temporary Q8_0 file (half of F16's disk; Q8_0's KLD
    to F16 is ~1e-3, far below what a calibration text's choice moves a matrix by)."""
    existing = next((o.path for o in outputs if o.quant in DIRECT_TENSOR_TYPE), None)
    if existing is not None:
        yield existing
        return
    with temporary(conv, out_dir, QUANT_TYPES["Q8_0"], "calibration", progress) as tmp:
        yield tmp


def skeleton(conv: Conversion, out_dir: Path) -> contextlib.AbstractContextManager[Path]:
    """The intermediate file's header over a sparse, unwritten data region."""
    return temporary(conv, out_dir, conv.intermediate, "skeleton", skeleton=True)


def metadata_overrides(conv: Conversion, quant: QuantType) -> dict[str, str]:
    """Keys a native intermediate carries for another type: set on llama.cpp's output."""
    return {gguf_key("quant"): quant.name, gguf_key("created"): conv.created,
            **{gguf_key(k): v for k, v in conv._imatrix_fields(quant).items()}}


def write_streamed(conv: Conversion, quant: QuantType, skeleton: Path, final: Path,
                   threads: int | None, progress: Progress) -> Output:
    """llama.cpp lays the file out from the skeleton; ggml's row quantizers fill it from the
    checkpoint (:mod:`localmed.quantize.direct`)."""
    from localmed.quantize.direct import fill_tensors

    matrix = conv.imatrix_for(quant)
    estimate = conv.estimate_bytes(quant)
    plan_task = progress.add_task(f"lay out {quant.name} (llama.cpp)", total=estimate)
    task = progress.add_task(f"quantize {quant.name}", total=estimate)
    with atomic_path(final) as tmp:
        run_interruptible(lambda: llama_quantize(
            skeleton, tmp, quant, threads=threads, metadata=metadata_overrides(conv, quant),
            imatrix=matrix, progress=lambda n: progress.update(plan_task, completed=n),
            label=conv.source.label))
        size = tmp.stat().st_size
        progress.update(plan_task, total=size, completed=size)
        progress.update(task, total=size)
        fill_tensors(tmp, conv.plan, DIRECT_TENSOR_TYPE[conv.intermediate.name], matrix=matrix,
                     threads=threads or os.cpu_count() or 1,
                     progress=lambda n: progress.advance(task, n))
        progress.update(task, completed=size)  # the header, written by llama.cpp, counts too
    return finish(conv, quant, final)


def llama_cpp_outtype(conv: Conversion, quants: list[QuantType]) -> QuantType:
    """What llama.cpp's converter writes: F32 when F32 is asked for, else F16/BF16."""
    return QUANT_TYPES["F32"] if QUANT_TYPES["F32"] in quants else conv.intermediate


@contextlib.contextmanager
def converted_by_llama_cpp(conv: Conversion, quants: list[QuantType], out_dir: Path,
                           progress: Progress) -> Iterator[Path]:
    """llama.cpp's converter's file, as a hidden temporary in the output folder."""
    assert conv.llama_cpp is not None
    kind = llama_cpp_outtype(conv, quants)
    tmp = temp_path_for(out_dir / f"{conv.source.name}.{kind.name}.llama-cpp.gguf")
    expected = conv.estimate_bytes(kind)
    task = progress.add_task(f"convert {kind.name} (llama.cpp)", total=expected)
    try:
        try:
            run_converter(conv.llama_cpp, conv.checkpoint.folder, tmp, kind.name.lower(),
                          expected_bytes=expected,
                          progress=lambda n: progress.update(task, completed=n))
        except ConverterError as refused:
            if not conv.native_refusal:
                raise
            # Neither converter takes it: say what localmed found, too.
            raise ConverterError(refused.path, conv.llama_cpp.label,
                                 f"{refused.reason}; localmed's converter: "
                                 f"{conv.native_refusal}") from None
        progress.update(task, total=tmp.stat().st_size, completed=tmp.stat().st_size)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def gguf_file_type(path: Path) -> int | None:
    value = read_header(path).fields.get(gguf.Keys.General.FILE_TYPE)
    return value if isinstance(value, int) else None


def write_llama(conv: Conversion, quant: QuantType, base: Path, final: Path,
                threads: int | None, progress: Progress) -> Output:
    """Quantize ``base`` with llama.cpp's quantizer. Native intermediates carry localmed's
    metadata already (``quant`` and ``created`` are set as overrides); a file from llama.cpp's
    converter gets it while the quantized file is copied into place."""
    task = progress.add_task(f"quantize {quant.name}", total=conv.estimate_bytes(quant))
    overrides = metadata_overrides(conv, quant)
    matrix = conv.imatrix_for(quant)
    if matrix is not None and conv.family is None:
        check_matches(matrix, {t.name: t.shape for t in read_header(base).tensors},
                      conv.imatrix_file or base, base.name)
    with atomic_path(final) as tmp:
        if conv.llama_cpp is None:
            run_interruptible(lambda: llama_quantize(
                base, tmp, quant, threads=threads, metadata=overrides, imatrix=matrix,
                progress=lambda n: progress.update(task, completed=n), label=conv.source.label))
        elif gguf_file_type(base) == int(quant.ftype):
            # already the type asked for: only localmed's metadata is added
            copy_with_metadata(base, tmp, conv.metadata(quant),
                               progress=lambda n: progress.update(task, completed=n))
        else:
            staged = temp_path_for(final.with_name(final.name + ".quantized"))
            try:
                run_interruptible(lambda: llama_quantize(
                    base, staged, quant, threads=threads, imatrix=matrix,
                    progress=lambda n: progress.update(task, completed=n // 2),
                    label=conv.source.label))
                size = staged.stat().st_size
                progress.update(task, total=2 * size, completed=size)
                copy_with_metadata(staged, tmp, conv.metadata(quant),
                                   progress=lambda n: progress.update(task, completed=size + n))
            finally:
                with contextlib.suppress(OSError):
                    staged.unlink()
        progress.update(task, total=tmp.stat().st_size, completed=tmp.stat().st_size)
    return finish(conv, quant, final)


def run_interruptible(work: Callable[[], None]) -> None:
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


PROJECTOR_TYPE = "F16"
"""The projector's type: llama.cpp's converter writes its matrices in F16 (a MedGemma's SigLIP
tower: 0.8 GB), the embeddings and norms in F32, as llama.cpp's own releases of Gemma 3 do."""


def write_projector(conv: Conversion, out_dir: Path, progress: Progress) -> Output:
    """An image-text model's vision projector, by llama.cpp's converter (``--mmproj``), beside
    the model's files; its manifest carries the same provenance as theirs."""
    from localmed.quantize.llama_cpp_source import find_converter

    converter = conv.llama_cpp or find_converter()
    final = library.projector_path(conv.source.name, PROJECTOR_TYPE, out_dir)
    vision = conv.checkpoint.config.get("vision_config", {})
    expected = 2 * sum(t.n_elements for name, t in conv.checkpoint.tensors.items()
                       if name.startswith(("vision", "multi_modal", "model.vision",
                                           "model.multi_modal"))) or 1
    task = progress.add_task(f"convert the vision projector ({PROJECTOR_TYPE}, llama.cpp)",
                             total=expected)
    with atomic_path(final) as tmp:
        run_converter(converter, conv.checkpoint.folder, tmp, PROJECTOR_TYPE.lower(),
                      expected_bytes=expected, mmproj=True,
                      progress=lambda n: progress.update(task, completed=n))
    size = final.stat().st_size
    progress.update(task, total=size, completed=size)
    record: dict[str, Any] = {
        "file": final.name, "bytes": size, "sha256": sha256_file(final),
        "quant": PROJECTOR_TYPE, "architecture": conv.checkpoint.architecture,
        "gguf_architecture": read_header(final).fields[gguf.Keys.General.ARCHITECTURE],
        "vision_image_size": vision.get("image_size"),
        "converter": converter.label,
        **conv.provenance(QUANT_TYPES[PROJECTOR_TYPE]).to_manifest(),
    }
    manifest = library.manifest_path(final)
    write_text_atomic(manifest, json.dumps(record, indent=2) + "\n")
    conv.projector = {k: record[k] for k in ("file", "bytes", "sha256", "quant")}
    return Output("mmproj-" + PROJECTOR_TYPE, final, manifest, size, converter.label)


def finish(conv: Conversion, quant: QuantType, final: Path) -> Output:
    size = final.stat().st_size
    manifest = library.manifest_path(final)
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
    if conv.projector is not None:
        record["projector"] = conv.projector
    write_text_atomic(manifest, json.dumps(record, indent=2) + "\n")
    return Output(quant.name, final, manifest, size, conv.converter)
