"""A Runtime on transformers, for GPTQ checkpoints (CUDA when present, CPU otherwise).

It offers what the llama.cpp Runtime offers (stream, stop, tokens, logits), so ``localmed chat``
and ``localmed bench`` run a GPTQ folder exactly as they run a GGUF. Sampling uses transformers'
own logits processors, in llama.cpp's order, so every :class:`GenerationParams` field counts; the
KV cache of the previous ``next_logits`` call is reused for the prefix it shares.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localmed.errors import GPTQFolderError
from localmed.extras import importable
from localmed.formats.gptq import read_gptq_footprint
from localmed.formats.info import ModelInfo
from localmed.planner import (
    Hardware,
    ModelFootprint,
    OffloadPlan,
    plan_offload,
    refuse_unless_fits,
)
from localmed.runtimes.base import (
    GenerationParams,
    GenerationStats,
    ScoringRuntime,
    StopReason,
    StopStringFilter,
)
from localmed.runtimes.optional import require_gptqmodel
from localmed.templates import TURN_END_MARKERS

REPEAT_LAST_N = 64
"""Tokens the repetition penalty looks back over (llama.cpp's default ``penalty_last_n``)."""


def plan_transformers(footprint: ModelFootprint, n_ctx: int | None,
                      hardware: Hardware | None = None) -> OffloadPlan:
    """transformers loads the whole model on one device: CUDA when torch sees one, else CPU
    (also where torch is not installed: a plan needs no extra, running does)."""
    if hardware is None:
        import psutil

        mem = psutil.virtual_memory()
        hardware = Hardware("cpu", mem.total, mem.available)
        if importable("torch"):
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                hardware = Hardware("cuda", mem.total, mem.available, total, free,
                                    torch.cuda.get_device_name())
    on_gpu = hardware.backend == "cuda"
    plan = plan_offload(footprint, hardware, n_ctx=n_ctx, gpu_layers=-1 if on_gpu else None)
    where = f"transformers on {hardware.backend.upper()} (GPTQ kernels)"
    return dataclasses.replace(plan, reasons=(where, *plan.reasons[1:]))


@dataclass
class TransformersRuntime(ScoringRuntime):
    """transformers (GPTQ kernels from GPTQModel through optimum)."""

    info: ModelInfo
    plan: OffloadPlan
    n_ctx_limit: int = 4096
    last_stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
            raise GPTQFolderError(self.info.path, f"transformers could not load it: {exc}") \
                from None
        self._model.eval()
        self._stop = threading.Event()
        self._cached: list[int] = []
        self._past: Any = None
        self._eos = {i for i in [self._tok.eos_token_id, *self._eog_ids()] if i is not None}

    @classmethod
    def load(cls, path: Path, *, n_ctx: int | None = None) -> TransformersRuntime:
        """Plan, refuse what cannot fit, then load."""
        info, footprint = read_gptq_footprint(Path(path))
        plan = refuse_unless_fits(plan_transformers(footprint, n_ctx), Path(path))
        return cls(info, plan, min(plan.n_ctx, info.context_length or plan.n_ctx))

    def _eog_ids(self) -> list[int]:
        ids = []
        for text in TURN_END_MARKERS:
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

    tokens_evaluated: int = 0
    """Tokens run through the model since loading (prefill work, for bench and tests)."""

    def _forward(self, tokens: Sequence[int], past: Any = None) -> Any:
        ids = self._torch.tensor([list(tokens)], device=self._device)
        self.tokens_evaluated += len(tokens)
        with self._torch.no_grad():
            return self._model(ids, past_key_values=past, use_cache=True)

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._check_fits(tokens)
        tokens = list(tokens)
        limit = min(len(self._cached), len(tokens) - 1)  # at least one token is evaluated
        keep = next((i for i in range(limit) if self._cached[i] != tokens[i]), limit)
        if keep and self._past is not None:
            self._past.crop(keep - self._past.get_seq_length())  # <= 0: tokens to drop
            out = self._forward(tokens[keep:], self._past)
        else:
            out = self._forward(tokens)
        self._cached, self._past = tokens, out.past_key_values
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
        processors = self._processors(params)
        generated: list[int] = []
        recent = collections.deque(tokens[-REPEAT_LAST_N:], maxlen=REPEAT_LAST_N)
        shown = ""
        start = first = time.perf_counter()
        self._cached, self._past = [], None  # the cache is the reply's from here on
        out = self._forward(tokens)
        try:
            while True:
                logits = out.logits[0, -1].float().cpu()
                token = self._sample(logits, recent, processors, params, generator)
                if not generated:
                    first = time.perf_counter()
                    stats.prefill_seconds = first - start
                if token in self._eos and not params.ignore_eos:
                    stats.stopped_by = StopReason.EOS
                    break
                generated.append(token)
                recent.append(token)
                stats.generated_tokens += 1
                stats.token_ids.append(token)
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

    def _processors(self, params: GenerationParams) -> Any:
        """transformers' logits processors for ``params``, in llama.cpp's sampler order:
        repetition penalty, top-k, top-p, min-p, then temperature."""
        import transformers as tf

        chain: list[Any] = []
        if params.repeat_penalty != 1.0:
            chain.append(tf.RepetitionPenaltyLogitsProcessor(params.repeat_penalty))
        if params.temperature > 0:
            if params.top_k > 0:
                chain.append(tf.TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                chain.append(tf.TopPLogitsWarper(params.top_p))
            if params.min_p > 0:
                chain.append(tf.MinPLogitsWarper(params.min_p))
            chain.append(tf.TemperatureLogitsWarper(params.temperature))
        return tf.LogitsProcessorList(chain)

    def _sample(self, logits: Any, context: Iterable[int], processors: Any,
                params: GenerationParams, generator: Any) -> int:
        """The next token; the repetition penalty looks at ``context`` (the last
        REPEAT_LAST_N tokens, kept by the caller)."""
        torch = self._torch
        recent = torch.tensor([list(context)])
        scores = processors(recent, logits.unsqueeze(0))[0]
        if params.temperature <= 0:
            return int(torch.argmax(scores))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def close(self) -> None:
        self._past = None
        del self._model
