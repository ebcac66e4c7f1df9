"""What a GPTQ checkpoint folder is, read from its config, tokenizer config and manifest.

No weights are loaded and transformers is not imported: detection and description are cheap, so
chat, bench, plan and info can list GPTQ folders beside GGUF files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmed.errors import CheckpointError, GPTQFolderError
from localmed.formats.info import ModelInfo
from localmed.formats.safetensors import read_safetensors_header
from localmed.planner import HF_NAMES, ModelFootprint, footprint_from_tensors
from localmed.provenance import Provenance

MANIFEST = "localmed.manifest.json"
"""localmed's provenance manifest inside a GPTQ folder it wrote."""


@dataclass(frozen=True)
class GPTQInfo(ModelInfo):
    """A GPTQ folder: its bits and group size from ``quantization_config``."""

    bits: int = 0
    group_size: int = 0


def _json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GPTQFolderError(folder, f"cannot read {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise GPTQFolderError(folder, f"{path.name} must hold a JSON object")
    return data


def is_gptq_folder(path: Path) -> bool:
    """A folder holding a GPTQ checkpoint (``quantization_config.quant_method == gptq``)."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "gptq"


def read_gptq_info(path: Path) -> GPTQInfo:
    """The facts chat, bench and info show; anything unreadable raises GPTQFolderError."""
    path = Path(path)
    if not is_gptq_folder(path):
        raise GPTQFolderError(path, "not a GPTQ checkpoint folder (no config.json with "
                              "quantization_config.quant_method = gptq)")
    config = _json(path / "config.json", path)
    tok_config = _json(path / "tokenizer_config.json", path) \
        if (path / "tokenizer_config.json").is_file() else {}
    template = tok_config.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    manifest = _json(path / MANIFEST, path) if (path / MANIFEST).is_file() else {}
    qc = config["quantization_config"]
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise GPTQFolderError(path, "no *.safetensors weights in it")

    def token(key: str) -> str:
        value = tok_config.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return GPTQInfo(
        path=path, format="gptq", architecture=str(config.get("model_type", "?")),
        name=path.name, quant=f"GPTQ-{qc.get('bits', '?')}bit",
        file_bytes=sum(p.stat().st_size for p in weights),
        n_parameters=int(manifest.get("parameters", 0)),
        context_length=config.get("max_position_embeddings"),
        block_count=config.get("num_hidden_layers"),
        chat_template=template if isinstance(template, str) else None,
        bos_token=token("bos_token"), eos_token=token("eos_token"),
        add_bos=bool(tok_config.get("add_bos_token", True)),
        provenance=Provenance.from_manifest(manifest),
        bits=int(qc.get("bits") or 0), group_size=int(qc.get("group_size") or 0),
    )


def read_gptq_footprint(path: Path) -> tuple[GPTQInfo, ModelFootprint]:
    """Info and memory needs, from the config and the safetensors headers."""
    info = read_gptq_info(path)
    config = _json(Path(path) / "config.json", Path(path))
    sizes: list[tuple[str, int]] = []
    try:
        for file in sorted(Path(path).glob("*.safetensors")):
            sizes += [(ref.name, ref.nbytes) for ref in read_safetensors_header(file).values()]
    except CheckpointError as exc:
        raise GPTQFolderError(path, str(exc)) from None
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        n_layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise GPTQFolderError(path, "config.json lacks hidden_size, num_attention_heads or "
                              "num_hidden_layers") from None
    footprint = footprint_from_tensors(
        sizes, n_layers=n_layers, n_embd=n_embd, n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        n_ctx_train=info.context_length or 2048,
        n_parameters=info.n_parameters, quant=info.quant,
        head_dim=config.get("head_dim"), names=HF_NAMES)
    return info, footprint
