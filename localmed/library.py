"""The local model library: where localmed keeps models, importance matrices and bench results,
and what each file and folder is called.

This is the one module that knows the names (``<id>.<QUANT>.gguf``, ``<id>-GPTQ-4bit-g128``,
``<id>.mmproj-F16.gguf``, ``<name>.imatrix.gguf``, ``bench/<model>/results.json``,
``docs/<name>.sqlite``); everything
else asks it. Paths come from
functions and nothing is created here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmed.paths import data_dir

GGUF_SUFFIX = ".gguf"
IMATRIX_SUFFIX = ".imatrix.gguf"
MANIFEST_SUFFIX = ".manifest.json"
GPTQ_MARK = "-GPTQ-"
PROJECTOR_MARK = "mmproj"
"""In the name of an image-text model's vision projector, localmed's (``<id>.mmproj-F16.gguf``)
as llama.cpp's and the hub's (``mmproj-model-f16.gguf``): never a model of its own."""
RESULTS_FILE = "results.json"


# --- document indexes ----------------------------------------------------------------------------

INDEX_SUFFIX = ".sqlite"


def docs_dir() -> Path:
    """Where ``localmed docs`` keeps its indexes: one SQLite file each."""
    return data_dir() / "docs"


def index_path(name: str) -> Path:
    """``<data dir>/docs/<name>.sqlite``: the index ``docs add --name NAME`` makes."""
    return docs_dir() / f"{name}{INDEX_SUFFIX}"


# --- models ---------------------------------------------------------------------------------------

def models_dir() -> Path:
    """Default output folder of ``localmed quantize``; chat, bench and plan look here."""
    return data_dir() / "models"


def gguf_path(model: str, quant: str, folder: Path | None = None) -> Path:
    """``<folder>/<model>.<QUANT>.gguf``: one quant of one model."""
    return (folder or models_dir()) / f"{model}.{quant}{GGUF_SUFFIX}"


SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
"""llama.cpp's split GGUF parts: ``<prefix>-00001-of-00003.gguf``."""


def _part(prefix: str, number: int, count: int) -> str:
    return f"{prefix}-{number:05d}-of-{count:05d}{GGUF_SUFFIX}"


def split_name(model: str, quant: str, number: int, count: int,
               folder: Path | None = None) -> Path:
    """Part ``number`` (1-based) of a split GGUF in the library."""
    return (folder or models_dir()) / _part(f"{model}.{quant}", number, count)


def split_parts(first: Path, count: int) -> list[Path] | None:
    """Every part of the split GGUF whose first part is ``first``; None if it is not named as
    a first part of ``count``."""
    match = SPLIT_PART.search(first.name)
    if not match or int(match.group(1)) != 1 or int(match.group(2)) != count:
        return None
    prefix = first.name[:match.start()]
    return [first.with_name(_part(prefix, n, count)) for n in range(1, count + 1)]


def gguf_files(path: Path) -> list[Path]:
    """The files of a GGUF: itself, or every part of a split one named by its first part."""
    match = SPLIT_PART.search(path.name)
    if match and int(match.group(1)) == 1:
        parts = split_parts(path, int(match.group(2)))
        if parts and all(p.is_file() for p in parts):
            return parts
    return [path]


def find_gguf(model: str, quant: str, folder: Path | None = None) -> Path | None:
    """The library's GGUF of ``model`` at ``quant``: the file, or a split one's first part."""
    single = gguf_path(model, quant, folder)
    if single.is_file():
        return single
    folder = folder or models_dir()
    firsts = sorted(folder.glob(f"{model}.{quant}-00001-of-*{GGUF_SUFFIX}")) \
        if folder.is_dir() else []
    return firsts[0] if firsts else None


def manifest_path(model_file: Path) -> Path:
    """The provenance manifest beside a model file: ``<id>.<QUANT>.manifest.json`` (for a split
    GGUF, one for all its parts)."""
    name = SPLIT_PART.sub(GGUF_SUFFIX, model_file.name)
    return model_file.with_name(name.removesuffix(GGUF_SUFFIX) + MANIFEST_SUFFIX)


def gptq_path(model: str, bits: int, group_size: int, folder: Path | None = None) -> Path:
    """``<folder>/<model>-GPTQ-<bits>bit-g<group>``: a GPTQ checkpoint folder."""
    return (folder or models_dir()) / f"{model}{GPTQ_MARK}{bits}bit-g{group_size}"


def projector_path(model: str, quant: str = "F16", folder: Path | None = None) -> Path:
    """``<folder>/<model>.mmproj-<QUANT>.gguf``: the vision projector of an image-text model,
    beside its quants (each of them runs with it)."""
    return (folder or models_dir()) / f"{model}.{PROJECTOR_MARK}-{quant}{GGUF_SUFFIX}"


def is_projector(path: Path) -> bool:
    return PROJECTOR_MARK in path.name.lower() and path.name.endswith(GGUF_SUFFIX)


