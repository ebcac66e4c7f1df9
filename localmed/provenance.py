"""Provenance: where a model file came from. One definition for GGUF metadata and manifests.

A GGUF carries it as ``localmed.*`` string keys; the sidecar ``<name>.<QUANT>.manifest.json`` and
a GPTQ folder's ``localmed.manifest.json`` carry the same fields, unprefixed, beside facts about
the file itself. The checkpoint files a conversion reads (and so hashes) are listed here once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from localmed import __version__

GGUF_PREFIX = "localmed."
"""Namespace of localmed's keys in GGUF metadata."""

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Tokenizer and chat-template files of a Hugging Face checkpoint (copied into GPTQ folders)."""

CHECKPOINT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                    *TOKENIZER_FILES)
"""Every non-weight file a conversion may read: each one present is hashed into provenance
(``preprocessor_config.json``: an image-text model's image size and normalization, which
llama.cpp's converter writes into the projector)."""

_JSON_FIELDS = ("inputs_sha256", "calibration")
"""Fields that are mappings, stored in GGUF metadata as JSON strings."""


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def now() -> str:
    """A creation time: UTC, to the second; ``SOURCE_DATE_EPOCH`` when set (the reproducible-builds
    convention: the demo model's build script fixes it, so its GGUF is the same bytes)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch.isdigit() else \
        dt.datetime.now(dt.timezone.utc)
    return when.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    """What a localmed-made model file records about its making."""

    source: str
    """Hub repo id, or the local folder as given."""
    revision: str
    """Hub commit, or ``local``."""
    quant: str
    model_id: str = ""
    """Registry id, when the source is a registry model."""
    advisory: str = ""
    """The model's own advisory, shown under the disclaimer."""
    inputs_sha256: Mapping[str, str] = field(default_factory=dict)
    """sha256 of every file read: weights, config and tokenizer files."""
    created: str = field(default_factory=now)
    version: str = __version__
    """localmed version that wrote the file."""
    imatrix_file: str = ""
    """The importance matrix the quantizer used (file name), if any."""
    imatrix_sha256: str = ""
    converter: str = "localmed"
    """Which converter made the GGUF: ``localmed`` (its streaming converter) or llama.cpp's."""
    calibration: Mapping[str, Any] | None = None
    """Calibration text behind the quantization (file, sha256, texts), when one was used."""

    def with_quant(self, quant: str) -> Provenance:
        return type(self)(**{**self._as_dict(), "quant": quant})

    def _as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # --- GGUF metadata ----------------------------------------------------------------------------

    def to_gguf(self) -> dict[str, str]:
        """``localmed.*`` string keys for a GGUF's metadata."""
        out: dict[str, str] = {}
        for name, value in self._as_dict().items():
            if name in _JSON_FIELDS:
                if value is None:
                    continue
                value = json.dumps(dict(value), sort_keys=True)
            out[gguf_key(name)] = str(value)
        return out

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Provenance | None:
        """Read the ``localmed.*`` keys back; None for a GGUF localmed did not write."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = metadata.get(gguf_key(f.name))
            if not isinstance(value, str):
                continue
            if f.name in _JSON_FIELDS:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    continue
            values[f.name] = value
        if "source" not in values:
            return None
        values.setdefault("revision", "")
        values.setdefault("quant", "")
        return cls(**values)

    # --- manifests --------------------------------------------------------------------------------

    def to_manifest(self) -> dict[str, Any]:
        """The same fields, unprefixed, for a JSON manifest."""
        record = asdict(self)
        if record["calibration"] is None:
            del record["calibration"]
        return record

    @classmethod
    def from_manifest(cls, record: Mapping[str, Any]) -> Provenance | None:
        """Provenance from a manifest (extra keys ignored); None when it has none."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        if not isinstance(values.get("source"), str):
            return None
        values.setdefault("revision", "")
        values.setdefault("quant", "")
        return cls(**values)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for people: info screens and ``localmed info``."""
        rows = [(name, str(value)) for name, value in self._as_dict().items()
                if name not in (*_JSON_FIELDS, "quant") and value not in ("", None)]
        rows += [(f"sha256 {name}", digest) for name, digest in self.inputs_sha256.items()]
        if self.calibration:
            rows.append(("calibration", ", ".join(f"{k} {v}" for k, v in
                                                  self.calibration.items())))
        return rows


def gguf_key(name: str) -> str:
    """The GGUF metadata key of a provenance field."""
    return GGUF_PREFIX + name
