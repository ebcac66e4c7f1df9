"""``localmed chat demo``: a tiny model made on this machine, so the app can be tried offline.

It is *not* a medical model: a two-layer Llama with a 512-token SentencePiece vocabulary, trained
for a few seconds on a few paragraphs about using localmed, then converted by localmed's own
converter. It exists so a new user sees the whole app work with no download.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from localmed import library
from localmed.registry import ModelEntry

DEMO_ID = "demo"
DEMO_QUANT = "Q8_0"
DEMO_ADVISORY = ("DEMO ONLY, NOT A MEDICAL MODEL: a tiny model trained here on a few paragraphs "
                 "about localmed. Its answers are meaningless.")

DEMO_ENTRY = ModelEntry(
    id=DEMO_ID, name="localmed demo (not a medical model)", repo="(built on this machine)",
    architecture="LlamaForCausalLM", parameters_b=0.0005, context_length=512, template="alpaca",
    license="apache-2.0", gated=False, default_quant=DEMO_QUANT, advisory=DEMO_ADVISORY)


def demo_path(models_dir: Path | None = None) -> Path:
    return library.gguf_path(DEMO_ID, DEMO_QUANT, models_dir)


def ensure_demo_model(models_dir: Path | None = None) -> Path:
    """The demo GGUF, built on first use."""
    from localmed.quantize.demo_model import build_checkpoint
    from localmed.quantize.pipeline import Source, run_quantize
    from localmed.quants import QUANT_TYPES

    target = demo_path(models_dir)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="localmed-demo-") as tmp:
        folder = build_checkpoint(Path(tmp) / "demo")
        source = Source(folder, "localmed demo (trained locally)", "local", DEMO_ENTRY, DEMO_ID)
        run_quantize(source, [QUANT_TYPES[DEMO_QUANT]], target.parent)
    return target
