"""A Hugging Face checkpoint folder, read one tensor at a time.

Safetensors files are indexed from their headers alone (no weights read), checked against their
own size so a truncated download is caught before anything is written, and each tensor is read on
demand into a fresh array: peak memory follows the largest tensor, not the model. torch is not
needed (bf16 is widened to f32 with numpy).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmed.errors import CheckpointError, PickleRefusedError, SourceError
from localmed.extras import require
from localmed.formats.safetensors import TensorRef, read_safetensors_header
from localmed.provenance import CHECKPOINT_FILES


def read_config(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json; a clear error for a folder that has none or a bad one."""
    if not folder.is_dir():
        raise SourceError(folder, "not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(folder, "no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(config_path, f"invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SourceError(config_path, "must hold a JSON object")
    return config


def architecture_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return archs[0] if archs else f"(none; model_type={config.get('model_type')})"


@dataclass
class Checkpoint:
    """A local Hugging Face checkpoint: config, tokenizer files and indexed weights."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    weight_files: list[Path]
    source_weights: list[Path] | None = None
    """The files the user gave, when ``weight_files`` are staged copies (pickle input)."""
    _staging: object = None

    @property
    def architecture(self) -> str:
        return architecture_of(self.config)

    @classmethod
    def open(cls, folder: Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Open a checkpoint folder; raises a clear error for anything missing or broken."""
        folder = Path(folder)
        config = read_config(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
                if not allow_pickle:
                    raise PickleRefusedError(folder)
                return cls._from_pickle(folder, config)
            raise SourceError(folder, "no *.safetensors weights found")
        tensors: dict[str, TensorRef] = {}
        for path in files:
            tensors.update(read_safetensors_header(path))
        return cls(folder, config, tensors, files)

    @classmethod
    def _from_pickle(cls, folder: Path, config: dict[str, Any]) -> Checkpoint:
        """Load .bin weights with ``weights_only=True`` and stage them as safetensors.

        Only reached with --allow-pickle. torch's restricted unpickler refuses anything but
        tensors; the staged copy keeps the rest of the pipeline streaming.
        """
        require("convert", f"{folder}: reading pickled .bin weights (--allow-pickle)")
        import torch
        from safetensors.torch import save_file

        # Staged outside the user's folder, which may be read-only and is not ours to change;
        # removed when the Checkpoint is garbage-collected.
        staging = tempfile.TemporaryDirectory(prefix="localmed-staged-")
        staged = Path(staging.name)
        files: list[Path] = []
        for src in sorted([*folder.glob("*.bin"), *folder.glob("*.pt")]):
            dst = staged / f"{src.stem}.safetensors"
            try:
                state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise CheckpointError(src, f"cannot load safely: {exc}") from None
            if not isinstance(state, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
                raise CheckpointError(src, "not a state dict of named tensors")
            save_file(_unshared(state), str(dst))
            files.append(dst)
        tensors: dict[str, TensorRef] = {}
        for path in files:
            tensors.update(read_safetensors_header(path))
        checkpoint = cls(folder, config, tensors, files)
        checkpoint.source_weights = sorted([*folder.glob("*.bin"), *folder.glob("*.pt")])
        checkpoint._staging = staging
        return checkpoint

    def iter_input_files(self) -> Iterator[Path]:
        """Every file a conversion reads: weights, config and tokenizer files."""
        yield from self.source_weights or self.weight_files
        for name in CHECKPOINT_FILES:
            if (self.folder / name).is_file():
                yield self.folder / name

    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())


def _unshared(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors safetensors can save: contiguous, and tied ones (an embedding shared with the
    output head) copied, since safetensors refuses tensors that share memory."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out
