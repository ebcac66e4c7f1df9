"""Safetensors files indexed from their headers alone: names, dtypes, shapes, byte ranges.

Each file is checked against its own size, so a truncated download is caught before anything is
read; each tensor is read on demand into a fresh array (bf16 widened to f32 with numpy, no torch).
Used by the converters and by the GPTQ format's memory footprint.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to f32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, dtype, shape and byte range of its data."""

    name: str
    path: Path
    dtype: str
    """safetensors dtype string (``BF16``, ``F32`` …)."""
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def read(self) -> np.ndarray:
        """The tensor as float32 (floating types) or its own integer type."""
        dtype = _DTYPES[self.dtype]
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = np.fromfile(fh, dtype=dtype, count=self.n_elements)
        if data.size != self.n_elements:
            raise CheckpointError(self.path, f"tensor {self.name} is truncated")
        if self.dtype == "BF16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        elif dtype.kind == "f" and dtype != np.float32:
            data = data.astype(np.float32)
        return data.reshape(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Index a .safetensors file from its header; a truncated or corrupt file raises."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(path, "not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(path, "not a safetensors file, or its header is truncated")
        try:
            header: dict[str, Any] = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(path, "corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    refs: dict[str, TensorRef] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt safetensors header entry for {name}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(path, f"tensor {name} has unsupported dtype {dtype}")
        if not all(_whole(v) for v in (*shape, begin, end)) or end < begin:
            raise CheckpointError(path, f"corrupt safetensors header entry for {name} "
                                  f"(shape {list(shape)}, offsets {begin}..{end})")
        ref = TensorRef(name, path, dtype, shape, base + begin, end - begin)
        if ref.nbytes != ref.n_elements * _DTYPES[dtype].itemsize:
            raise CheckpointError(path, f"tensor {name}: byte size does not match its shape")
        refs[name] = ref
        data_end = max(data_end, end)
    if base + data_end > size:
        raise CheckpointError(
            path, f"truncated: the header promises {base + data_end:,} bytes, the file has "
            f"{size:,} (an interrupted download? fetch it again)")
    return refs


def _whole(value: object) -> bool:
    """A non-negative integer (not a bool): what shapes and offsets must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
