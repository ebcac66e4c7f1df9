"""Importance matrices in llama.cpp's GGUF imatrix format, and their use by the quantizer.

The format is llama-imatrix's: ``general.type = imatrix``; per weight tensor ``<name>.in_sum2``
(the sum of squared input activations of each input column, per expert for MoE tensors) and
``<name>.counts`` (the tokens each expert saw), both F32; ``imatrix.datasets``,
``imatrix.chunk_count`` and ``imatrix.chunk_size``. llama.cpp's own ``llama-quantize --imatrix``
reads the files written here, and localmed reads its files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from localmed.errors import ImatrixError

IN_SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    """Sums of squared activations per input column, and token counts, per weight tensor."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    """Tensor name → float32 ``[n_experts * n_columns]`` (``n_experts`` is 1 for dense)."""
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    """Tensor name → float32 ``[n_experts]``: tokens that reached each expert."""
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self, name: str) -> np.ndarray:
        """What llama-quantize hands the quantizer: each expert's sums over its token count
        (1 where an expert saw no token)."""
        sums, counts = self.sums[name], self.counts[name]
        per = sums.reshape(len(counts), -1)
        out = np.ones_like(per)
        seen = counts > 0
        out[seen] = per[seen] / counts[seen, None]
        return out.reshape(-1).astype(np.float32)

    def partial(self) -> list[str]:
        """Tensors with an expert that saw no token (reported, as llama-imatrix does)."""
        return sorted(n for n, c in self.counts.items() if (c == 0).any())


def write_imatrix(path: Path, matrix: ImportanceMatrix) -> None:
    writer = gguf.GGUFWriter(path, arch="", endianess=gguf.GGUFEndian.LITTLE)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(matrix.datasets))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, matrix.chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, matrix.chunk_size)
    for name in sorted(matrix.sums):
        writer.add_tensor(name + IN_SUM2, matrix.sums[name].astype(np.float32))
        writer.add_tensor(name + COUNTS, matrix.counts[name].astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> ImportanceMatrix:
    """Read an imatrix GGUF; anything else raises ImatrixError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(path, "no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ImatrixError(path, f"not a GGUF imatrix file ({exc})") from None
    kind = reader.fields.get(gguf.Keys.General.TYPE)
    if kind is None or kind.contents() != gguf.GGUFType.IMATRIX:
        raise ImatrixError(path, "not an importance matrix (general.type is not 'imatrix')")

    def scalar(key: str) -> int:
        found = reader.fields.get(key)
        return int(found.contents()) if found is not None else 0

    datasets = reader.fields.get(gguf.Keys.IMatrix.DATASETS)
    matrix = ImportanceMatrix(datasets=list(datasets.contents()) if datasets else [],
                              chunk_count=scalar(gguf.Keys.IMatrix.CHUNK_COUNT),
                              chunk_size=scalar(gguf.Keys.IMatrix.CHUNK_SIZE))
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(path, f"{tensor.name} is not F32")
        data = np.array(tensor.data, dtype=np.float32).reshape(-1)
        if tensor.name.endswith(IN_SUM2):
            matrix.sums[tensor.name.removesuffix(IN_SUM2)] = data
        elif tensor.name.endswith(COUNTS):
            matrix.counts[tensor.name.removesuffix(COUNTS)] = data
    unpaired = sorted(set(matrix.sums) ^ set(matrix.counts))
    if unpaired:
        raise ImatrixError(path, f"{unpaired[0]} has sums without counts or counts without sums")
    if not matrix.sums:
        raise ImatrixError(path, "holds no tensor data")
    for name, sums in matrix.sums.items():
        if len(matrix.counts[name]) == 0 or sums.size % len(matrix.counts[name]):
            raise ImatrixError(path, f"{name}: {sums.size} sums do not split into "
                               f"{len(matrix.counts[name])} experts")
    return matrix


def check_matches(matrix: ImportanceMatrix, shapes: Mapping[str, Sequence[int]],
                  source: Path, model: str) -> None:
    """Refuse, before quantizing, an imatrix made for another model: every tensor it names must
    be a weight of this model (GGUF names and shapes, fastest dimension first), with as many
    columns (times experts) as it has values."""
    for name, sums in matrix.sums.items():
        shape = shapes.get(name)
        if shape is None:
            raise ImatrixError(source, f"tensor {name} is not in {model}: this importance "
                               "matrix was made for another model")
        columns = shape[0]
        experts = shape[2] if len(shape) > 2 else 1
        if sums.size != columns * experts or len(matrix.counts[name]) != experts:
            raise ImatrixError(source, f"tensor {name}: {sums.size} values for {experts} x "
                               f"{columns} columns in {model}: this importance matrix was "
                               "made for another model")


@dataclass
class CImatrix:
    """The matrix as llama.cpp's ``llama_model_imatrix_data`` array (null-terminated); the
    buffers live as long as this object."""

    array: object
    _keep: Sequence[object]


def to_llama(matrix: ImportanceMatrix, names: Mapping[str, bool] | None = None) -> CImatrix:
    import ctypes

    import llama_cpp

    entries = sorted(matrix.sums) if names is None else sorted(n for n in matrix.sums
                                                               if names.get(n))
    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    keep: list[object] = []
    for slot, name in zip(array, entries, strict=False):
        values = np.ascontiguousarray(matrix.values(name))
        encoded = name.encode("utf-8")
        keep += [values, encoded]
        slot.name = encoded
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    return CImatrix(array, keep)
