"""What a ``localmed quantize`` run converts: the source (registry id, hub repo, folder), its
checkpoint, the converter path that takes it, its tensor plan and its provenance.

Nothing here reads a weight: a Conversion is planned from headers and config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from localmed.errors import (
    ConverterMissingError,
    SourceError,
    TokenizerError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from localmed.extras import missing, require
from localmed.hub import download_checkpoint
from localmed.provenance import Provenance, now
from localmed.quantize.checkpoint import Checkpoint, architecture_of, read_config
from localmed.quantize.families import (
    ConverterFamily,
    PlannedTensor,
    family_for,
    native_architectures,
)
from localmed.quantize.gguf_out import planned_bytes
from localmed.quantize.imatrix import ImportanceMatrix
from localmed.quantize.llama_cpp_source import LlamaCppConverter, converter_table, find_converter
from localmed.quantize.vocab import LoadedVocab, load_vocab, write_vocab
from localmed.quants import DIRECT_TENSOR_TYPE, QUANT_TYPES, QuantType
from localmed.registry import ModelEntry, Registry


@dataclass(frozen=True)
class Source:
    """Where a checkpoint came from: what provenance records."""

    folder: Path
    label: str
    """Hub repo id, or the local folder as given."""
    revision: str
    """Hub commit, or ``local``."""
    entry: ModelEntry | None
    name: str
    """Base name of the output files."""


def resolve_source(source: str, registry: Registry, *, revision: str | None = None,
                   token: str | None = None) -> Source:
    """A registry id, a local checkpoint folder, or a hub repo id → a local folder."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(path, "is a file; expected a checkpoint folder (with config.json)")
        name = _safe_name(path.resolve().name)
        # A local copy of a registry model, named as its id, keeps its advisory and template.
        return Source(path, str(path), "local", registry.get(name), name)
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise SourceError(path, "no such folder")
    entry = registry.get(source)
    repo = entry.repo if entry else source
    if entry is None:
        if source.count("/") != 1:
            raise UnknownModelError(source, registry)
        entry = registry.by_repo(source)
    gated = bool(entry and entry.gated)
    if missing("convert"):
        # Whether llama.cpp's converter (and so torch) is needed is known from the architecture:
        # the registry's, or the repository's config.json alone, before any weights come down.
        if entry is not None:
            architecture = entry.architecture
        else:
            config, _ = download_checkpoint(repo, revision=revision, token=token, gated=gated,
                                            patterns=["config.json"])
            architecture = architecture_of(read_config(config))
        if architecture not in native_architectures():
            require("convert", f"converting {repo} ({architecture}: llama.cpp's converter)")
    folder, commit = download_checkpoint(repo, revision=revision, token=token, gated=gated)
    name = entry.id if entry else _safe_name(repo.split("/")[-1])
    return Source(folder, repo, commit, entry, name)


