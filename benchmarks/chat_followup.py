"""A pasted record and follow-up questions in ``localmed chat``: the chat's engine now (one
conversation on the multi-sequence engine that ``serve`` runs, through its client) against the
engine process it ran in before (:mod:`localmed.runtimes.process`, one request at a time over a
pipe; inside it the same engine now, through :class:`~localmed.runtimes.local.LocalRuntime`,
where it was ``llama_cpp.Llama`` when these were first compared), in the same run.

Both are driven through :class:`localmed.chat.ChatSession` (the object the terminal and browser
chat drive), with the same GGUF, template, threads, context and greedy replies of ``--reply``
tokens: a discharge summary of some 1,750 tokens (``benchmarks/followup.py``'s) with a first
question, then the three follow-ups. For each engine and turn: the time to the first piece of
text, and decode tokens/s; the median of ``--rounds`` fresh conversations, the engines
alternating. Decode speed as a user sees it in the terminal is ``benchmarks/decode_overhead.py``.

    python benchmarks/chat_followup.py                  # SmolLM2-135M (from the tests' cache)
    python benchmarks/chat_followup.py --model m.gguf --threads 4 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.followup import QUESTIONS, record

ENGINES = ("slot", "llama")


def open_engine(which: str, model: Path, ctx: int, threads: int) -> Any:
    from localmed import formats
    from localmed.runtimes import batch_process, process
    from localmed.runtimes.slot_runtime import SlotRuntime

    if which == "slot":
        return SlotRuntime(batch_process.BatchClient(
            model, batch_process.BatchOptions(1, ctx, None, threads)))
    return process.open_engine(model, formats.LoadOptions(n_ctx=ctx, threads=threads))


def conversation(runtime: Any, model: Path, case: int, reply: int) -> list[tuple[float, float]]:
    """(first piece s, decode tok/s) of each turn of one fresh conversation."""
    from localmed.chat import ChatSession, resolve_chat_model
    from localmed.registry import Registry

    session = ChatSession.open(resolve_chat_model(str(model), Registry.load()), runtime)
    session.params = dataclasses.replace(session.params, temperature=0.0, max_tokens=reply,
                                         ignore_eos=True)
    turns = []
    for number, question in enumerate(QUESTIONS):
        text = f"{record(case)}\n\n{question}" if number == 0 else question
        started = time.perf_counter()
        first = 0.0
        for _ in session.ask(text):
            first = first or time.perf_counter() - started
        turns.append((first, session.stats.decode_tps))
    return turns


def main() -> int:
    from tests.real_models import smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reply", type=int, default=48, help="tokens of each reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = args.model or smollm2_gguf()
    runtimes = {which: open_engine(which, model, args.ctx, args.threads) for which in ENGINES}
    results: dict[str, list[list[tuple[float, float]]]] = {which: [] for which in ENGINES}
    try:
        for case in range(args.rounds):
            for which in ENGINES if case % 2 == 0 else ENGINES[::-1]:
                results[which].append(conversation(runtimes[which], model, case + 1,
                                                   args.reply))
    finally:
        for runtime in runtimes.values():
            runtime.close()
    print(f"{model.name}: {args.threads} threads, {args.ctx}-token context, {args.reply}-token "
          f"greedy replies, median of {args.rounds} conversations")
    rows = []
    for turn in range(len(QUESTIONS)):
        row: dict[str, Any] = {"turn": turn + 1}
        for which in ENGINES:
            row[f"{which}_first_s"] = statistics.median(r[turn][0] for r in results[which])
            row[f"{which}_decode_tps"] = statistics.median(r[turn][1] for r in results[which])
        rows.append(row)
        print(f"  turn {turn + 1}: first piece {row['slot_first_s']:.2f} s (before "
              f"{row['llama_first_s']:.2f} s, {row['slot_first_s'] / row['llama_first_s']:.2f}x)"
              f"   decode {row['slot_decode_tps']:.1f} tok/s (before "
              f"{row['llama_decode_tps']:.1f}, "
              f"{row['slot_decode_tps'] / row['llama_decode_tps']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
