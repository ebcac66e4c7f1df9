"""What a model on disk is, whatever its format: the facts chat, bench, plan and info show."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localmed.provenance import Provenance


@dataclass(frozen=True)
class ModelInfo:
    """Read from a model's header or config alone; no weights are loaded."""

    path: Path
    format: str
    """Name of the format in :mod:`localmed.formats` (``gguf``, ``gptq``)."""
    architecture: str
    name: str
    quant: str
    file_bytes: int
    n_parameters: int
    context_length: int | None
    block_count: int | None
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    provenance: Provenance | None = None
    """None for a file localmed did not make."""
    n_tensors: int = 0
    """Tensors in the file's table (0 where the format keeps no single table)."""

    @property
    def label(self) -> str:
        """The quant as bench and plan name it: ``Q3_K_M+imatrix`` when an importance matrix
        weighted its rounding (provenance says so), else the quant."""
        if self.provenance and self.provenance.imatrix_file:
            return f"{self.quant}+imatrix"
        return self.quant

    @property
    def advisory(self) -> str:
        return self.provenance.advisory if self.provenance else ""

    @property
    def model_id(self) -> str:
        """Registry id recorded at conversion, or ``""``."""
        return self.provenance.model_id if self.provenance else ""
