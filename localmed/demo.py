"""``localmed chat demo``: a tiny model shipped with localmed, so the app can be tried offline.

It is *not* a medical model: a two-layer Llama with a 512-token SentencePiece vocabulary, trained
for a few seconds on a few paragraphs about using localmed (:mod:`localmed.quantize.demo_model`),
then converted by localmed's own converter. The GGUF (470 kB) ships in ``localmed/assets``, so the
default install needs no torch to try the app; ``scripts/build_demo_model.py`` rebuilds the same
bytes from source (with torch: the ``convert`` extra) and checks them against :data:`DEMO_SHA256`.
"""

from __future__ import annotations

from pathlib import Path

from localmed.errors import ModelFileError
from localmed.provenance import sha256_file
from localmed.registry import ModelEntry

DEMO_ID = "demo"
DEMO_QUANT = "Q8_0"
DEMO_ADVISORY = ("DEMO ONLY, NOT A MEDICAL MODEL: a tiny model trained on a few paragraphs "
                 "about localmed. Its answers are meaningless.")

DEMO_ENTRY = ModelEntry(
    id=DEMO_ID, name="localmed demo (not a medical model)", repo="(shipped with localmed)",
    architecture="LlamaForCausalLM", parameters_b=0.0005, context_length=512, template="alpaca",
    license="apache-2.0", gated=False, default_quant=DEMO_QUANT, advisory=DEMO_ADVISORY)

DEMO_FILE = Path(__file__).parent / "assets" / f"{DEMO_ID}.{DEMO_QUANT}.gguf"
DEMO_SHA256 = "7fb1d56038af98c7ec69a7c4e8a2b3fee69efbf48778e5382ca178565b9a5e49"
"""What ``scripts/build_demo_model.py`` writes: torch 2.13.0 (CPU build), one thread, its
portable kernels (``ATEN_CPU_CAPABILITY=default``, ``MKL_CBWR=COMPATIBLE``), created at
:data:`DEMO_EPOCH`."""
DEMO_EPOCH = 1767225600
"""2026-01-01T00:00:00Z: the demo's recorded creation time (``SOURCE_DATE_EPOCH`` of its build)."""


def demo_model() -> Path:
    """The demo GGUF shipped with localmed, checked against its sha256 (a damaged install is one
    line naming the file, not a crash inside llama.cpp)."""
    if not DEMO_FILE.is_file():
        raise ModelFileError(DEMO_FILE, "the demo model is missing from this install: "
                             "reinstall localmed (scripts/install.sh)")
    if sha256_file(DEMO_FILE) != DEMO_SHA256:
        raise ModelFileError(DEMO_FILE, "the demo model is damaged (its sha256 differs from the "
                             "one localmed shipped): reinstall localmed (scripts/install.sh), or "
                             "rebuild it with scripts/build_demo_model.py")
    return DEMO_FILE
