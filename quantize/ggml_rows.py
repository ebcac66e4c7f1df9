"""ggml's own row quantizers (``ggml_quantize_chunk``), the code ``llama_model_quantize`` runs.

llama-cpp-python binds llama.h but not ggml's quantization API, so the five functions needed are
declared here with ctypes against the ``libggml-base`` that llama-cpp-python ships (already
loaded by ``libllama``; opening it again returns the same library). Signatures are those of
``ggml/include/ggml.h`` in the pinned release.

The calls release the GIL (plain ctypes functions), so rows are quantized on several threads the
way llama.cpp's quantizer splits them.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from localmed.errors import QuantizeError

_MIN_ROWS_PER_TASK = 16
"""Rows are independent, so how they are split between threads does not change a byte; each
thread gets a few tasks (balance), none tiny (call overhead), as llama.cpp splits them."""


@cache
def _library() -> ctypes.CDLL:
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    names = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    path = folder / names.get(sys.platform, "libggml-base.so")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def requires_imatrix(qtype: int) -> bool:
    """Whether ggml's row quantizer for ``qtype`` refuses to run without an importance matrix."""
    return bool(_library().ggml_quantize_requires_imatrix(qtype))


def row_size(qtype: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values stored as ggml type ``qtype``."""
    return int(_library().ggml_row_size(qtype, n_per_row))


def quantize_rows(name: str, rows: np.ndarray, qtype: int, *,
                  imatrix: np.ndarray | None = None, rows_per_matrix: int | None = None,
                  first_row: int = 0, threads: int = 1,
                  widen: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """``rows`` (``[n_rows, n_per_row]``) quantized as ggml type ``qtype``, as bytes.

    ``rows`` are float32, or stored otherwise and turned into float32 by ``widen`` a few
    hundred rows at a time (so a large tensor is never held twice in float32).
    ``imatrix`` holds ``n_per_row`` values per matrix of the tensor (one matrix, or one per
    expert); row ``r`` of the tensor belongs to matrix ``r // rows_per_matrix``, and ``rows``
    start at tensor row ``first_row``. The output is checked with ggml's own row validator, as
    llama.cpp checks what it writes.
    """
    lib = _library()
    if widen is None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        widen = _same
    n_rows = rows.shape[0]
    n_per_row = int(widen(rows[:1]).shape[-1]) if n_rows else 0
    type_name = gguf.GGMLQuantizationType(qtype).name
    if imatrix is None and requires_imatrix(qtype):
        raise QuantizeError(name, type_name, "this type needs an importance matrix")
    per_row = row_size(qtype, n_per_row)
    out = np.empty(n_rows * per_row, dtype=np.uint8)
    lib.ggml_quantize_init(qtype)  # the I-quant grids, once, before threads race to build them
    span = rows_per_matrix or max(n_rows + first_row, 1)
    per_task = max(_MIN_ROWS_PER_TASK, -(-n_rows // (4 * max(1, threads))))
    tasks: list[tuple[int, int, np.ndarray | None]] = []
    start = 0
    while start < n_rows:
        matrix = (first_row + start) // span
        end = min(n_rows, start + per_task, (matrix + 1) * span - first_row)
        weights = None
        if imatrix is not None:
            weights = np.ascontiguousarray(imatrix[matrix * n_per_row:(matrix + 1) * n_per_row],
                                           dtype=np.float32)
        tasks.append((start, end, weights))
        start = end

    def run(task: tuple[int, int, np.ndarray | None]) -> None:
        begin, end, weights = task
        src = np.ascontiguousarray(widen(rows[begin:end]), dtype=np.float32)
        dst = out[begin * per_row:end * per_row]
        written = lib.ggml_quantize_chunk(qtype, src.ctypes.data, dst.ctypes.data, 0,
                                          end - begin, n_per_row,
                                          None if weights is None else weights.ctypes.data)
        if written != dst.nbytes:
            raise QuantizeError(name, type_name, f"ggml wrote {written} bytes, not {dst.nbytes}")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(run, tasks))
    if not lib.ggml_validate_row_data(qtype, out.ctypes.data, out.nbytes):
        raise QuantizeError(name, type_name, "ggml found invalid values in the quantized rows "
                            "(NaN or inf in the weights?)")
    return out


def _same(rows: np.ndarray) -> np.ndarray:
    return rows


def split_rows(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(n_rows, n_per_row, rows_per_matrix)`` of a tensor of numpy ``shape``: the last axis is
    a row; a 3-D tensor holds one matrix per expert."""
    n_per_row = int(shape[-1]) if shape else 1
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    per_matrix = int(shape[-2]) if len(shape) >= 3 else n_rows
    return n_rows, n_per_row, per_matrix
