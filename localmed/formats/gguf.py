"""What a GGUF file is: architecture, quant, size, template, provenance and memory footprint.

Read with :mod:`localmed.formats.gguf_header` (only the header is touched, big arrays are
skipped); keys are gguf-py's :class:`gguf.Keys`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from localmed import library
from localmed.errors import GGUFFileError
from localmed.formats.gguf_header import GGUFHeader, read_header
from localmed.formats.info import ModelInfo
from localmed.planner import ModelFootprint, footprint_from_tensors
from localmed.provenance import Provenance
from localmed.quants import quant_from_file_type


@dataclass(frozen=True)
class GGUFInfo(ModelInfo):
    """A GGUF file (``n_tensors`` from its tensor table)."""


MAX_LAYERS = 1024
"""More blocks than any released model has (Llama-3.1-405B: 126)."""

MAX_CONTEXT = 2**31 - 1
"""The longest training context llama.cpp can hold: ``llama_model_n_ctx_train`` is an int32, and
llama-cpp-python sizes its tokenizer's buffer by it (a larger value ends there, as a negative
array length)."""


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read a GGUF's metadata; anything that is not a readable GGUF raises GGUFFileError."""
    return _read_checked(path)[1]


def _read_checked(path: Path) -> tuple[GGUFHeader, GGUFInfo]:
    """Header and info of a GGUF whose header and hyperparameters passed every check."""
    header = read_header_checked(Path(path))
    info = info_from_header(header)
    check_hparams(header, info)
    return header, info


def check_hparams(header: GGUFHeader, info: GGUFInfo) -> None:
    """Hyperparameters in sane ranges and consistent with the tensors: a crafted file would
    otherwise size memory plans (and allocations) from them."""
    arch = info.architecture

    def bad(message: str) -> GGUFFileError:
        return GGUFFileError(header.path, f"damaged: {message}")

    blocks = {int(t.name.split(".")[1]) for t in header.tensors
              if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()}
    if not header.tensors:
        return  # a vocabulary-only GGUF
    count = info.block_count
    if not isinstance(count, int) or not 0 < count <= MAX_LAYERS:
        raise bad(f"{arch}.block_count is {count!r}")
    if blocks and (max(blocks) + 1 != count or len(blocks) != count):
        raise bad(f"{arch}.block_count is {count}, the file has tensors for "
                  f"{len(blocks)} blocks")
    for key in (Keys.LLM.EMBEDDING_LENGTH, Keys.Attention.HEAD_COUNT, Keys.LLM.CONTEXT_LENGTH):
        value = header.fields.get(key.format(arch=arch))
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise bad(f"{key.format(arch=arch)} is {value!r}")
    context = header.fields.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
    if isinstance(context, int) and context > MAX_CONTEXT:
        raise bad(f"{Keys.LLM.CONTEXT_LENGTH.format(arch=arch)} is {context:,}, more than the "
                  f"{MAX_CONTEXT:,} tokens llama.cpp can hold")


def read_header_checked(path: Path) -> GGUFHeader:
    path = Path(path)
    if path.is_dir():
        raise GGUFFileError(path, "is a folder, not a GGUF file")
    if not path.is_file():
        raise GGUFFileError(path, "no such file")
    header = read_header(path)
    number = header.fields.get(Keys.Split.LLM_KV_SPLIT_NO)
    if isinstance(number, int) and number > 0:
        raise GGUFFileError(path, f"part {number + 1} of a split GGUF: open its first part "
                            "(-00001-of-…)")
    if not isinstance(header.fields.get(Keys.General.ARCHITECTURE), str):
        raise GGUFFileError(path, "not a model GGUF (no general.architecture)")
    return _with_other_parts(header)


