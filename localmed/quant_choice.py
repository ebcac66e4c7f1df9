"""Which quant to make for this machine: the least loss that fits in memory, and why.

Loss is the mean KL divergence from the full-precision model's next-token distribution: measured
on medical text by ``localmed bench`` for this very model when its results exist, llama.cpp's
published table otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from localmed.library import BenchResults
from localmed.quants import QUANT_TYPES

PUBLISHED_SOURCE = "llama.cpp's published KLD table (Llama-3-8B vs FP16, Wikitext)"
PUBLISHED_KLD: Mapping[str, float] = {
    # llama.cpp tools/perplexity/README.md, "LLaMA 3 8b Scoreboard" (revision f364eb6f), mean
    # KLD vs FP16; "+imatrix" rows are its "WT 10m" importance-matrix rows.
    "Q8_0": 0.001355, "Q6_K": 0.005452, "Q5_K_M": 0.010762, "Q5_K_S": 0.016595,
    "Q5_1": 0.018045, "Q5_0": 0.022239, "Q4_K_M+imatrix": 0.028152, "Q4_K_M": 0.031273,
    "Q4_K_S+imatrix": 0.031951, "IQ4_NL+imatrix": 0.035742, "IQ4_XS+imatrix": 0.036334,
    "Q4_K_S": 0.043136, "Q4_1": 0.071683, "Q4_0": 0.071940, "Q3_K_L+imatrix": 0.073077,
    "Q3_K_M+imatrix": 0.084358, "Q3_K_L": 0.087176, "Q3_K_M": 0.101913,
    "IQ3_M+imatrix": 0.102534, "IQ3_S+imatrix": 0.111278, "IQ3_XS+imatrix": 0.138693,
    "IQ3_XXS+imatrix": 0.183625, "Q3_K_S+imatrix": 0.199821, "Q3_K_S": 0.228217,
    "IQ2_M+imatrix": 0.325989, "Q2_K+imatrix": 0.332223, "Q2_K_S+imatrix": 0.403360,
    "IQ2_S+imatrix": 0.439197, "Q2_K": 0.445132, "IQ2_XS+imatrix": 0.546290,
    "IQ2_XXS+imatrix": 0.812022, "IQ1_M+imatrix": 1.393084, "IQ1_S+imatrix": 2.254554,
}
"""Q8_0 is the largest type suggested: 0.0014 from F16 at half the memory and about twice the
decode speed (decoding reads every weight once per token)."""


@dataclass(frozen=True)
class Measured:
    """One quant's result in ``localmed bench``'s results.json."""

    kld: float
    file_bytes: int | None


@dataclass(frozen=True)
class QuantChoice:
    label: str
    """``Q4_K_M`` or ``Q4_K_M+imatrix``."""
    bytes: int
    kld: float
    measured: bool
    why: str

    @property
    def quant(self) -> str:
        return self.label.removesuffix("+imatrix")


def read_measured(results: Path) -> dict[str, Measured]:
    """Each quant's full-vocabulary KLD on medical text from a bench results.json ({} when the
    file is missing, unreadable, or has no text metrics)."""
    read = BenchResults.read(results)
    measured: dict[str, Measured] = {}
    for run in read.runs if read else []:
        kld, size = run.text_kld, run.file_bytes
        if isinstance(kld, (int, float)) and run.quant not in measured:
            measured[run.quant] = Measured(float(kld), size if isinstance(size, int) else None)
    return measured


def estimated_bytes(label: str, n_parameters: int) -> int:
    return int(n_parameters * QUANT_TYPES[label.removesuffix("+imatrix")].bits_per_weight / 8)


def choose_quant(n_parameters: int, *, capacity: int, fixed_bytes: int,
                 measured: Mapping[str, Measured] | None = None,
                 below: str | None = None) -> QuantChoice | None:
    """The lowest-KLD quant whose weights plus ``fixed_bytes`` (KV cache and runtime overhead)
    fit ``capacity``; measured results first, the published order when none of them fits.
    ``below``: a quant that does not fit (the model's own): only smaller ones are offered."""
    budget = capacity - fixed_bytes
    ceiling = QUANT_TYPES[below].bits_per_weight if below in QUANT_TYPES else None

    def smaller(label: str) -> bool:
        return ceiling is None or QUANT_TYPES[label.removesuffix("+imatrix")].bits_per_weight \
            < ceiling

    candidates: list[QuantChoice] = []
    for label, result in (measured or {}).items():
        if label.removesuffix("+imatrix") not in QUANT_TYPES or result.kld < 0 or \
                not smaller(label):
            continue
        size = result.file_bytes or estimated_bytes(label, n_parameters)
        if size <= budget and QUANT_TYPES[label.removesuffix("+imatrix")].bits_per_weight <= 8.5:
            candidates.append(QuantChoice(label, size, result.kld, True,
                                          "as `localmed bench` measured it for this model on "
                                          "medical text"))
    if not candidates:
        for label, kld in PUBLISHED_KLD.items():
            size = estimated_bytes(label, n_parameters)
            if size <= budget and smaller(label):
                candidates.append(QuantChoice(label, size, kld, False,
                                              f"in {PUBLISHED_SOURCE}; no `localmed bench` "
                                              "results for this model yet"))
    return min(candidates, key=lambda c: (c.kld, c.bytes), default=None)
