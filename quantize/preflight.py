"""Checks before a ``localmed quantize`` run does any work: the output name and folder, free
disk space, and which types llama.cpp would refuse for this model without an importance matrix.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from localmed import library
from localmed.atomic import remove_stale_temporaries, temp_path_for
from localmed.errors import DiskSpaceError, OutputError, UnsupportedQuantError
from localmed.quantize.conversion import Conversion
from localmed.quantize.llama_quant import llama_requires_imatrix
from localmed.quantize.writers import llama_cpp_outtype, skeleton
from localmed.quants import QUANT_TYPES, QuantType


def check_output_name(name: str) -> str:
    """A base name for output files: it cannot leave the output folder or hide."""
    if not name or name != Path(name).name or name.startswith(".") or "/" in name \
            or "\\" in name:
        raise OutputError(name, "--name must be a plain file name (no folders, no leading dot)")
    return name


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
    except OSError as exc:
        raise OutputError(out_dir, f"output folder is not writable: {exc.strerror}") from None
    finally:  # also when SIGTERM or Ctrl-C lands right after the write (seen in CI)
        with contextlib.suppress(OSError):
            probe.unlink()


def check_outputs(out_dir: Path, name: str, quants: list[QuantType]) -> None:
    for quant in quants:
        final = library.gguf_path(name, quant.name, out_dir)
        if final.is_dir():
            raise OutputError(final, "is a folder; the GGUF cannot be written there")


def check_disk(conv: Conversion, quants: list[QuantType], out_dir: Path, *,
               direct: bool = True, auto_matrix: bool = False) -> None:
    need = sum(conv.estimate_bytes(q) for q in quants)
    if conv.llama_cpp is None and direct:
        if auto_matrix and not any(q.direct for q in quants):
            # the matrix may have to be computed on a temporary Q8_0 model first
            need = max(need, conv.estimate_bytes(QUANT_TYPES["Q8_0"]))
    elif conv.llama_cpp is not None:
        # the converter's file, and each output once more while its metadata is added
        need += conv.estimate_bytes(llama_cpp_outtype(conv, quants))
        need += max(conv.estimate_bytes(q) for q in quants)
    elif any(not q.direct for q in quants) and conv.intermediate not in quants:
        need += conv.estimate_bytes(conv.intermediate)
    free = shutil.disk_usage(out_dir).free
    if need * 1.02 > free:
        raise DiskSpaceError(out_dir, need, free)


def check_layouts(conv: Conversion, unweighted: list[QuantType], out_dir: Path) -> None:
    """Types llama.cpp will refuse for this model without a matrix, refused before any work.

    Which tensors need one depends on the model (rows too short for a type fall back to IQ2
    types on a small model, for IQ3_XXS): llama.cpp's own layout pass decides, as a dry run on
    the skeleton."""
    if not unweighted:
        return
    with skeleton(conv, out_dir) as layout:
        for quant in unweighted:
            tensor = llama_requires_imatrix(layout, quant, label=conv.source.label)
            if tensor:
                raise UnsupportedQuantError(
                    quant.name, f"llama.cpp needs an importance matrix for this model at this "
                    f"type ({tensor}): use --imatrix auto (the default) or --imatrix FILE")
