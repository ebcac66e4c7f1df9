"""Run a bench: every quant on every suite, results written per question so a rerun resumes.

Layout of ``--out``::

    run.json                      settings; a rerun with other settings is refused
    records/<quant>/<suite>.jsonl one line per scored question
    records/<quant>/text.jsonl    one line per scored document
    records/<quant>/speed.json    file size, peak RSS, prefill and decode tokens/s
    cache/text-ref/<doc>.npy      the reference's log-probabilities (float16), for text KLD
    results.json, results.csv, results.png
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localmed.atomic import write_text_atomic
from localmed.bench.scoring import (
    Answer,
    PromptBuilder,
    QuestionScorer,
    TextScore,
    log_softmax,
    score_text,
    text_logprobs,
)
from localmed.bench.suites import Question, Suite
from localmed.errors import BenchSettingsError
from localmed.registry import ModelEntry
from localmed.runtimes.base import GenerationParams, ScoringRuntime

SPEED_PROMPT = ("### Instruction:\nList the first steps in managing suspected sepsis in the "
                "emergency department.\n\n### Response:\n")


@dataclass
class BenchConfig:
    """Everything one bench run depends on."""

    model: str
    files: dict[str, Path]
    """Quant name → GGUF (or GPTQ folder), the reference included."""
    reference: str
    suites: list[Suite]
    out: Path
    shots: int = 0
    shot_examples: dict[str, tuple[Question, ...]] = field(default_factory=dict)
    """Worked examples per suite (its first ``shots`` questions, never scored)."""
    prompt_format: str = "plain"
    texts: list[str] = field(default_factory=list)
    """Medical documents for perplexity and full-vocabulary KLD (PubMedQA abstracts)."""
    n_ctx: int = 2048
    text_ctx: int = 512
    entry: ModelEntry | None = None

    @property
    def quants(self) -> list[str]:
        """The reference first: every other quant is compared with its answers."""
        return [self.reference, *(q for q in self.files if q != self.reference)]

    fresh: bool = False
    """Start over in ``out`` whatever it holds (``--fresh``)."""

    def fingerprint(self) -> dict[str, Any]:
        """The identity of every input: a rerun into the same folder must match it."""
        return {
            "model": self.model, "reference": self.reference,
            "files": {q: file_identity(p) for q, p in sorted(self.files.items())},
            "suites": {s.name: [str(s.path), file_identity(s.path), len(s.questions)]
                       for s in self.suites},
            "shots": self.shots, "prompt_format": self.prompt_format,
            "template": self.entry.template if self.entry and self.prompt_format == "chat"
            else None,
            "texts": hashlib.sha256("\x00".join(self.texts).encode()).hexdigest(),
            "text_ctx": self.text_ctx, "n_ctx": self.n_ctx,
        }


Loader = Callable[[str, Path, int], ScoringRuntime]
"""(quant, path, n_ctx) → a loaded runtime that scores."""


class Records:
    """Append-only JSON Lines per (quant, suite); a truncated last line is ignored."""

    def __init__(self, out: Path) -> None:
        self.root = out / "records"

    def path(self, quant: str, name: str) -> Path:
        return self.root / quant / f"{name}.jsonl"

    def read(self, quant: str, name: str) -> dict[int, dict[str, Any]]:
        path = self.path(quant, name)
        rows: dict[int, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by Ctrl-C; it is scored again
                rows[int(row["index"])] = row
        return rows

    def append(self, quant: str, name: str, row: dict[str, Any]) -> None:
        path = self.path(quant, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Sample this process's RSS every 20 ms; the list's one item is the peak so far."""
    import psutil

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)


def file_identity(path: Path) -> list[Any]:
    """Size, modification time and a hash of the first MiB: a file replaced since is noticed
    without hashing gigabytes of weights (a GPTQ folder: its config.json)."""
    target = path / "config.json" if path.is_dir() else path
    stat = target.stat()
    with target.open("rb") as fh:
        head = hashlib.sha256(fh.read(2**20)).hexdigest()
    return [stat.st_size, stat.st_mtime_ns, head]


