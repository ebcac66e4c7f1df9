"""The model registry: ``models.toml`` read into frozen dataclasses.

This is the only module that parses a models.toml. The built-in file ships with the package; the
user's file (:func:`localmed.paths.user_registry_path`) adds entries, or overrides single fields of
built-in ones. Every error names the file, the entry and the field.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from localmed import paths
from localmed.errors import DataFileError, RegistryError, UnknownModelError
from localmed.planner import ModelShape
from localmed.quants import QUANT_TYPES, get_quant
from localmed.templates import TEMPLATES
from localmed.textfile import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ModelEntry:
    """One model localmed knows by a short id (``internist-7b``)."""

    id: str
    name: str
    """Human-readable name."""
    repo: str
    """Hugging Face hub repository id."""
    architecture: str
    """Hugging Face architecture class (``MistralForCausalLM``)."""
    parameters_b: float
    """Parameter count, in billions."""
    context_length: int
    """Context length the model was trained for, in tokens."""
    template: str
    """Default prompt template (a name from :mod:`localmed.templates`); "" for an embedding
    model."""
    license: str
    gated: bool
    """Whether the hub repo asks users to accept terms before downloading."""
    default_quant: str
    """Quant that ``chat`` uses when none is named."""
    advisory: str
    """The model's own advisory text, short, from its card; shown under the disclaimer."""
    scores: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Accuracies (%) the model card publishes, by suite (``medqa``)."""
    source: Path = Path()
    """The models.toml the entry (or its last override) came from."""
    gguf_repos: tuple[str, ...] = ()
    """Hub repositories of ready-made GGUFs of it (``localmed pull ID``); empty where none is
    confirmed."""
    shape: Mapping[str, int | bool] = field(default_factory=lambda: MappingProxyType({}))
    """From the model's config.json, for `plan` before download: ``layers``, ``kv_heads``,
    ``head_dim``, optionally ``hidden_size``, ``vocab_size``, ``tied_embeddings``; empty where
    not confirmed."""
    kind: str = "chat"
    """``chat`` (it answers) or ``embedding`` (it turns passages into vectors for ``localmed
    docs``)."""
    query_prefix: str = ""
    """An embedding model's text before a query, as its model card asks (nomic:
    ``search_query: ``)."""
    document_prefix: str = ""
    """An embedding model's text before a passage (nomic: ``search_document: ``)."""
    query_encoder: str = ""
    """The registry id of the model that embeds queries for this one (MedCPT's article
    encoder is searched with its query encoder); "": this model itself."""
    pooling: str = ""
    """An embedding model's pooling (``mean``, ``cls``, ``last``) where its GGUF declares none
    (a checkpoint without sentence-transformers' files: MedCPT); "": the GGUF's."""

    def model_shape(self) -> ModelShape | None:
        """The shape to estimate a GGUF of it from, if the entry gives one."""
        if not self.shape:
            return None
        return ModelShape(int(self.parameters_b * 1e9), context_length=self.context_length,
                          **self.shape)  # type: ignore[arg-type]


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "repo": str,
    "architecture": str,
    "parameters_b": (int, float),
    "context_length": int,
    "template": str,
    "license": str,
    "gated": bool,
    "default_quant": str,
    "advisory": str,
}
_OPTIONAL = {"scores", "shape", "gguf_repos", "kind", "query_prefix", "document_prefix",
             "query_encoder", "pooling"}
KINDS = ("chat", "embedding")
POOLINGS = ("mean", "cls", "last")
_EMBEDDING_ONLY = ("query_prefix", "document_prefix", "query_encoder", "pooling")
_SHAPE_REQUIRED = ("layers", "kv_heads", "head_dim")
_SHAPE_OPTIONAL = ("hidden_size", "vocab_size")
_KIND_WORDS: dict[object, str] = {str: "a string", int: "an integer", bool: "true or false"}


def builtin_registry_path() -> Path:
    """The models.toml shipped with localmed (inside the wheel, or at the source tree's root)."""
    packaged = Path(__file__).with_name("models.toml")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "models.toml"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(path, f"invalid TOML: {exc}") from None
    except DataFileError as exc:
        raise RegistryError(path, exc.message.removeprefix(f"{path}: ")) from None
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise RegistryError(path, "[models] must be a table of entries")
    for model_id, raw in models.items():
        if not isinstance(raw, dict):
            raise RegistryError(path, "must be a table", entry=model_id)
    return models


