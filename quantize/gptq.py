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

from localmed import library
from localmed.calibration import Calibration, load_calibration
from localmed.errors import CalibrationError, GPTQError, UnsupportedArchitectureError
from localmed.formats.gptq import MANIFEST
from localmed.provenance import TOKENIZER_FILES, Provenance, sha256_file
from localmed.quantize.checkpoint import Checkpoint
from localmed.quantize.conversion import Source
from localmed.quantize.preflight import check_output_dir
from localmed.runtimes.optional import private_working_dir, require_gptqmodel

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")


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


def gptq_texts(calibration: Calibration, samples: int) -> list[str]:
    """The first ``samples`` calibration documents of 8 words or more (a shorter one gives
    GPTQ's Hessian almost nothing)."""
    texts = [t for t in calibration.texts if len(t.split()) >= 8][:samples]
    if not texts:
        raise CalibrationError(calibration.path, "no calibration text in it (need documents of "
                               "8+ words)")
    return texts


def run_gptq(source: Source, out_dir: Path, settings: GPTQSettings) -> Path:
    """Quantize ``source`` with GPTQ; returns the finished folder."""
    settings.check()
    checkpoint = Checkpoint.open(source.folder)
    if checkpoint.architecture not in GPTQ_ARCHITECTURES:
        raise UnsupportedArchitectureError(checkpoint.architecture, GPTQ_ARCHITECTURES)
    calibration = load_calibration(settings.calibration)
    texts = gptq_texts(calibration, settings.samples)
    gptqmodel = require_gptqmodel()
    check_output_dir(out_dir)
    out_dir, source_folder = out_dir.resolve(), source.folder.resolve()  # absolute: see below
    final = library.gptq_path(source.name, settings.bits, settings.group_size, out_dir)
    staging = out_dir / f".{final.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        config = gptqmodel.QuantizeConfig(bits=settings.bits, group_size=settings.group_size,
                                          desc_act=settings.desc_act)
        with private_working_dir():  # GPTQModel's log files go there, not into the user's folder
            model = gptqmodel.GPTQModel.load(str(source_folder), config, device=_device())
            model.quantize(texts, batch_size=1)
            model.save(str(staging))
        _copy_tokenizer(source.folder, staging)
        _write_manifest(staging, source, checkpoint, settings, calibration, len(texts))
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
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_manifest(folder: Path, source: Source, checkpoint: Checkpoint,
                    settings: GPTQSettings, calibration: Calibration, n_texts: int) -> None:
    import gptqmodel

    entry = source.entry
    provenance = Provenance(
        source=source.label, revision=source.revision, quant=f"GPTQ-{settings.bits}bit",
        model_id=entry.id if entry else "", advisory=entry.advisory if entry else "",
        inputs_sha256={p.name: sha256_file(p) for p in checkpoint.iter_input_files()},
        calibration={"file": str(calibration.path), "sha256": calibration.sha256,
                     "texts": n_texts})
    record = {
        "format": "gptq", "bits": settings.bits, "group_size": settings.group_size,
        "desc_act": settings.desc_act, "architecture": checkpoint.architecture,
        "parameters": checkpoint.n_parameters(), "gptqmodel_version": gptqmodel.__version__,
        **provenance.to_manifest(),
    }
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
