"""GGUF files rewritten by gguf-py's GGUFWriter for the tests: split into parts, or with
metadata changed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import gguf


def rewrite_gguf(source: Path, path: Path, *, parts: int = 1,
                 strings: Mapping[str, str] | None = None) -> list[Path]:
    """``source`` written again: as ``parts`` split files (llama.cpp's format: ``split.*`` keys,
    ``-0000k-of-0000N.gguf`` names) when ``parts`` > 1, with the string keys ``strings`` set."""
    strings = dict(strings or {})
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(path, arch=arch, split_max_tensors=math.ceil(
        len(reader.tensors) / parts) if parts > 1 else 0)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or \
                field.name.startswith(("GGUF.", "split.")) or field.name in strings:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    for key, value in strings.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if parts > 1:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return [path]