def _entry(model_id: str, raw: Mapping[str, Any], path: Path) -> ModelEntry:
    model_kind = raw.get("kind", "chat")
    if model_kind not in KINDS:
        raise RegistryError(path, f"must be one of {', '.join(KINDS)}, got {model_kind!r}",
                            entry=model_id, field="kind")
    for name in _EMBEDDING_ONLY:
        if name in raw and (model_kind != "embedding" or not isinstance(raw[name], str)):
            why = "must be a string" if model_kind == "embedding" else \
                "is for embedding models only (kind = \"embedding\")"
            raise RegistryError(path, why, entry=model_id, field=name)
    if raw.get("pooling", "mean") not in POOLINGS:
        raise RegistryError(path, f"must be one of {', '.join(POOLINGS)}", entry=model_id,
                            field="pooling")
    if model_kind == "embedding":
        raw = {"template": "", **raw}
    for name, kind in _FIELDS.items():
        if name not in raw:
            raise RegistryError(path, "missing", entry=model_id, field=name)
        value = raw[name]
        # bool is an int in Python; a count given as true/false is still a mistake.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = _KIND_WORDS.get(kind, "a number")
            raise RegistryError(path, f"must be {expected}, got {value!r}",
                                entry=model_id, field=name)
    unknown = set(raw) - set(_FIELDS) - _OPTIONAL
    if unknown:
        raise RegistryError(path, f"unknown field(s): {', '.join(sorted(unknown))}",
                            entry=model_id, field=sorted(unknown)[0])
    if model_kind == "embedding" and raw["template"]:
        raise RegistryError(path, "an embedding model has no prompt template",
                            entry=model_id, field="template")
    if model_kind == "chat" and raw["template"] not in TEMPLATES:
        raise RegistryError(path, f"unknown template '{raw['template']}'; valid: "
                            f"{', '.join(TEMPLATES)}", entry=model_id, field="template")
    if raw["default_quant"].upper() not in QUANT_TYPES:
        raise RegistryError(path, f"unknown quant '{raw['default_quant']}'",
                            entry=model_id, field="default_quant")
    if raw["context_length"] <= 0 or not 0 < raw["parameters_b"] < math.inf:
        bad = "context_length" if raw["context_length"] <= 0 else "parameters_b"
        raise RegistryError(path, "must be a positive number", entry=model_id, field=bad)
    default = QUANT_TYPES[raw["default_quant"].upper()]
    if default.needs_imatrix or default.ternary_only:
        why = "it needs an importance matrix" if default.needs_imatrix else \
            "it is for ternary (BitNet) models only"
        raise RegistryError(path, f"{default.name} cannot be the default: {why}",
                            entry=model_id, field="default_quant")
    scores = raw.get("scores", {})
    if not isinstance(scores, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
    ):
        raise RegistryError(path, "must be a table of suite = accuracy (%)",
                            entry=model_id, field="scores")
    repos = raw.get("gguf_repos", [])
    if not isinstance(repos, list) or not all(
            isinstance(r, str) and r.count("/") == 1 and all(r.split("/")) for r in repos):
        raise RegistryError(path, "must be a list of hub repositories (\"owner/name\")",
                            entry=model_id, field="gguf_repos")
    shape = raw.get("shape", {})
    if shape:
        keys = set(shape) if isinstance(shape, dict) else set()
        known = {*_SHAPE_REQUIRED, *_SHAPE_OPTIONAL, "tied_embeddings"}
        counts_ok = isinstance(shape, dict) and all(
            isinstance(shape[k], int) and not isinstance(shape[k], bool) and shape[k] > 0
            for k in (keys & known) - {"tied_embeddings"})
        if not isinstance(shape, dict) or keys - known or not set(_SHAPE_REQUIRED) <= keys \
                or not counts_ok or not isinstance(shape.get("tied_embeddings", False), bool):
            raise RegistryError(path, f"must be a table with {', '.join(_SHAPE_REQUIRED)} "
                                f"(and optionally {', '.join(_SHAPE_OPTIONAL)}) as positive "
                                "integers, and tied_embeddings as true or false",
                                entry=model_id, field="shape")
    return ModelEntry(
        id=model_id,
        name=raw["name"],
        repo=raw["repo"],
        architecture=raw["architecture"],
        parameters_b=float(raw["parameters_b"]),
        context_length=raw["context_length"],
        template=raw["template"],
        license=raw["license"],
        gated=raw["gated"],
        default_quant=get_quant(raw["default_quant"]).name,
        advisory=raw["advisory"].strip(),
        scores=MappingProxyType({k: float(v) for k, v in scores.items()}),
        source=path,
        shape=MappingProxyType(dict(shape)),
        gguf_repos=tuple(repos),
        kind=model_kind,
        query_prefix=raw.get("query_prefix", ""),
        document_prefix=raw.get("document_prefix", ""),
        query_encoder=raw.get("query_encoder", ""),
        pooling=raw.get("pooling", ""),
    )


class Registry(Mapping[str, ModelEntry]):
    """Model entries by id, built-in ones first, then the user's additions and overrides."""

    def __init__(self, entries: Mapping[str, ModelEntry], files: tuple[Path, ...]) -> None:
        self._entries = dict(entries)
        self.files = files
        """The models.toml files read, in order."""

    @classmethod
    def load(cls, builtin: Path | None = None, user: Path | None = None) -> Registry:
        """Read the built-in registry, then the user's file if it exists."""
        builtin = builtin or builtin_registry_path()
        user = user if user is not None else paths.user_registry_path()
        merged: dict[str, tuple[dict[str, Any], Path]] = {
            model_id: (dict(raw), builtin) for model_id, raw in _read_toml(builtin).items()
        }
        files = [builtin]
        if user.is_file():
            files.append(user)
            for model_id, raw in _read_toml(user).items():
                base = merged.get(model_id, ({}, user))[0]
                merged[model_id] = ({**base, **raw}, user)
        entries = {model_id: _entry(model_id, raw, path)
                   for model_id, (raw, path) in merged.items()}
        for entry in entries.values():
            encoder = entries.get(entry.query_encoder)
            if entry.query_encoder and (encoder is None or encoder.kind != "embedding"):
                raise RegistryError(entry.source, f"'{entry.query_encoder}' is not an "
                                    "embedding model of the registry", entry=entry.id,
                                    field="query_encoder")
        return cls(entries, tuple(files))

    def __getitem__(self, model_id: str) -> ModelEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModelError(model_id, self._entries) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def by_repo(self, repo: str) -> ModelEntry | None:
        """The entry whose hub repo is ``repo`` (case-insensitive), if any."""
        lowered = repo.lower()
        return next((e for e in self._entries.values() if e.repo.lower() == lowered), None)
