"""Questions/s: localmed's one-pass letter scoring against per-option loglikelihood scoring.

The baseline scores each option as lm-eval-harness does with a llama.cpp model: one request per
option, the question as context and the option text as continuation, each evaluated from scratch
(its log-likelihood summed over the continuation's tokens). localmed evaluates each question once
and reads the option letters' logits, reusing the few-shot prefix. Same model, same questions,
same run; zero-shot and few-shot.

    python benchmarks/bench_throughput.py [--gguf FILE] [--questions 40] [--shots 0,3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode_overhead import build_gguf  # noqa: E402
from localmed.bench.scoring import (  # noqa: E402
    PromptBuilder,
    QuestionScorer,
    format_question,
    log_softmax,
)
from localmed.bench.suites import Suite, load_suite  # noqa: E402
from tests.tiny_models import SHARED  # noqa: E402


def one_pass(runtime, suite: Suite, shots) -> tuple[float, list[str]]:
    scorer = QuestionScorer(runtime, suite, PromptBuilder(tuple(shots)))
    start = time.perf_counter()
    answers = [scorer.score(q).predicted for q in suite.questions]
    return len(suite.questions) / (time.perf_counter() - start), answers


def per_option(runtime, suite: Suite, shots) -> tuple[float, list[str]]:
    prefix = PromptBuilder(tuple(shots)).prefix()
    start = time.perf_counter()
    answers = []
    for q in suite.questions:
        context = prefix + format_question(q)
        n_context = len(runtime.tokenize(context))
        scores = []
        for letter, text in q.options.items():
            tokens = runtime.tokenize(f"{context} {letter}. {text.strip()}")
            logprobs = log_softmax(runtime.sequence_logits(tokens)[n_context - 1: -1])
            targets = tokens[n_context:]
            scores.append(float(logprobs[np.arange(len(targets)), targets].sum()))
        answers.append(list(q.options)[int(np.argmax(scores))])
    return len(suite.questions) / (time.perf_counter() - start), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--shots", default="0,3")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    from localmed.planner import GIB, Hardware
    from localmed.runtimes.local import LocalRuntime

    machine = Hardware("cpu", 16 * GIB, 12 * GIB)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or build_gguf(Path(tmp))
        full = load_suite(SHARED / "benchmarks" / "medqa.jsonl", "medqa",
                          limit=args.questions + 5)
        print(f"model {gguf.name}; {args.questions} MedQA questions (4 options)")
        for k in (int(x) for x in args.shots.split(",")):
            suite = Suite("medqa", full.path, full.questions[5: 5 + args.questions])
            shots = full.questions[:k]
            fast = LocalRuntime.load(gguf, n_ctx=2048, threads=args.threads, hardware=machine)
            slow = LocalRuntime.load(gguf, n_ctx=2048, threads=args.threads, hardware=machine)
            qps_fast, a = one_pass(fast, suite, shots)
            qps_slow, b = per_option(slow, suite, shots)
            fast.close()
            slow.close()
            print(f"{k}-shot: one-pass letters {qps_fast:6.2f} q/s, per-option loglikelihood "
                  f"{qps_slow:6.2f} q/s -> {qps_fast / qps_slow:.1f}x "
                  f"(answers agree on {sum(x == y for x, y in zip(a, b, strict=True)) / len(a):.0%})")


if __name__ == "__main__":
    main()
