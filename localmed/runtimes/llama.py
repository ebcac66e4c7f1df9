"""The llama.cpp Runtime, through llama-cpp-python's ``Llama``.

With the converters, the only code that imports ``llama_cpp``.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localmed.errors import GGUFFileError
from localmed.formats.gguf import GGUFInfo, read_gguf_footprint
from localmed.planner import Hardware, OffloadPlan
from localmed.runtimes.base import (
    GenerationParams,
    GenerationStats,
    Runtime,
    StopReason,
    StopStringFilter,
)


@dataclass
class LlamaCppRuntime(Runtime):
    """llama.cpp through ``llama_cpp.Llama``."""

    info: GGUFInfo
    plan: OffloadPlan
    threads: int | None = None
    seed: int = 0
    logits_all: bool = False
    """Keep logits of every position (needed by ``sequence_logits``; costs n_ctx × vocab)."""
    last_stats: GenerationStats = field(default_factory=GenerationStats)

    def __post_init__(self) -> None:
        import llama_cpp

        self._stop = threading.Event()
        kwargs = {"n_threads": self.threads} if self.threads else {}
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.info.path), n_ctx=self.plan.n_ctx,
                n_gpu_layers=self.plan.n_gpu_layers_arg, seed=self.seed, verbose=False,
                logits_all=self.logits_all, flash_attn=self.plan.flash_attention, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise GGUFFileError(self.info.path, f"llama.cpp could not load it: {exc}") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._eog = llama_cpp.llama_vocab_is_eog

    @classmethod
    def load(cls, path: Path, *, n_ctx: int | None = None, gpu_layers: int | None = None,
             threads: int | None = None, hardware: Hardware | None = None,
             logits_all: bool = False) -> LlamaCppRuntime:
        """Plan, refuse what cannot fit, then load."""
        from localmed.planner import plan_offload, refuse_unless_fits
        from localmed.runtimes import hardware as hw_detect

        info, footprint = read_gguf_footprint(Path(path))
        hw = hardware or hw_detect.detect()
        plan = refuse_unless_fits(plan_offload(footprint, hw, n_ctx=n_ctx,
                                               gpu_layers=gpu_layers), Path(path))
        return cls(info, plan, threads, logits_all=logits_all)

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos and self.info.add_bos,
                                  special=True)

    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        params = params or GenerationParams()
        tokens, budget = self._begin(prompt, params)
        stats = self.last_stats
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringFilter(stop)
        start = first = time.perf_counter()
        generator = self._llm.generate(tokens, top_k=params.top_k, top_p=params.top_p,
                                       min_p=params.min_p, temp=params.temperature,
                                       repeat_penalty=params.repeat_penalty,
                                       frequency_penalty=params.frequency_penalty,
                                       presence_penalty=params.presence_penalty, reset=True)
        try:
            for token in generator:
                if stats.generated_tokens == 0:
                    first = time.perf_counter()
                    stats.prefill_seconds = first - start
                if not params.ignore_eos and self._eog(self._vocab, token):
                    stats.stopped_by = StopReason.EOS
                    break
                stats.generated_tokens += 1
                stats.token_ids.append(token)
                piece = decoder.decode(self._llm.detokenize([token], special=False))
                if piece and (text := stops.feed(piece)):
                    yield text
                if self._ended(stops, budget, params):
                    break
        finally:
            generator.close()
            stats.decode_seconds = time.perf_counter() - first
        if tail := stops.flush() + decoder.decode(b"", final=True):
            yield tail

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        import llama_cpp

        llm = self._llm
        self._check_fits(tokens)
        cached = llm.input_ids[: llm.n_tokens]
        limit = min(len(cached), len(tokens) - 1)  # at least one token is evaluated
        same = np.flatnonzero(cached[:limit] != np.asarray(tokens[:limit]))
        llm.n_tokens = int(same[0]) if same.size else limit
        llm.eval(tokens[llm.n_tokens:])
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()

    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        if not self.logits_all:
            raise RuntimeError("load the runtime with logits_all=True for sequence_logits")
        self._check_fits(tokens)
        self._llm.reset()
        self._llm.eval(tokens)
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self._llm.close()
