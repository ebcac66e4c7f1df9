"""Write a planned model to one GGUF file with gguf-py, streaming tensor by tensor.

GGUFWriter's explicit states are followed: every tensor's info is declared first (shapes come from
the plan, no data is read), then header, key/values and tensor infos are written, then each
tensor's data is loaded, converted and appended, and dropped before the next.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import gguf
import numpy as np

from localmed.quantize.families import ConverterFamily, PlannedTensor

Progress = Callable[[int], None]


def tensor_type(planned: PlannedTensor, target: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type a tensor is stored as in a file whose main type is ``target``."""
    if planned.keep_f32 or len(planned.shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    if target not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        block, _ = gguf.GGML_QUANT_SIZES[target]
        if planned.shape[-1] % block:
            # Rows that do not fill whole blocks cannot be quantized; llama.cpp falls back too.
            return gguf.GGMLQuantizationType.F16
    return target


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 data in the file's representation (F32/F16 arrays, or quantized bytes)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


@dataclass
class _Streamed:
    """What GGUFWriter.write_tensor_data needs of an array (``nbytes``, ``tofile``), with the
    data produced part by part while it is written."""

    planned: PlannedTensor
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    progress: Progress | None
    skeleton: bool = False

    def tofile(self, fout: IO[bytes]) -> None:
        if self.skeleton:
            # A hole, not zeros: the file has its full size and costs no disk for its data.
            fout.seek(self.nbytes - 1, io.SEEK_CUR)
            fout.write(b"\0")
            return
        row_bytes = self.nbytes // len(self.planned.parts)
        for load in self.planned.parts:
            encoded = encode(load(), self.qtype)
            if encoded.nbytes != row_bytes:
                raise ValueError(f"{self.planned.name}: expected {row_bytes} bytes, "
                                 f"got {encoded.nbytes}")
            encoded.tofile(fout)
            if self.progress is not None:
                self.progress(encoded.nbytes)


def planned_bytes(plan: Sequence[PlannedTensor], target: gguf.GGMLQuantizationType) -> int:
    return sum(_nbytes(p.shape, tensor_type(p, target)) for p in plan)


def write_gguf(
    path: Path,
    family: ConverterFamily,
    plan: Sequence[PlannedTensor],
    target: gguf.GGMLQuantizationType,
    file_type: int,
    metadata: Callable[[gguf.GGUFWriter], None],
    progress: Progress | None = None,
    *,
    skeleton: bool = False,
) -> None:
    """Write ``plan`` to ``path``; ``metadata`` adds the vocab, template and provenance keys.

    ``skeleton``: every header byte as it would be, and no tensor data: the data region is a
    sparse hole that reads as zeros (what llama.cpp's quantizer needs to plan the output file).
    """
    writer = gguf.GGUFWriter(path, family.arch_name)
    try:
        family.set_gguf_parameters(writer)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        metadata(writer)
        streamed: list[_Streamed] = []
        for planned in plan:
            qtype = tensor_type(planned, target)
            nbytes = _nbytes(planned.shape, qtype)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(planned.name, planned.shape, np.dtype(dtype), nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(planned.shape, qtype)
                writer.add_tensor_info(planned.name, byte_shape, np.dtype(np.uint8), nbytes,
                                       raw_dtype=qtype)
            streamed.append(_Streamed(planned, qtype, nbytes, progress, skeleton))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in streamed:
            writer.write_tensor_data(item)  # type: ignore[arg-type]  # duck-typed array
    finally:
        writer.close()


def copy_with_metadata(src: Path, dst: Path, strings: Mapping[str, str],
                       progress: Progress | None = None) -> None:
    """Copy GGUF ``src`` to ``dst`` with string keys replaced where they are, or added after the
    others; every other key, tensor info and tensor byte as it was (gguf-py's GGUFReader into
    its GGUFWriter, as its ``gguf_new_metadata`` script copies). ``progress`` gets the bytes
    written so far, and the file's size when it is complete."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            # GGUF.* are the reader's own (version, counts); the writer adds the architecture.
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if field.name in strings:
                writer.add_key_value(field.name, strings[field.name], gguf.GGUFValueType.STRING)
                continue
            kind = field.types[0]
            sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
        for key, value in strings.items():
            if key not in reader.fields:
                writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                                   tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
            done += int(tensor.n_bytes)
            if progress is not None:
                progress(done)
    finally:
        writer.close()
    if progress is not None:
        progress(dst.stat().st_size)
