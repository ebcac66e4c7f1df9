"""What a drafted token costs on this machine: the time of one ``llama_decode`` of a sequence's
next token and k drafted tokens after it, against the next token alone, after a context of
``--context`` tokens. That cost bounds what speculative decoding can gain here: a draft of k
tokens, each taken with probability a, gives 1 + a + … + a^k tokens for a step that costs
1 + k·cost; the best k's ratio is printed for a = 0.6, 0.8 and 0.95 (a reply copying a
record).

Decoding bound by memory (a 7B on a laptop: every step reads ~4 GB of weights) checks several
tokens for little more than one; decoding bound by compute (few cores) pays nearly a step per
token, and no draft can pay. Run where the models run.

    python benchmarks/draft_cost.py
    python benchmarks/draft_cost.py --model model.gguf --context 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_costs(path: Path, context: int, sizes: list[int], repeats: int, threads: int
               ) -> tuple[float, dict[int, float]]:
    """The median time of a one-token step, and each draft size's cost per drafted token (in
    steps), on the multi-sequence engine as serve loads it."""
    import logging

    import llama_cpp

    from localmed.runtimes.batch import BatchEngine

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # (its load messages)

    engine = BatchEngine(path, n_parallel=1, n_ctx=max(4096, context + 256), threads=threads,
                         flash_attention=True)
    try:
        n_vocab = engine.vocab.n_vocab
        record = [(5 + 7 * i) % (n_vocab - 5) + 5 for i in range(context)]
        engine.next_logits(record)
        times: dict[int, float] = {}
        for k in [0, *sizes]:
            runs = []
            for rep in range(repeats + 2):  # (the first two warm up)
                for i in range(1 + k):
                    engine._put(i, (11 + rep + 3 * i) % (n_vocab - 5) + 5, 0, True)
                engine._batch.n_tokens = 1 + k
                started = time.perf_counter()
                if llama_cpp.llama_decode(engine._ctx, engine._batch) != 0:
                    raise RuntimeError(f"llama_decode failed with {1 + k} tokens")
                runs.append(time.perf_counter() - started)
                engine.cells.cut(0, context)
            times[k] = statistics.median(runs[2:])
    finally:
        engine.close()
    base = times[0]
    return base, {k: (times[k] - base) / base / k for k in sizes}


def best_gain(cost: dict[int, float], acceptance: float) -> tuple[int, float]:
    """The draft size with the most tokens a second (0: none pays), and that ratio to no
    draft."""
    gains = {0: 1.0} | {k: sum(acceptance ** i for i in range(k + 1)) / (1 + k * c)
                        for k, c in cost.items()}
    k = max(gains, key=gains.__getitem__)
    return k, gains[k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="GGUF (default: SmolLM2 at "
                        "Q8_0 and serve_load.py's 1B Llama at Q4_K_M, made once)")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    models = args.model
    if not models:
        from benchmarks.serve_load import large_model
        from benchmarks.speculative import requantized
        from tests.real_models import smollm2_gguf

        models = [requantized(smollm2_gguf(), "Q8_0"), large_model()]
    print(f"{args.threads} threads, after {args.context} tokens; cost: what a drafted token "
          "adds to a step, in steps")
    for path in models:
        base, cost = step_costs(path, args.context, args.sizes, args.repeats, args.threads)
        costs = ", ".join(f"{k}: {c:.2f}" for k, c in cost.items())
        best = {a: best_gain(cost, a) for a in (0.6, 0.8, 0.95)}
        gains = ", ".join(f"a={a}: {gain:.2f}x (k={k})" for a, (k, gain) in best.items())
        print(f"{path.name}: step {base * 1000:.1f} ms; cost by draft size {costs}; best "
              f"gain {gains}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
