"""Flash attention off or automatic (llama-server's default), on the engine ``localmed serve``
runs: prefill tokens/s of a pasted record and decode tokens/s after it, one sequence and four.

For each setting, in alternating order, ``--rounds`` times: a fresh engine, one prompt of
``--prompt`` tokens (the follow-up benchmark's record) prefilled whole, then ``--tokens`` tokens
decoded (EOS ignored); then four such prompts at once. The median round is reported, and the
ratio of automatic to off.

    python benchmarks/flash_attention.py                    # SmolLM2-135M (tests' cache)
    python benchmarks/flash_attention.py --model m.gguf --threads 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.followup import QUESTIONS, record


def run(model: Path, flash: bool, streams: int, tokens: int, threads: int,
        gpu_layers: int = 0) -> dict[str, float]:
    from localmed.runtimes.base import GenerationParams
    from localmed.runtimes.batch import BatchEngine
    from localmed.runtimes.messages import Request

    engine = BatchEngine(model, n_parallel=streams, n_ctx=4096 * streams, threads=threads,
                         gpu_layers=gpu_layers, flash_attention=flash)
    try:
        params = GenerationParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        requests = [Request(i, engine.tokenize(f"{record(i + 1)}\n\n{QUESTIONS[0]}"), params,
                            cache_prompt=False) for i in range(streams)]
        start = time.perf_counter()
        done = [outcome.stats for outcome in engine.run(*requests).values()]
        wall = time.perf_counter() - start
    finally:
        engine.close()
    prompt_tokens = sum(s.prompt_tokens for s in done)
    prefill = max(s.prefill_seconds for s in done)
    return {"prefill_tok_s": prompt_tokens / prefill,
            "decode_tok_s": sum(s.generated_tokens for s in done) / (wall - prefill)}


def compare(model: Path, streams: int, tokens: int, threads: int, rounds: int,
            gpu_layers: int = 0) -> dict[str, Any]:
    """Median prefill and decode tokens/s with flash attention off and automatic, and the
    ratios (automatic ÷ off); the settings alternate round by round."""
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for round_ in range(rounds):
        for flash in ((False, True) if round_ % 2 == 0 else (True, False)):
            results[flash].append(run(model, flash, streams, tokens, threads, gpu_layers))
    median = {flash: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
              for flash, runs in results.items()}
    off, auto = median[False], median[True]
    return {"off": off, "auto": auto,
            "prefill_ratio": auto["prefill_tok_s"] / off["prefill_tok_s"],
            "decode_ratio": auto["decode_tok_s"] / off["decode_tok_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-layers", type=int, default=0, help="-1: all")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from tests.real_models import smollm2_gguf

        model = smollm2_gguf()
    print(f"{model.name}: {args.threads} threads, {args.tokens} tokens decoded after the "
          f"record, median of {args.rounds}", flush=True)
    for streams in (1, 4):
        row = compare(model, streams, args.tokens, args.threads, args.rounds, args.gpu_layers)
        off, auto = row["off"], row["auto"]
        print(f"{streams} stream(s): prefill off {off['prefill_tok_s']:.0f} tok/s, auto "
              f"{auto['prefill_tok_s']:.0f} ({row['prefill_ratio']:.2f}x); decode off "
              f"{off['decode_tok_s']:.1f} tok/s, auto {auto['decode_tok_s']:.1f} "
              f"({row['decode_ratio']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