def _with_other_parts(header: GGUFHeader) -> GGUFHeader:
    """A split GGUF (llama.cpp's ``-00001-of-0000N.gguf``) as llama.cpp loads it from its first
    part: the tensors of every part, each part checked to be there and to belong."""
    count = header.fields.get(Keys.Split.LLM_KV_SPLIT_COUNT)
    if not isinstance(count, int) or count <= 1:
        return header
    parts = library.split_parts(header.path, count)
    if parts is None:  # (a later part was refused by read_header_checked)
        raise GGUFFileError(header.path, f"part of a GGUF split in {count}: open its first part "
                            "(-00001-of-…), named as llama.cpp names the parts")
    tensors = list(header.tensors)
    for number, part in enumerate(parts[1:], start=1):
        if not part.is_file():
            raise GGUFFileError(header.path, f"split in {count} parts, and {part.name} is "
                                "missing")
        other = read_header(part)
        if other.fields.get(Keys.Split.LLM_KV_SPLIT_NO) != number or \
                other.fields.get(Keys.Split.LLM_KV_SPLIT_COUNT) != count:
            raise GGUFFileError(part, f"is not part {number + 1} of {count} of {header.path.name}")
        tensors += other.tensors
    return dataclasses.replace(header, tensors=tensors)


def _manifest_provenance(path: Path) -> Provenance | None:
    """Where a GGUF localmed did not write came from (``localmed pull``'s manifest beside it)."""
    manifest = library.manifest_path(path)
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Provenance.from_manifest(record) if isinstance(record, dict) else None


def info_from_header(header: GGUFHeader) -> GGUFInfo:
    fields = header.fields
    arch = fields[Keys.General.ARCHITECTURE]
    tokens = header.tokens

    def token(key: str) -> str:
        idx = fields.get(key)
        if isinstance(idx, int) and 0 <= idx < len(tokens):
            return bytes(tokens[idx]).decode("utf-8", errors="replace")
        return ""

    provenance = Provenance.from_gguf(fields) or _manifest_provenance(header.path)
    file_type = fields.get(Keys.General.FILE_TYPE)
    quant = (provenance.quant if provenance else "") or (
        quant_from_file_type(file_type) if isinstance(file_type, int) else "unknown")
    template = fields.get(Keys.Tokenizer.CHAT_TEMPLATE)
    return GGUFInfo(
        path=header.path,
        format="gguf",
        architecture=arch,
        name=fields.get(Keys.General.NAME) or header.path.stem,
        quant=str(quant),
        file_bytes=sum(p.stat().st_size for p in library.gguf_files(header.path)),
        n_parameters=sum(t.n_elements for t in header.tensors),
        n_tensors=len(header.tensors),
        context_length=fields.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
        block_count=fields.get(Keys.LLM.BLOCK_COUNT.format(arch=arch)),
        chat_template=template if isinstance(template, str) else None,
        bos_token=token(Keys.Tokenizer.BOS_ID),
        eos_token=token(Keys.Tokenizer.EOS_ID),
        add_bos=bool(fields.get(Keys.Tokenizer.ADD_BOS)),
        provenance=provenance,
    )


def read_gguf_footprint(path: Path) -> tuple[GGUFInfo, ModelFootprint]:
    """A GGUF's metadata and what it needs in memory (header only; no weights read)."""
    header, info = _read_checked(path)
    arch = info.architecture

    def hparam(key: str) -> int | None:
        value = header.fields.get(key.format(arch=arch))
        return value if isinstance(value, int) else None

    n_embd = hparam(Keys.LLM.EMBEDDING_LENGTH)
    n_head = hparam(Keys.Attention.HEAD_COUNT)
    if n_embd is None or n_head is None:
        raise GGUFFileError(path, f"missing {arch}.embedding_length/head_count")
    n_head_kv = hparam(Keys.Attention.HEAD_COUNT_KV) or n_head
    if n_head_kv <= 0 or n_head % n_head_kv:
        raise GGUFFileError(path, f"damaged: {n_head} attention heads cannot share "
                            f"{n_head_kv} key/value heads")
    footprint = footprint_from_tensors(
        [(t.name, t.n_bytes) for t in header.tensors], n_layers=info.block_count or 0,
        n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        n_ctx_train=info.context_length or 2048, n_parameters=info.n_parameters,
        quant=info.quant, head_dim=hparam(Keys.Attention.KEY_LENGTH))
    return info, footprint
