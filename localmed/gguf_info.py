"""What a GGUF file is: architecture, quant, size, template and localmed provenance.

Read with :mod:`localmed.gguf_header` (only the header is touched, big arrays are skipped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmed.errors import GGUFFileError
from localmed.gguf_header import GGUFHeader, read_header
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


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read a GGUF's metadata; anything that is not a readable GGUF raises GGUFFileError."""
    return info_from_header(read_header_checked(path))


def read_header_checked(path: Path) -> GGUFHeader:
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(path, "no such file")
    header = read_header(path)
    if not isinstance(header.fields.get("general.architecture"), str):
        raise GGUFFileError(path, "not a model GGUF (no general.architecture)")
    return header


def info_from_header(header: GGUFHeader) -> GGUFInfo:
    fields = header.fields
    arch = fields["general.architecture"]
    tokens = header.tokens

    def token(key: str) -> str:
        idx = fields.get(key)
        if isinstance(idx, int) and 0 <= idx < len(tokens):
            return bytes(tokens[idx]).decode("utf-8", errors="replace")
        return ""

    provenance: dict[str, Any] = {}
    for key, value in fields.items():
        if key.startswith(_PROVENANCE) and not isinstance(value, tuple):
            if key.endswith("inputs_sha256") and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            provenance[key.removeprefix(_PROVENANCE)] = value
    file_type = fields.get("general.file_type")
    quant = provenance.get("quant") or (
        quant_from_file_type(file_type) if isinstance(file_type, int) else "unknown")
    template = fields.get("tokenizer.chat_template")
    return GGUFInfo(
        path=header.path,
        architecture=arch,
        name=fields.get("general.name") or header.path.stem,
        quant=str(quant),
        file_bytes=header.path.stat().st_size,
        n_parameters=sum(t.n_elements for t in header.tensors),
        n_tensors=len(header.tensors),
        context_length=fields.get(f"{arch}.context_length"),
        block_count=fields.get(f"{arch}.block_count"),
        chat_template=template if isinstance(template, str) else None,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token")),
        provenance=provenance,
    )