def projector_beside(model_file: Path) -> Path | None:
    """The projector that goes with ``model_file`` by name: the one its manifest names (also
    when it is missing, so that a model moved without it is told so), else localmed's name
    for its model, else the one projector in its folder (a pulled repository's)."""
    manifest = manifest_path(model_file)
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    named = record.get("projector", {}).get("file") if isinstance(record, dict) and \
        isinstance(record.get("projector"), dict) else None
    if isinstance(named, str) and named and "/" not in named:
        return model_file.parent / named
    folder = model_file.parent
    model = model_file.name.split(".", 1)[0]
    ours = sorted(folder.glob(f"{model}.{PROJECTOR_MARK}-*{GGUF_SUFFIX}"))
    if ours:
        return ours[0]
    others = [p for p in folder.glob(f"*{GGUF_SUFFIX}") if is_projector(p)]
    return others[0] if len(others) == 1 else None


def belongs_to(path: Path, model: str) -> bool:
    """Whether a file or folder in the library is one of ``model``'s quants (GGUF or GPTQ)."""
    return path.name.startswith((f"{model}.", f"{model}{GPTQ_MARK}")) \
        and not path.name.endswith((IMATRIX_SUFFIX, MANIFEST_SUFFIX))


def local_quants(model: str, folder: Path | None = None) -> list[str]:
    """The quants of ``model`` present as GGUF files in the library, sorted by file name."""
    folder = folder or models_dir()
    if not folder.is_dir():
        return []
    prefix = f"{model}."
    quants = []
    for path in sorted(folder.glob(f"{prefix}*{GGUF_SUFFIX}")):
        if path.name.endswith(IMATRIX_SUFFIX) or is_projector(path):
            continue
        part = SPLIT_PART.search(path.name)
        if part and int(part.group(1)) != 1:
            continue  # a split GGUF counts once, by its first part
        name = path.name[:part.start()] + GGUF_SUFFIX if part else path.name
        quants.append(name[len(prefix):-len(GGUF_SUFFIX)])
    return quants


def local_files(model: str, quants: tuple[str, ...], folder: Path | None = None) -> list[Path]:
    """Those of ``model``'s ``quants`` that exist, in the order asked."""
    return [p for p in (gguf_path(model, q, folder) for q in quants) if p.is_file()]


# --- importance matrices --------------------------------------------------------------------------

def imatrix_path(name: str, folder: Path | None = None) -> Path:
    """Where ``localmed imatrix`` writes ``name``'s matrix by default."""
    return (folder or models_dir()) / f"{name}{IMATRIX_SUFFIX}"


def imatrix_cache_path(name: str, key: str) -> Path:
    """The cached medical matrix of ``quantize --imatrix auto``, per checkpoint and settings."""
    return data_dir() / "imatrix" / f"{name}-{key}{IMATRIX_SUFFIX}"


# --- bench results --------------------------------------------------------------------------------

def bench_dir(model: str) -> Path:
    """``localmed bench MODEL``'s results folder (records, results.json/.csv/.png)."""
    return data_dir() / "bench" / model


def bench_results_path(model: str) -> Path:
    return bench_dir(model) / RESULTS_FILE


@dataclass(frozen=True)
class BenchRun:
    """One quant on one question set, as results.json holds it."""

    quant: str
    """The bench row: ``Q4_K_M``, ``Q4_K_M+imatrix``, ``GPTQ-4bit``."""
    suite: str
    n: int
    imatrix: dict[str, str] | None
    accuracy: float | None
    accuracy_ci: list[float] | None
    delta: float
    """Accuracy minus the reference's, on the same questions."""
    delta_ci: list[float]
    mcnemar_p: float | None
    agreement: float | None
    """Share of questions where this quant picked the reference's option."""
    option_kld: float | None
    text_kld: float | None
    """Mean full-vocabulary KL divergence from the reference on medical text (nats/token)."""
    text_ppl: float | None
    text_top1: float | None
    text_tokens: int
    file_bytes: int | None
    peak_rss_bytes: int | None
    prefill_tps: float | None
    decode_tps: float | None
    card_score: float | None
    complete: bool
    truncated: int
    made_by: str | None = None
    """Who made the file: ``localmed``, llama.cpp's converter, or ``<repo> (not made by
    localmed)`` for a pulled GGUF; None where the file does not say."""


@dataclass(frozen=True)
class BenchResults:
    """results.json: what ``localmed bench`` writes and ``localmed plan`` reads back."""

    model: str
    reference: str
    settings: dict[str, Any]
    runs: list[BenchRun]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> BenchResults | None:
        """The results in ``path``; None when it is missing or not a results.json of this
        shape (a damaged file is treated as no results, never as a crash)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            runs = [BenchRun(**run) for run in data["runs"]]
            return cls(data["model"], data["reference"], data["settings"], runs)
        except (OSError, ValueError, KeyError, TypeError):
            return None
