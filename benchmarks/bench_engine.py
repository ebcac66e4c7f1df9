"""What bench would pay for running its model in the engine process: letter scoring's
``next_logits`` calls in-process against through the engine's pipe, on the same GGUF, in one run.

Each call evaluates a question (a distinct ~150-token prompt) and returns the whole
vocabulary's logits — the array that would cross the pipe for every question.

    python benchmarks/bench_engine.py [--gguf FILE] [--questions 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = ("A {age}-year-old presents with fever, productive cough and pleuritic chest pain for "
            "three days. Temperature 38.{d} C, respiratory rate 24, oxygen saturation 93% on "
            "room air; crackles at the right base. Which is the most appropriate next step? "
            "A. Chest radiograph B. CT pulmonary angiogram C. Sputum culture only "
            "D. Discharge with oral antibiotics E. Bronchoscopy\nAnswer:")


def per_question(runtime, questions: int) -> float:
    prompts = [runtime.tokenize(QUESTION.format(age=20 + i, d=i % 10)) for i in range(questions)]
    runtime.next_logits(prompts[0])  # warm-up
    start = time.perf_counter()
    for tokens in prompts[1:]:
        runtime.next_logits(tokens)
    return (time.perf_counter() - start) / (len(prompts) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from localmed.formats import LoadOptions, load_runtime
    from localmed.runtimes.process import open_engine

    gguf = args.gguf
    if gguf is None:
        from tests.real_models import smollm2_gguf

        gguf = smollm2_gguf()
    options = LoadOptions(n_ctx=512)
    local, engine = load_runtime(gguf, options), open_engine(gguf, options)
    try:
        runs = {"in-process": [], "engine": []}
        for _ in range(args.repeats):
            runs["in-process"].append(per_question(local, args.questions))
            runs["engine"].append(per_question(engine, args.questions))
    finally:
        local.close()
        engine.close()
    inproc, eng = (statistics.median(runs[k]) for k in ("in-process", "engine"))
    print(f"{gguf.name}: {local.info.n_parameters / 1e6:.0f}M parameters, "
          f"{args.questions - 1} questions, median of {args.repeats}")
    print(f"in-process {inproc * 1e3:.1f} ms/question, engine {eng * 1e3:.1f} ms/question: "
          f"engine/in-process {eng / inproc:.2f}x")


if __name__ == "__main__":
    main()
