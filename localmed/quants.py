"""llama.cpp's quantization types, as data.

``DIRECT`` types are written by the converter itself with gguf-py; every other type comes from
llama.cpp's own quantizer (``llama_model_quantize``) run on an F16/BF16 intermediate file.
The file-type numbers are gguf-py's ``LlamaFileType`` (the ``LLAMA_FTYPE_*`` enum of llama.h).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

from localmed.errors import UnknownQuantError, UnsupportedQuantError


@dataclass(frozen=True)
class QuantType:
    """One output type a user can ask ``localmed quantize`` for."""

    name: str
    """Name as llama.cpp's ``llama-quantize`` spells it (``Q4_K_M``)."""
    ftype: LlamaFileType
    """``general.file_type`` of a file of this type."""
    bits_per_weight: float
    """Approximate size of a 7B model in this type, in bits per weight (for disk checks)."""
    direct: bool = False
    """Written directly by gguf-py, without llama.cpp's quantizer."""
    needs_imatrix: bool = False
    """llama.cpp refuses this type without an importance matrix."""
    note: str = ""

    @property
    def low_bit(self) -> bool:
        """4 bits and fewer: where an importance matrix pays (``--imatrix auto`` makes one)."""
        return self.needs_imatrix or self.name.startswith(("Q4", "Q3", "Q2", "IQ"))

    @property
    def ternary_only(self) -> bool:
        """TQ1_0/TQ2_0 store weights of -1, 0, 1: right for BitNet, ruin for anything else."""
        return self.name.startswith("TQ")


def _q(name: str, bpw: float, *, direct: bool = False, imatrix: bool = False,
       note: str = "") -> QuantType:
    return QuantType(name, LlamaFileType[f"MOSTLY_{name}" if name != "F32" else "ALL_F32"],
                     bpw, direct, imatrix, note)


# Ordered from largest to smallest, as llama-quantize lists them.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    _q("F32", 32.0, direct=True),
    _q("F16", 16.0, direct=True),
    _q("BF16", 16.0, direct=True),
    _q("Q8_0", 8.5, direct=True),
    _q("Q6_K", 6.56),
    _q("Q5_K_M", 5.67),
    _q("Q5_K_S", 5.52),
    _q("Q5_1", 6.0),
    _q("Q5_0", 5.5),
    _q("Q4_K_M", 4.89),
    _q("Q4_K_S", 4.58),
    _q("Q4_1", 5.0),
    _q("Q4_0", 4.5),
    _q("IQ4_NL", 4.5),
    _q("IQ4_XS", 4.25),
    _q("Q3_K_L", 4.27),
    _q("Q3_K_M", 3.91),
    _q("Q3_K_S", 3.5),
    _q("IQ3_M", 3.7),
    _q("IQ3_S", 3.44),
    _q("IQ3_XS", 3.3),
    _q("IQ3_XXS", 3.06),
    _q("Q2_K", 2.96),
    _q("Q2_K_S", 2.96, imatrix=True),
    _q("IQ2_M", 2.7, imatrix=True),
    _q("IQ2_S", 2.5, imatrix=True),
    _q("IQ2_XS", 2.31, imatrix=True),
    _q("IQ2_XXS", 2.06, imatrix=True),
    _q("IQ1_M", 1.75, imatrix=True),
    _q("IQ1_S", 1.56, imatrix=True),
    _q("TQ2_0", 2.06, note="ternary models (BitNet) only"),
    _q("TQ1_0", 1.69, note="ternary models (BitNet) only"),
)}

ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "FP16": "F16", "FP32": "F32"}

# What each direct type stores a 2-D weight as; 1-D tensors and routers always stay F32.
DIRECT_TENSOR_TYPE: dict[str, GGMLQuantizationType] = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
    "Q8_0": GGMLQuantizationType.Q8_0,
}


def get_quant(name: str) -> QuantType:
    """Look up a quant type by name, case-insensitively; unknown names list the valid ones."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    try:
        return QUANT_TYPES[key]
    except KeyError:
        raise UnknownQuantError(name, QUANT_TYPES) from None


def parse_quant_list(text: str, *, imatrix: bool = False) -> list[QuantType]:
    """Parse ``--quant Q4_K_M,Q8_0``: every name checked, duplicates dropped, order kept.
    Types llama.cpp makes only with an importance matrix need ``imatrix``."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise UnknownQuantError(text, QUANT_TYPES)
    seen: dict[str, QuantType] = {}
    for part in names:
        quant = get_quant(part)
        if quant.needs_imatrix and not imatrix:
            raise UnsupportedQuantError(
                quant.name, "llama.cpp makes this type only with an importance matrix: pass "
                "--imatrix FILE (llama.cpp's GGUF imatrix format), or try Q3_K_S or Q2_K")
        seen.setdefault(quant.name, quant)
    return list(seen.values())


def quant_from_file_type(file_type: int) -> str:
    """Name of a ``general.file_type`` value (``15`` → ``Q4_K_M``)."""
    for quant in QUANT_TYPES.values():
        if int(quant.ftype) == file_type:
            return quant.name
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({file_type})"
