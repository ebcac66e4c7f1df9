"""The Runtime interface that chat and bench use, and its llama.cpp implementation.

Only this module (and the converters) import ``llama_cpp``. A Runtime loads a model after the
offload planner has agreed it fits, streams text pieces for a prompt, stops at once when asked
(from any thread), counts tokens, and reports its context size and offload.
"""

from __future__ import annotations

import codecs
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localmed.errors import ContextFullError, GGUFFileError, ModelTooLargeError
from localmed.gguf_info import GGUFInfo
from localmed.planner import Hardware, ModelFootprint, OffloadPlan, footprint_from_tensors, gib


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. Defaults are conservative: clinical answers, not creative writing."""

    max_tokens: int = 1024
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1


@dataclass
class GenerationStats:
    """Counts and timings of the last generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = ""
    """``eos``, ``stop`` (a stop string), ``length``, ``context`` or ``user``."""

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token's time is prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


class Runtime(ABC):
    """A loaded model that streams text."""

    info: GGUFInfo
    plan: OffloadPlan
    last_stats: GenerationStats

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Context size, in tokens."""

    @abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|eot_id|>`` parsed as such)."""

    def count_tokens(self, text: str, *, add_bos: bool = True) -> int:
        return len(self.tokenize(text, add_bos=add_bos))

    @abstractmethod
    def stream(self, prompt: str, params: GenerationParams | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the reply to ``prompt`` piece by piece; stats land in ``last_stats``."""

    _stop: threading.Event
    """Set by :meth:`stop`, cleared when a generation begins; made by each implementation."""

    def stop(self) -> None:
        """Ask a running ``stream`` to end after the current token (thread-safe)."""
        self._stop.set()

    @abstractmethod
    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (float32, whole vocabulary) for the token after ``tokens``.

        The longest prefix shared with the previous call is not evaluated again, so a few-shot
        prefix common to every question costs one evaluation in all.
        """

    @abstractmethod
    def sequence_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` (shape ``[len(tokens), n_vocab]``)."""

    @abstractmethod
    def close(self) -> None:
        """Free the model."""

    # --- shared by the implementations ----------------------------------------------------------

    def _check_fits(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.n_ctx:
            raise ContextFullError(f"{len(tokens)} tokens do not fit the {self.n_ctx}-token "
                                   "context")

    def _begin(self, prompt: str, params: GenerationParams) -> tuple[list[int], int]:
        """Tokens of the prompt and how many may be generated; resets ``last_stats``."""
        tokens = self.tokenize(prompt)
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise ContextFullError(f"the prompt has {len(tokens)} tokens; the context holds "
                                   f"{self.n_ctx}")
        self.last_stats = GenerationStats(prompt_tokens=len(tokens))
        self._stop.clear()
        return tokens, min(params.max_tokens, room)

    def _ended(self, stops: StopStringFilter, budget: int, params: GenerationParams) -> bool:
        """After a token: record why generation ends, if it does."""
        stats = self.last_stats
        if stops.hit:
            stats.stopped_by = "stop"
        elif self._stop.is_set():
            stats.stopped_by = "user"
        elif stats.generated_tokens >= budget:
            stats.stopped_by = "length" if budget == params.max_tokens else "context"
        return bool(stats.stopped_by)


def footprint_of(info: GGUFInfo, tensor_sizes: Sequence[tuple[str, int]],
                 fields: dict[str, int]) -> ModelFootprint:
    return footprint_from_tensors(
        tensor_sizes, n_layers=info.block_count or 0, n_embd=fields["embedding_length"],
        n_head=fields["head_count"], n_head_kv=fields.get("head_count_kv") or fields["head_count"],
        n_ctx_train=info.context_length or 2048, n_parameters=info.n_parameters,
        quant=info.quant, head_dim=fields.get("key_length"))


def read_footprint(path: Path) -> tuple[GGUFInfo, ModelFootprint]:
    """A GGUF's metadata and what it needs in memory (header only; no weights read)."""
    from localmed.gguf_info import info_from_header, read_header_checked

    header = read_header_checked(Path(path))
    info = info_from_header(header)
    arch = info.architecture
    fields: dict[str, int] = {}
    for key, gguf_key in (("embedding_length", "embedding_length"),
                          ("head_count", "attention.head_count"),
                          ("head_count_kv", "attention.head_count_kv"),
                          ("key_length", "attention.key_length")):
        value = header.fields.get(f"{arch}.{gguf_key}")
        if isinstance(value, int):
            fields[key] = value
    if "embedding_length" not in fields or "head_count" not in fields:
        raise GGUFFileError(path, f"missing {arch}.embedding_length/head_count")
    sizes = [(t.name, t.n_bytes) for t in header.tensors]
    return info, footprint_of(info, sizes, fields)


class StopStringFilter:
    """Holds back text that might be the start of a stop string, and cuts at one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        """Text that is safe to show now."""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


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
                logits_all=self.logits_all, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise GGUFFileError(self.info.path, f"llama.cpp could not load it: {exc}") from None
        self._vocab = self._llm._model.vocab
        self._eog = llama_cpp.llama_vocab_is_eog

    @classmethod
    def load(cls, path: Path, *, n_ctx: int | None = None, gpu_layers: int | None = None,
             threads: int | None = None, hardware: Hardware | None = None,
             logits_all: bool = False) -> LlamaCppRuntime:
        """Plan, refuse what cannot fit, then load."""
        from localmed import hardware as hw_detect
        from localmed.planner import plan_offload

        info, footprint = read_footprint(Path(path))
        hw = hardware or hw_detect.detect()
        plan = plan_offload(footprint, hw, n_ctx=n_ctx, gpu_layers=gpu_layers)
        if not plan.fits:
            raise ModelTooLargeError(Path(path), plan.reasons[-1], plan.suggestion, plan)
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
                                       repeat_penalty=params.repeat_penalty, reset=True)
        try:
            for token in generator:
                if stats.generated_tokens == 0:
                    first = time.perf_counter()
                    stats.prefill_seconds = first - start
                if self._eog(self._vocab, token):
                    stats.stopped_by = "eos"
                    break
                stats.generated_tokens += 1
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


def describe_plan(plan: OffloadPlan) -> str:
    """One paragraph for `localmed plan` and the model info screen."""
    lines = [f"{plan.label}, context {plan.n_ctx} tokens"]
    lines += [f"  - {reason}" for reason in plan.reasons]
    lines.append(f"  needs {gib(plan.ram_needed)} RAM" +
                 (f", {gib(plan.vram_needed)} VRAM" if plan.vram_needed else ""))
    if not plan.fits:
        lines.append("  does not fit" + (f": try --quant {plan.suggestion}"
                                         if plan.suggestion else ""))
    return "\n".join(lines)