def _safe_name(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-.")
    return cleaned.lower() or "model"



NATIVE = "localmed"
"""The converter path of localmed's own streaming converter."""


@dataclass
class Conversion:
    """A checkpoint ready to write: which converter, its tensor plan (native path) and provenance.

    ``family``/``plan``/``vocab`` are set on the native path; ``llama_cpp`` on the llama.cpp path,
    with ``why`` saying why the native path could not take it.
    """

    source: Source
    checkpoint: Checkpoint
    family: ConverterFamily | None = None
    plan: list[PlannedTensor] = field(default_factory=list)
    vocab: LoadedVocab | None = None
    llama_cpp: LlamaCppConverter | None = None
    why: str = ""
    native_refusal: str = ""
    """Why localmed's own converter did not take a checkpoint of a family it implements."""
    input_hashes: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=now)
    """One time for every file of this run, so GGUF metadata and manifests agree."""
    imatrix: ImportanceMatrix | None = None
    imatrix_file: Path | None = None
    imatrix_sha256: str = ""
    imatrix_quants: frozenset[str] = frozenset()
    """The quants the matrix is used for (all llama.cpp-quantized ones for --imatrix FILE; the
    types of 4 bits and fewer for --imatrix auto)."""
    projector: dict[str, Any] | None = None
    """The vision projector written beside an image-text model's files (its file name, size
    and sha256), which every quant's manifest names."""

    @property
    def image_text(self) -> bool:
        """An image-text checkpoint (MedGemma: a vision tower beside the language model)."""
        return isinstance(self.checkpoint.config.get("vision_config"), dict)

    @property
    def converter(self) -> str:
        return self.llama_cpp.label if self.llama_cpp else NATIVE

    @property
    def intermediate(self) -> QuantType:
        """What llama.cpp quantizes from: BF16 for bf16 checkpoints (no f16 overflow), else F16."""
        bf16 = any(t.dtype == "BF16" for t in self.checkpoint.tensors.values())
        return QUANT_TYPES["BF16" if bf16 else "F16"]

    def estimate_bytes(self, quant: QuantType) -> int:
        if quant.direct and self.family is not None:
            return planned_bytes(self.plan, DIRECT_TENSOR_TYPE[quant.name])
        return int(self.checkpoint.n_parameters() * quant.bits_per_weight / 8 * 1.05)

    def provenance(self, quant: QuantType) -> Provenance:
        entry = self.source.entry
        return Provenance(source=self.source.label, revision=self.source.revision,
                          quant=quant.name, model_id=entry.id if entry else "",
                          advisory=entry.advisory if entry else "",
                          inputs_sha256=dict(self.input_hashes), created=self.created,
                          converter=self.converter, **self._imatrix_fields(quant))

    def imatrix_for(self, quant: QuantType) -> ImportanceMatrix | None:
        """The matrix llama.cpp's quantizer gets for ``quant`` (None: quantized without one)."""
        return self.imatrix if quant.name in self.imatrix_quants else None

    def _imatrix_fields(self, quant: QuantType) -> dict[str, str]:
        if self.imatrix_file is None or self.imatrix_for(quant) is None:
            return {}
        return {"imatrix_file": self.imatrix_file.name, "imatrix_sha256": self.imatrix_sha256}

    def metadata(self, quant: QuantType) -> dict[str, str]:
        """localmed's string keys of a GGUF: name, licence and provenance."""
        entry = self.source.entry
        keys = {gguf.Keys.General.NAME: entry.name if entry else self.source.name}
        if entry:
            keys[gguf.Keys.General.LICENSE] = entry.license
        return {**keys, **self.provenance(quant).to_gguf()}

    def add_metadata(self, writer: gguf.GGUFWriter, quant: QuantType) -> None:
        assert self.family is not None
        write_vocab(writer, self.checkpoint.folder, self.family.hparam("vocab_size"), self.vocab)
        for key, value in self.metadata(quant).items():
            writer.add_string(key, value)


def prepare(source: Source, *, allow_pickle: bool = False, converter: str = "auto"
            ) -> Conversion:
    """Open the checkpoint and pick its converter (no weights read).

    localmed's streaming converter takes the families it implements, with a tokenizer it can
    carry exactly; anything else goes to llama.cpp's own converter of the pinned release.
    """
    checkpoint = Checkpoint.open(source.folder, allow_pickle=allow_pickle)
    why = ""
    if converter == NATIVE:
        family = family_for(checkpoint)
        return Conversion(source, checkpoint, family, family.plan(),
                          load_vocab(checkpoint.folder))
    if converter == "llama.cpp":
        why = "--converter llama.cpp"
    elif checkpoint.architecture in native_architectures():
        try:
            vocab = load_vocab(checkpoint.folder)
        except TokenizerError as exc:
            why = exc.message.split(": ", 1)[-1]
        else:
            family = family_for(checkpoint)
            return Conversion(source, checkpoint, family, family.plan(), vocab)
    require("convert", f"converting {source.name} with llama.cpp's converter ("
            f"{why or checkpoint.architecture + ', which localmed does not convert itself'})")
    try:
        found = find_converter()
    except ConverterMissingError as missing:
        if why:
            raise TokenizerError(source.folder, f"{why}; {missing}") from None
        if checkpoint.architecture in native_architectures():
            raise
        raise UnsupportedArchitectureError(checkpoint.architecture, native_architectures(),
                                           f"llama.cpp's converter ({missing})") from None
    if checkpoint.architecture not in converter_table(found.folder).architectures:
        raise UnsupportedArchitectureError(checkpoint.architecture, native_architectures(),
                                           found.label)
    refusal = why if why and converter != "llama.cpp" else ""
    return Conversion(source, checkpoint, llama_cpp=found, native_refusal=refusal,
                      why=why or f"{checkpoint.architecture} is converted by llama.cpp")
