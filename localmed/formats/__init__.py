"""The registry of model formats: what a path on disk is, and how to describe, plan and run it.

chat, bench, plan, info and serve ask here and never test a suffix themselves. A format detects
its own paths, reads their info and memory footprint without loading weights, plans the load on
this machine, and loads a :class:`~localmed.runtimes.base.Runtime`. A new format (an engine
process, a new quantization) is one more class registered with :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from localmed.errors import ModelFileError
from localmed.extras import require
from localmed.formats.info import ModelInfo
from localmed.planner import Hardware, ModelFootprint, OffloadPlan

if TYPE_CHECKING:
    # Only named in annotations: the Runtime interface reads ModelInfo from this package, so
    # importing it here at run time would make a cycle (runtimes.base → formats →
    # runtimes.base).
    from localmed.runtimes.base import ScoringRuntime


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model; None leaves the choice to the planner."""

    n_ctx: int | None = None
    gpu_layers: int | None = None
    threads: int | None = None
    speculation: bool = False
    """llama.cpp's engine drafts tokens by prompt lookup (``--speculation``)."""
    draft: Path | None = None
    """...or with this draft model (``--draft``)."""
    rpc: Any = None
    """Workers that hold part of the layers (``--rpc``: a
    :class:`~localmed.rpc.workers.Workers`)."""


class ModelFormat(ABC):
    """One way a model can sit on disk."""

    name: ClassVar[str]
    """Short name, also :attr:`ModelInfo.format`."""
    description: ClassVar[str]
    """What a user would call it, for messages."""

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Cheaply: is ``path`` in this format? (It may still be damaged.)"""

    @abstractmethod
    def info(self, path: Path) -> ModelInfo:
        """Its facts; a damaged model raises this format's :class:`ModelFileError`."""

    @abstractmethod
    def footprint(self, path: Path) -> tuple[ModelInfo, ModelFootprint]:
        """Its facts and what it needs in memory."""

    def plan(self, path: Path, options: LoadOptions,
             hardware: Hardware | None = None) -> tuple[ModelInfo, OffloadPlan]:
        """How it would load on this machine (or ``hardware``), and why."""
        info, footprint = self.footprint(path)
        return info, self.plan_footprint(footprint, options, hardware)

    @abstractmethod
    def plan_footprint(self, footprint: ModelFootprint, options: LoadOptions,
                       hardware: Hardware | None = None) -> OffloadPlan:
        """The plan for a footprint already read (one header read for both)."""

    @abstractmethod
    def load(self, path: Path, options: LoadOptions) -> ScoringRuntime:
        """A loaded runtime (one that scores too); refuses a model that does not fit before loading it."""


FORMATS: dict[str, ModelFormat] = {}
"""Every known format, by name, in detection order."""

F = TypeVar("F", bound=type[ModelFormat])


def register(cls: F) -> F:
    FORMATS[cls.name] = cls()
    return cls


def format_of(path: Path) -> ModelFormat:
    """The format of ``path``; a path in none of them raises ModelFileError."""
    path = Path(path).expanduser()
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt
    if not path.exists():
        raise ModelFileError(path, "no such file or folder")
    kinds = " or ".join(f.description for f in FORMATS.values())
    raise ModelFileError(path, f"not a model localmed can run (expected {kinds})")


def describe(path: Path) -> ModelInfo:
    return format_of(path).info(Path(path).expanduser())


def footprint(path: Path) -> tuple[ModelInfo, ModelFootprint]:
    return format_of(path).footprint(Path(path).expanduser())


def plan(path: Path, options: LoadOptions = LoadOptions(),
         hardware: Hardware | None = None) -> tuple[ModelInfo, OffloadPlan]:
    return format_of(path).plan(Path(path).expanduser(), options, hardware)


def load_runtime(path: Path, options: LoadOptions = LoadOptions()) -> ScoringRuntime:
    return format_of(path).load(Path(path).expanduser(), options)


def models_in(folder: Path, accept: Callable[[Path], bool] = lambda p: True) -> list[ModelInfo]:
    """Every model directly inside ``folder`` (files and folders), described, sorted by name."""
    found = []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not accept(path):
            continue
        if any(fmt.detect(path) for fmt in FORMATS.values()):
            found.append(describe(path))
    return found


# --- the formats ----------------------------------------------------------------------------------

@register
class GGUFFormat(ModelFormat):
    """A GGUF file, run by llama.cpp."""

    name = "gguf"
    description = "a .gguf file"

    def detect(self, path: Path) -> bool:
        if path.suffix == ".gguf":
            return True
        if not path.is_file():
            return False
        with path.open("rb") as fh:
            return fh.read(4) == b"GGUF"

    def info(self, path: Path) -> ModelInfo:
        from localmed.formats.gguf import read_gguf_info

        return read_gguf_info(path)

    def footprint(self, path: Path) -> tuple[ModelInfo, ModelFootprint]:
        from localmed.formats.gguf import read_gguf_footprint

        return read_gguf_footprint(path)

    def plan_footprint(self, footprint: ModelFootprint, options: LoadOptions,
                       hardware: Hardware | None = None) -> OffloadPlan:
        from localmed.planner import plan_offload
        from localmed.runtimes import hardware as detect

        return plan_offload(footprint, hardware or detect.detect(), n_ctx=options.n_ctx,
                            gpu_layers=options.gpu_layers)

    def load(self, path: Path, options: LoadOptions) -> ScoringRuntime:
        from localmed.runtimes.local import LocalRuntime

        return LocalRuntime.load(path, n_ctx=options.n_ctx, gpu_layers=options.gpu_layers,
                                 threads=options.threads, speculation=options.speculation,
                                 draft=options.draft, rpc=options.rpc)


@register
class GPTQFormat(ModelFormat):
    """A Hugging Face GPTQ folder, run by transformers (GPTQModel kernels)."""

    name = "gptq"
    description = "a GPTQ checkpoint folder"

    def detect(self, path: Path) -> bool:
        from localmed.formats.gptq import is_gptq_folder

        return is_gptq_folder(path)

    def info(self, path: Path) -> ModelInfo:
        from localmed.formats.gptq import read_gptq_info

        return read_gptq_info(path)

    def footprint(self, path: Path) -> tuple[ModelInfo, ModelFootprint]:
        from localmed.formats.gptq import read_gptq_footprint

        return read_gptq_footprint(path)

    def plan_footprint(self, footprint: ModelFootprint, options: LoadOptions,
                       hardware: Hardware | None = None) -> OffloadPlan:
        from localmed.runtimes.hf import plan_transformers

        return plan_transformers(footprint, options.n_ctx, hardware)

    def load(self, path: Path, options: LoadOptions) -> ScoringRuntime:
        require("gptq", "running a GPTQ model (transformers' loader)")
        from localmed.runtimes.hf import TransformersRuntime

        return TransformersRuntime.load(path, n_ctx=options.n_ctx)
