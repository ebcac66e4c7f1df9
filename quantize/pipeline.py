"""``localmed quantize``: checkpoint → one or several GGUF files, with provenance.

Order of work, so that mistakes cost nothing: resolve the source, open and check the checkpoint,
plan every tensor, check the output folder and free disk space, then hash inputs, convert, and
quantize. Every file is written under a temporary name and renamed when complete.
"""


from __future__ import annotations

from pathlib import Path

from localmed import library
from localmed.calibration import Calibration, load_calibration
from localmed.errors import UnsupportedQuantError
from localmed.progress import NoProgress, Progress
from localmed.provenance import sha256_file
from localmed.public_data import calibration_path
from localmed.quantize.auto_imatrix import compute_auto_imatrix, plan_auto_imatrix
from localmed.quantize.conversion import Source, prepare
from localmed.quantize.conversion import resolve_source as resolve_source  # the command's API
from localmed.quantize.imatrix import check_matches, read_imatrix
from localmed.quantize.preflight import (
    check_disk,
    check_layouts,
    check_output_dir,
    check_output_name,
    check_outputs,
)
from localmed.quantize.writers import (
    Output,
    calibration_model,
    converted_by_llama_cpp,
    intermediate,
    skeleton,
    write_direct,
    write_llama,
    write_projector,
    write_streamed,
)
from localmed.quants import QuantType

__all__ = ["Output", "Source", "prepare", "resolve_source", "run_quantize"]


def run_quantize(source: Source, quants: list[QuantType], out_dir: Path | None = None, *,
                 allow_pickle: bool = False, threads: int | None = None,
                 progress: Progress | None = None, converter: str = "auto",
                 imatrix: Path | str | None = None,
                 calibration: Path | None = None, direct: bool = True) -> list[Output]:
    """Convert ``source`` to every quant in ``quants``; returns the files written.

    ``imatrix``: a file in llama.cpp's GGUF imatrix format (used for every quantized type), or
    ``"auto"`` (for the types of 4 bits and fewer: the cached medical matrix of this source, or
    one computed from ``calibration`` text, PubMedQA abstracts by default), or None. llama.cpp's
    quantizer weights its rounding error by it, and the I-quants become possible.

    ``direct``: on localmed's converter path, write llama.cpp-quantized files straight from the
    checkpoint (:mod:`localmed.quantize.direct`), with no full-size intermediate on disk; False
    takes the F16/BF16-intermediate path (also the only one when llama.cpp's converter is used).

    ``progress`` hears how far each step is, and the remarks on the way (the entry layer draws
    them); by default no one does.
    """
    progress = progress or NoProgress()
    out_dir = out_dir or library.models_dir()
    check_output_name(source.name)
    auto = imatrix == "auto"
    matrix_file = Path(imatrix) if imatrix is not None and not auto else None
    matrix = read_imatrix(matrix_file) if matrix_file is not None else None
    auto_text: Calibration | None = None
    if auto and any(q.low_bit for q in quants):
        if calibration is not None or calibration_path().is_file():
            auto_text = load_calibration(calibration)
        elif any(q.needs_imatrix for q in quants):
            raise UnsupportedQuantError(
                next(q.name for q in quants if q.needs_imatrix),
                f"needs an importance matrix, and there is no calibration text at "
                f"{calibration_path()}: get it with `localmed data pull calibration`, or pass "
                "--imatrix FILE")
    missing = [q.name for q in quants if q.needs_imatrix and matrix is None and not auto_text]
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
    check_disk(conv, quants, out_dir, direct=direct, auto_matrix=auto_text is not None)
    if conv.llama_cpp is not None:
        progress.info(f"converter: {conv.converter} ({conv.why})")
    else:
        check_layouts(conv, [q for q in quants if not q.direct and not (
            matrix is not None or (auto_text is not None and q.low_bit))], out_dir)
    if auto and any(q.low_bit for q in quants) and auto_text is None:
        progress.warn(f"no medical calibration text at {calibration_path()}: quantizing without "
                      "an importance matrix (`localmed data pull calibration` makes --imatrix "
                      "auto compute one)")

    files = list(conv.checkpoint.iter_input_files())
    task = progress.add_task("hash inputs", total=sum(p.stat().st_size for p in files))
    for path in files:
        conv.input_hashes[path.name] = sha256_file(path)
        progress.advance(task, path.stat().st_size)
    pending = plan_auto_imatrix(conv, quants, auto_text, progress)

    outputs: list[Output] = []
    if conv.image_text:  # first: each quant's manifest names it
        outputs.append(write_projector(conv, out_dir, progress))
    # localmed's converter writes F32/F16/BF16/Q8_0 itself; the rest, and everything on the
    # llama.cpp path, comes from llama.cpp's quantizer on an intermediate file.
    native = conv.llama_cpp is None
    via_llama = [q for q in quants if not (native and q.direct)]
    final = {q.name: library.gguf_path(source.name, q.name, out_dir) for q in quants}
    for quant in quants:
        if quant not in via_llama:
            outputs.append(write_direct(conv, quant, final[quant.name], progress))
    if via_llama and native and direct:
        if pending is not None:
            with calibration_model(conv, out_dir, outputs, progress) as model:
                compute_auto_imatrix(conv, pending, model, threads, progress)
        with skeleton(conv, out_dir) as layout:
            for quant in via_llama:
                outputs.append(write_streamed(conv, quant, layout, final[quant.name], threads,
                                              progress))
    elif via_llama:
        base_file = intermediate(conv, out_dir, outputs, progress) if native else \
            converted_by_llama_cpp(conv, quants, out_dir, progress)
        with base_file as base:
            if pending is not None:
                compute_auto_imatrix(conv, pending, base, threads, progress)
            for quant in via_llama:
                outputs.append(write_llama(conv, quant, base, final[quant.name], threads,
                                           progress))
    return outputs
