"""``localmed quantize SOURCE --format gptq``: a standard Hugging Face GPTQ checkpoint.

Built with GPTQModel (the maintained successor of auto-gptq), calibrated on medical text
(PubMedQA abstracts by default). The output folder loads unchanged with transformers (and so vLLM
and TGI): ``quantization_config`` in config.json, safetensors, tokenizer and chat template, plus
localmed's provenance manifest. It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmed import __version__, paths
from localmed.bench.suites import read_documents
from localmed.errors import LocalmedError, OfflineError, UnsupportedArchitectureError
from quantize.checkpoint import Checkpoint, sha256_file
from quantize.pipeline import Source, check_output_dir

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
MANIFEST = "localmed.manifest.json"


class GPTQError(LocalmedError, ValueError):
    """A GPTQ request that cannot be carried out (settings, calibration, missing package)."""


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    calibration: Path | None = None
    samples: int = 128
    """Calibration texts used (PubMedQA has ~500 labelled abstracts)."""

    def check(self) -> None:
        if self.bits not in GPTQ_BITS:
            raise GPTQError(f"--bits {self.bits}: GPTQ takes {', '.join(map(str, GPTQ_BITS))}")
        if self.group_size != -1 and self.group_size <= 0:
            raise GPTQError(f"--group-size {self.group_size}: use a positive size, or -1")


def require_gptqmodel() -> Any:
    """Import GPTQModel, or say how to install it."""
    # GPTQModel wants two CPU workers for loading; on a 2-core laptop it computes one and fails.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    try:
        import gptqmodel
    except ImportError:
        raise GPTQError("GPTQ export needs the optional packages: pip install 'localmed[gptq]' "
                        "(GPTQModel and optimum)") from None
    return gptqmodel


def load_calibration(path: Path | None, samples: int) -> tuple[list[str], Path]:
    """Medical calibration texts: a JSONL file (``question`` or ``text`` per line) or a text
    file (documents separated by blank lines); by default PubMedQA abstracts."""
    if path is None:
        path = default_calibration()
    path = Path(path)
    if not path.is_file():
        raise GPTQError(f"{path}: calibration file not found")
    texts = read_documents(path, fields=("text", "question"))
    texts = [t for t in texts if len(t.split()) >= 8][:samples]
    if not texts:
        raise GPTQError(f"{path}: no calibration text in it (need documents of 8+ words)")
    return texts, path


def default_calibration() -> Path:
    """PubMedQA abstracts in the data dir, fetched once with ``datasets`` when online."""
    path = paths.data_dir() / "calibration" / "pubmedqa.jsonl"
    if path.is_file():
        return path
    if paths.hub_offline():
        raise OfflineError("calibration", f"no medical calibration text at {path} and offline; "
                           "pass --calibration FILE (.jsonl with 'question' or 'text', or .txt)")
    try:
        import datasets
    except ImportError:
        raise GPTQError(f"no calibration text at {path}: pass --calibration FILE, or pip install "
                        "datasets to fetch PubMedQA abstracts") from None
    from localmed.atomic import write_text_atomic

    data = datasets.load_dataset("qiaojin/PubMedQA", "pqa_labeled", split="train")
    rows = ["\n".join(r["context"]["contexts"]) for r in data]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


def output_folder(out_dir: Path, name: str, settings: GPTQSettings) -> Path:
    return out_dir / f"{name}-GPTQ-{settings.bits}bit-g{settings.group_size}"


def run_gptq(source: Source, out_dir: Path, settings: GPTQSettings) -> Path:
    """Quantize ``source`` with GPTQ; returns the finished folder."""
    settings.check()
    checkpoint = Checkpoint.open(source.folder)
    if checkpoint.architecture not in GPTQ_ARCHITECTURES:
        raise UnsupportedArchitectureError(checkpoint.architecture, GPTQ_ARCHITECTURES)
    texts, calibration_path = load_calibration(settings.calibration, settings.samples)
    gptqmodel = require_gptqmodel()
    check_output_dir(out_dir)
    final = output_folder(out_dir, source.name, settings)
    staging = out_dir / f".{final.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        config = gptqmodel.QuantizeConfig(bits=settings.bits, group_size=settings.group_size,
                                          desc_act=settings.desc_act)
        model = gptqmodel.GPTQModel.load(str(source.folder), config, device=_device())
        model.quantize(texts, batch_size=1)
        model.save(str(staging))
        _copy_tokenizer(source.folder, staging)
        _write_manifest(staging, source, checkpoint, settings, calibration_path, len(texts))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The source's own tokenizer files (a SentencePiece tokenizer.model is the reference for
    Llama-2/Mistral ids), and its chat template."""
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_manifest(folder: Path, source: Source, checkpoint: Checkpoint,
                    settings: GPTQSettings, calibration: Path, n_texts: int) -> None:
    import gptqmodel

    entry = source.entry
    record = {
        "format": "gptq", "bits": settings.bits, "group_size": settings.group_size,
        "desc_act": settings.desc_act, "architecture": checkpoint.architecture,
        "parameters": checkpoint.n_parameters(), "model_id": entry.id if entry else "",
        "source": source.label, "revision": source.revision,
        "advisory": entry.advisory if entry else "", "localmed_version": __version__,
        "gptqmodel_version": gptqmodel.__version__,
        "calibration": {"file": str(calibration), "sha256": sha256_file(calibration),
                        "texts": n_texts},
        "inputs_sha256": {p.name: sha256_file(p) for p in checkpoint.iter_input_files()},
    }
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
