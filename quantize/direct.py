"""Quantize a checkpoint straight into its final GGUF, with no full-size F16/BF16 file on disk.

llama.cpp's quantizer decides every tensor's type from names, shapes, the quant mix and whether
an importance matrix is given, never from the values. So it runs on a *skeleton*: the
intermediate file's exact header over a sparse data region (holes that read as zeros and take no
disk). What it writes is the final file, with every header byte llama.cpp chooses (types,
offsets, its metadata) and zero-quantized data. Then each tensor streams from the checkpoint,
rounded to the intermediate type exactly as the intermediate file would hold it, widened to
float32 as llama.cpp widens it, quantized by ggml's own row quantizers with the same matrix rows,
and written over its zeros in place. The result is byte-identical to ``llama_model_quantize`` on
the intermediate file (tests/test_direct_quant.py); the extra disk is the output itself.

It applies where localmed's own converter plans the tensors (the llama.cpp converter path writes
its intermediate file itself) and needs a filesystem with sparse files for the skeleton to be
free (on FAT/exFAT it costs as much as the old intermediate; the result is the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from localmed.errors import QuantizeError
from localmed.quantize.families import PlannedTensor
from localmed.quantize.ggml_rows import quantize_rows, split_rows
from localmed.quantize.gguf_out import encode, tensor_type
from localmed.quantize.imatrix import ImportanceMatrix

Progress = Callable[[int], None]


@dataclass(frozen=True)
class _Slot:
    """Where a tensor's data lives in the output file, and as what type."""

    qtype: gguf.GGMLQuantizationType
    offset: int
    nbytes: int


def _slots(path: Path) -> dict[str, _Slot]:
    reader = gguf.GGUFReader(path)
    slots = {t.name: _Slot(gguf.GGMLQuantizationType(t.tensor_type), int(t.data_offset),
                           int(t.n_bytes)) for t in reader.tensors}
    del reader  # its memmap, before the file is written through another handle
    return slots


def widen(stored: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The float32 values llama.cpp reads from an F32/F16/BF16 tensor."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return stored
    if qtype == gguf.GGMLQuantizationType.F16:
        return stored.astype(np.float32)
    return gguf.quants.dequantize(stored, qtype)


def _stored_parts(plan: Sequence[PlannedTensor], intermediate: gguf.GGMLQuantizationType
                  ) -> Iterator[tuple[PlannedTensor, int, np.ndarray]]:
    """Every tensor part as the intermediate file would store it. The next part is read and
    rounded on another thread while the caller quantizes this one."""
    parts = [(planned, index) for planned in plan for index in range(len(planned.parts))]

    def read(item: tuple[PlannedTensor, int]) -> np.ndarray:
        planned, index = item
        return encode(planned.parts[index](), tensor_type(planned, intermediate))

    with ThreadPoolExecutor(1, thread_name_prefix="localmed-read") as reader:
        pending = reader.submit(read, parts[0]) if parts else None
        for position, (planned, index) in enumerate(parts):
            assert pending is not None
            stored = pending.result()
            pending = reader.submit(read, parts[position + 1]) \
                if position + 1 < len(parts) else None
            yield planned, index, stored


def fill_tensors(path: Path, plan: Sequence[PlannedTensor],
                 intermediate: gguf.GGMLQuantizationType, *,
                 matrix: ImportanceMatrix | None = None, threads: int = 1,
                 progress: Progress | None = None) -> None:
    """Write every planned tensor's data into ``path``, a file llama.cpp quantized from the
    skeleton of ``plan`` as ``intermediate``; each tensor is read, converted and dropped."""
    slots = _slots(path)
    missing = [p.name for p in plan if p.name not in slots]
    if missing:
        raise QuantizeError(path, "direct", f"llama.cpp's file has no tensor {missing[0]}")
    with path.open("r+b") as out:
        written: dict[str, int] = {}
        for planned, index, stored in _stored_parts(plan, intermediate):
            slot = slots[planned.name]
            stored_as = tensor_type(planned, intermediate)
            if slot.qtype == stored_as:
                data = stored.reshape(-1).view(np.uint8)
            else:
                n_rows, _, per_matrix = split_rows(planned.shape)
                part_rows = n_rows // len(planned.parts)
                weights = matrix.values(planned.name) \
                    if matrix is not None and planned.name in matrix.sums else None
                data = quantize_rows(planned.name, stored.reshape(part_rows, -1),
                                     int(slot.qtype), imatrix=weights,
                                     rows_per_matrix=per_matrix, first_row=index * part_rows,
                                     threads=threads,
                                     widen=lambda chunk, t=stored_as: widen(chunk, t))
            done = written.get(planned.name, 0)
            out.seek(slot.offset + done)
            out.write(memoryview(data))
            written[planned.name] = done + data.nbytes
            if progress is not None:
                progress(data.nbytes)
    for planned in plan:
        slot = slots[planned.name]
        if written.get(planned.name) != slot.nbytes:
            raise QuantizeError(path, slot.qtype.name, f"{planned.name}: wrote "
                                f"{written.get(planned.name)} bytes where llama.cpp's file "
                                f"holds {slot.nbytes}")
