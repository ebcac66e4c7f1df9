"""A fast reader of GGUF headers: key/values and tensor infos, no tensor data.

gguf-py's GGUFReader builds a numpy view of every array element, which takes seconds for a
32k-token vocabulary and far longer for Llama-3's 128k tokens and 280k merges; chat and bench open
GGUFs often. This walks the same format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
with ``struct`` over a memory map and skips the arrays nobody asked for. Tensor sizes come from
gguf-py's ``GGML_QUANT_SIZES`` table.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from localmed.errors import GGUFFileError

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
KEEP_ARRAYS = frozenset({Keys.Tokenizer.LIST})
"""String arrays kept (as lazily decoded token texts); every other array is skipped."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    """GGUF order: fastest-varying dimension first."""
    type: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFHeader:
    path: Path
    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    """Scalars and strings; skipped arrays appear as ``("array", type, count)``."""
    tensors: list[TensorEntry] = field(default_factory=list)
    tokens: list[bytes] = field(default_factory=list)


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFileError(self.path, "truncated GGUF header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def raw_string(self) -> bytes:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFileError(self.path, "truncated GGUF header")
        data = self.buf[self.pos: self.pos + n]
        self.pos += n
        return data

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str, header: GGUFHeader) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype != GGUFValueType.ARRAY:
            raise GGUFFileError(self.path, f"unknown value type {vtype} for {key}")
        etype, count = self.unpack("<I"), self.unpack("<Q")
        if etype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[etype]) * count
            if self.pos > len(self.buf):
                raise GGUFFileError(self.path, "truncated GGUF header")
            return ("array", etype, count)
        if etype == GGUFValueType.STRING:
            if count * 8 > len(self.buf) - self.pos:
                raise GGUFFileError(self.path, f"damaged: {key} claims {count:,} strings")
            keep = key in KEEP_ARRAYS
            for _ in range(count):
                n = self.unpack("<Q")
                if keep:
                    header.tokens.append(self.buf[self.pos: self.pos + n])
                self.pos += n
            return ("array", etype, count)
        raise GGUFFileError(self.path, f"unsupported array of type {etype} for {key}")


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of a GGUF file; anything else raises GGUFFileError."""
    path = Path(path)
    try:
        with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path)
    except (OSError, ValueError) as exc:
        if isinstance(exc, GGUFFileError):
            raise
        raise GGUFFileError(path, f"cannot read: {exc}") from None


SUPPORTED_VERSIONS = (2, 3)
"""GGUF versions the pinned llama.cpp reads."""
_MIN_KV_BYTES = 8 + 4 + 1
"""The smallest key/value: key length, value type, a one-byte value."""
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
"""The smallest tensor info: name length, dimension count, type, offset."""
_MAX_DIMS = 4


def _parse(buf: mmap.mmap, path: Path) -> GGUFHeader:
    """Parse and check the header against the file: a damaged or crafted file raises
    GGUFFileError before any count or size in it is trusted for an allocation."""
    if buf[:4] != b"GGUF":
        raise GGUFFileError(path, "not a GGUF file (bad magic)")
    if len(buf) < 24:
        raise GGUFFileError(path, f"truncated GGUF header ({len(buf)} bytes)")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFileError(path, f"GGUF version {version} is not one llama.cpp reads "
                            f"({', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > len(buf):
        raise GGUFFileError(path, f"damaged: the header claims {n_kv:,} keys and {n_tensors:,} "
                            f"tensors, more than a {len(buf):,}-byte file can hold")
    header = GGUFHeader(path, version)
    for _ in range(n_kv):
        key = cur.string()
        header.fields[key] = cur.value(cur.unpack("<I"), key, header)
    offsets: list[int] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFFileError(path, f"damaged: tensor {name} has {n_dims} dimensions")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        ttype = cur.unpack("<I")
        offsets.append(cur.unpack("<Q"))
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise GGUFFileError(path, f"tensor {name} has unknown type {ttype}") from None
        n = 1
        for d in shape:
            n *= d
        if n == 0 or shape[0] % block:
            raise GGUFFileError(path, f"damaged: tensor {name} has shape {list(shape)}")
        header.tensors.append(TensorEntry(name, shape, ttype, n // block * size))
    alignment = header.fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFileError(path, f"damaged: general.alignment is {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    for tensor, offset in zip(header.tensors, offsets, strict=True):
        if data_start + offset + tensor.n_bytes > len(buf):
            raise GGUFFileError(path, f"damaged or truncated: tensor {tensor.name}'s data ends "
                                f"at byte {data_start + offset + tensor.n_bytes:,}, the file "
                                f"has {len(buf):,} (an interrupted copy or download?)")
    return header
