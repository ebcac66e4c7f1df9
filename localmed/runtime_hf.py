"""A Runtime on transformers, for GPTQ checkpoints (CUDA when present, CPU otherwise).

It offers what the llama.cpp Runtime offers (stream, stop, tokens, logits), so ``localmed chat``
and ``localmed bench`` run a GPTQ folder exactly as they run a GGUF. Only this module and the
converters import transformers.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import GGUFFileError
from localmed.gguf_info import GGUFInfo
from localmed.planner import OffloadPlan
from localmed.runtime import GenerationParams, GenerationStats, Runtime, StopStringFilter


def is_gptq_folder(path: Path) -> bool:
    """A folder holding a GPTQ checkpoint (``quantization_config.quant_method == gptq``)."""
    config = Path(path) / "config.json"
    if not Path(path).is_dir() or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (data.get("quantization_config") or {}).get("quant_method") == "gptq"


def folder_info(path: Path) -> GGUFInfo:
    """The facts chat and bench show, read from a GPTQ folder's config and manifest."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tok_config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        tok_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = tok_config.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    manifest_path = path / "localmed.manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    qc = config.get("quantization_config") or {}

    def token(key: str) -> str:
        value = tok_config.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return GGUFInfo(
        path=path, architecture=config.get("model_type", "?"), name=path.name,
        quant=f"GPTQ-{qc.get('bits', '?')}bit", file_bytes=size,
        n_parameters=int(manifest.get("parameters", 0)), n_tensors=0,
        context_length=config.get("max_position_embeddings"),
        block_count=config.get("num_hidden_layers"), chat_template=template,
        bos_token=token("bos_token"), eos_token=token("eos_token"),
        add_bos=bool(tok_config.get("add_bos_token", True)),
        provenance={k: v for k, v in manifest.items() if not isinstance(v, dict)},
    )


@dataclass
class TransformersRuntime(Runtime):
    """transformers (GPTQ kernels from GPTQModel through optimum)."""

    info: GGUFInfo
    plan: OffloadPlan
    n_ctx_limit: int = 4096
    last_stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from quantize.gptq import require_gptqmodel

        self._torch = torch
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        path = str(self.info.path)
        # GPTQModel prints a banner and kernel choices on stdout; in the chat app that would
        # land on the terminal under the UI.
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                require_gptqmodel()  # transformers loads GPTQ weights through it
                self._tok = AutoTokenizer.from_pretrained(path)
                self._model = AutoModelForCausalLM.from_pretrained(path, device_map=self._device)
        except (OSError, ValueError) as exc:
            raise GGUFFileError(self.info.path, f"transformers could not load it: {exc}") \
                from None
        self._model.eval()
        self._stop = threading.Event()
        self._eos = {i for i in [self._tok.eos_token_id, *self._eog_ids()] if i is not None}

    @classmethod
    def load(cls, path: Path, *, n_ctx: int | None = None) -> TransformersRuntime:
        import torch

        info = folder_info(Path(path))
        trained = info.context_length or 4096
        n_ctx = min(n_ctx or 4096, trained)
        backend = "cuda" if torch.cuda.is_available() else "cpu"
        layers = info.block_count or 0
        plan = OffloadPlan(layers if backend == "cuda" else 0, layers, n_ctx, backend, 0, 0, True,
                           (f"transformers on {backend.upper()} (GPTQ kernels)",))
        return cls(info, plan, n_ctx)

    def _eog_ids(self) -> list[int]:
        ids = []
        for text in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):
            token_id = self._tok.convert_tokens_to_ids(text)
            if isinstance(token_id, int) and token_id != self._tok.unk_token_id:
                ids.append(token_id)
        return ids

    @property
    def n_ctx(self) -> int:
        return self.n_ctx_limit

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        bos = self._tok.bos_token_id
        return [bos, *ids] if add_bos and self.info.add_bos and bos is not None else ids

    def _forward(self, tokens: Sequence[int], past: Any = None) -> Any:
        ids = self._torch.tensor([list(tokens)], device=self._device)
        with self._torch.no_grad():
            return self._model(ids, past_key_values=past, use_cache=True)

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._check_fits(tokens)
        out = self._forward(tokens)
        return out.logits[0, -1].float().cpu().numpy()

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._check_fits(tokens)
        return self._forward(tokens).logits[0].float().cpu().numpy()

    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        params = params or GenerationParams()
        tokens, budget = self._begin(prompt, params)
        stats = self.last_stats
        stops = StopStringFilter(stop)
        generator = self._torch.Generator(device="cpu").manual_seed(0)
        generated: list[int] = []
        shown = ""
        start = first = time.perf_counter()
        out = self._forward(tokens)
        try:
            while True:
                logits = out.logits[0, -1].float().cpu()
                token = self._sample(logits, params, generator)
                if not generated:
                    first = time.perf_counter()
                    stats.prefill_seconds = first - start
                if token in self._eos:
                    stats.stopped_by = "eos"
                    break
                generated.append(token)
                stats.generated_tokens += 1
                text = self._tok.decode(generated, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    piece, shown = text[len(shown):], text
                    if piece and (safe := stops.feed(piece)):
                        yield safe
                if self._ended(stops, budget, params):
                    break
                out = self._forward([token], out.past_key_values)
        finally:
            stats.decode_seconds = time.perf_counter() - first
        if tail := stops.flush():
            yield tail

    def _sample(self, logits: Any, params: GenerationParams, generator: Any) -> int:
        torch = self._torch
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        top = torch.topk(probs, min(params.top_k, probs.numel()))
        keep = torch.cumsum(top.values, 0) - top.values < params.top_p
        values, indices = top.values[keep], top.indices[keep]
        choice = torch.multinomial(values / values.sum(), 1, generator=generator)
        return int(indices[choice])

    def close(self) -> None:
        del self._model
