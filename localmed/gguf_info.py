"""What a GGUF file is: architecture, quant, size, template and localmed provenance.

Read with gguf-py's GGUFReader (memory-mapped: only the header is touched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmed.errors import GGUFFileError
from localmed.quants import quant_from_file_type

_PROVENANCE = "localmed."


@dataclass(frozen=True)
class GGUFInfo:
    """The facts about one GGUF file that chat, bench and ``localmed info`` show."""

    path: Path
    architecture: str
    name: str
    quant: str
    file_bytes: int
    n_parameters: int
    n_tensors: int
    context_length: int | None
    block_count: int | None
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def advisory(self) -> str:
        return str(self.provenance.get("advisory", ""))


def _value(fields: dict[str, Any], key: str) -> Any:
    fld = fields.get(key)
    if fld is None:
        return None
    try:
        return fld.contents()
    except (IndexError, ValueError):  # pragma: no cover - malformed field
        return None


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read a GGUF's metadata; anything that is not a readable GGUF raises GGUFFileError."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(path, "no such file")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise GGUFFileError(path, f"not a readable GGUF file ({exc})") from None
    fields = reader.fields
    arch = _value(fields, "general.architecture")
    if not arch:
        raise GGUFFileError(path, "not a model GGUF (no general.architecture)")
    tokens = _value(fields, "tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        idx = _value(fields, key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else ""

    file_type = _value(fields, "general.file_type")
    provenance: dict[str, Any] = {}
    for key in fields:
        if key.startswith(_PROVENANCE):
            value = _value(fields, key)
            if key.endswith("inputs_sha256") and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            provenance[key.removeprefix(_PROVENANCE)] = value
    quant = provenance.get("quant") or (
        quant_from_file_type(file_type) if isinstance(file_type, int) else "unknown")
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=_value(fields, "general.name") or path.stem,
        quant=str(quant),
        file_bytes=path.stat().st_size,
        n_parameters=sum(int(t.n_elements) for t in reader.tensors),
        n_tensors=len(reader.tensors),
        context_length=_value(fields, f"{arch}.context_length"),
        block_count=_value(fields, f"{arch}.block_count"),
        chat_template=_value(fields, "tokenizer.chat_template"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos=bool(_value(fields, "tokenizer.ggml.add_bos_token")),
        provenance=provenance,
    )