def check_settings(config: BenchConfig) -> None:
    path = config.out / "run.json"
    wanted = json.loads(json.dumps(config.fingerprint()))  # as it reads back from the file
    if config.out.exists() and not config.out.is_dir():
        raise BenchSettingsError(f"--out {config.out} is a file, not a folder")
    if config.fresh:
        shutil.rmtree(Records(config.out).root, ignore_errors=True)
        path.unlink(missing_ok=True)
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            have = {}
        if have != wanted:
            changed = sorted(k for k in wanted if have.get(k) != wanted[k])
            raise BenchSettingsError(
                f"{config.out} holds a bench run with other settings ({', '.join(changed)}); "
                "rerun with --fresh to start over there, or use another --out")
        return
    config.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(wanted, indent=2) + "\n")


def remaining_work(config: BenchConfig, records: Records) -> int:
    total = 0
    for quant in config.quants:
        for suite in config.suites:
            done = records.read(quant, suite.name)
            total += sum(1 for q in suite.questions if q.index not in done)
        if config.texts:
            total += len(config.texts) - len(records.read(quant, "text"))
    return total


def run_bench(config: BenchConfig, load: Loader, advance: Callable[[str], None]) -> None:
    """Score everything not yet recorded; ``advance`` is called once per question/document.
    The caller has checked ``config`` against ``out`` first (:func:`check_settings`)."""
    records = Records(config.out)
    ref_cache = config.out / "cache" / "text-ref"
    for quant in config.quants:
        path = config.files[quant]
        speed_path = records.root / quant / "speed.json"
        # Peak RAM is measured while the model loads, answers and generates; the text pass
        # below holds analysis buffers (vocabulary-wide log-probabilities) that are ours, not
        # the model's.
        with peak_rss() as peak:
            runtime = load(quant, path, config.n_ctx)
            try:
                prefill = _score_suites(config, runtime, quant, records, advance)
                if speed_path.is_file():
                    speed = json.loads(speed_path.read_text())
                else:
                    speed = {"decode_tps": _decode_tps(runtime), "prefill_tps": prefill}
            finally:
                runtime.close()
        if config.texts:
            runtime = load(quant, path, config.text_ctx)
            try:
                _score_texts(config, runtime, quant, records, ref_cache, advance)
            finally:
                runtime.close()
        speed["file_bytes"] = _size(path)
        speed["peak_rss_bytes"] = max(peak[0], speed.get("peak_rss_bytes", 0))
        speed_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(speed_path, json.dumps(speed) + "\n")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def _score_suites(config: BenchConfig, runtime: ScoringRuntime, quant: str, records: Records,
                  advance: Callable[[str], None]) -> float | None:
    """Score the questions still missing; returns prefill tokens/s over what was scored."""
    from localmed.templates import get_template

    template = None
    if config.prompt_format == "chat":
        template = get_template(config.entry.template) if config.entry else None
    tokens = 0
    seconds = 0.0
    for suite in config.suites:
        done = records.read(quant, suite.name)
        todo = [q for q in suite.questions if q.index not in done]
        if not todo:
            continue
        shots = config.shot_examples.get(suite.name, ())
        scorer = QuestionScorer(runtime, suite, PromptBuilder(shots, template))
        for q in todo:
            start = time.perf_counter()
            answer: Answer = scorer.score(q)
            seconds += time.perf_counter() - start
            tokens += answer.new_tokens
            records.append(quant, suite.name, asdict(answer))
            advance(f"{quant} {suite.name}")
    return tokens / seconds if seconds > 0 else None


def _decode_tps(runtime: ScoringRuntime) -> float:
    params = GenerationParams(max_tokens=48, temperature=0.0, repeat_penalty=1.0)
    for _ in runtime.stream(SPEED_PROMPT, params):
        pass
    return runtime.last_stats.decode_tps


def _score_texts(config: BenchConfig, runtime: ScoringRuntime, quant: str, records: Records,
                 cache: Path, advance: Callable[[str], None]) -> None:
    done = records.read(quant, "text")
    is_ref = quant == config.reference
    for doc, text in enumerate(config.texts):
        if doc in done:
            continue
        tokens = runtime.tokenize(text)[: runtime.n_ctx]
        logprobs = text_logprobs(runtime, tokens)
        ref_path = cache / f"{doc}.npy"
        if is_ref:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = ref_path.with_suffix(".tmp.npy")
            np.save(tmp, logprobs.astype(np.float16))
            tmp.replace(ref_path)
            reference = logprobs
        else:
            # stored as float16: renormalised so that it is a distribution again
            reference = log_softmax(np.load(ref_path).astype(np.float64)).astype(np.float32)
        score: TextScore = score_text(doc, tokens, logprobs, reference)
        row = asdict(score)
        row["index"] = doc
        records.append(quant, "text", row)
        advance(f"{quant} text")
