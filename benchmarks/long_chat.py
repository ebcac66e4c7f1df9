"""A chat that outgrows its context, as a clinician has it: a pasted record, then many short
follow-ups, in ``localmed chat`` in a real terminal (tmux), read off the screen.

For each turn: the seconds from Enter to the reply's first text on the screen, and to the end of
the reply (the status line no longer says "generating…"). Then the same conversation driven
through :class:`localmed.chat.ChatSession` (what the terminal and browser chat drive) on the
same engine, for what a screen does not show: the prompt's tokens, the tokens the slot cache
kept, the turns left out, and whether the pasted record is still in the prompt.

What it shows: with turns dropped one pair at a time from the front, each turn past the context
re-fits the prompt from scratch, the record goes first, and the cache misses; fitted in one pass,
dropped in blocks after the pinned first exchange, a late turn costs what an early one does.

    python benchmarks/long_chat.py                      # SmolLM2-135M (from the tests' cache)
    python benchmarks/long_chat.py --model m.gguf --ctx 1024 --turns 40 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.followup import record

QUESTIONS = ("What is the latest sodium?", "Any falls?", "Which drug could lower sodium?",
             "Is the heart rate regular?", "What should the GP check?", "Summarize in one line.")
RECORD_LINES = 7
"""The record's first lines: some 500 SmolLM2 tokens, half a 1,024-token context."""


def pasted() -> str:
    """The record, on one line (the chat's input box sends on a newline), and a question."""
    return " ".join(record(0).splitlines()[:RECORD_LINES]) + " What brought her in?"


def question(turn: int) -> str:
    return f"({turn}) {QUESTIONS[turn % len(QUESTIONS)]}"


class Screen:
    def __init__(self, command: str) -> None:
        self.tmux = ["tmux", "-L", f"long-chat-{os.getpid()}"]
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "t", "-x", "120", "-y", "40",
                        command], check=True)

    def text(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "t"],
                              capture_output=True, text=True).stdout

    def status(self) -> str:
        rows = self.text().splitlines()
        return rows[-1] if rows else ""

    def log(self) -> list[str]:
        """The conversation's rows (above the input box), their left half: notifications show
        at the right."""
        rows = self.text().splitlines()
        box = next((i for i, row in enumerate(rows) if row.startswith("▊▔")), len(rows))
        return [row[:50] for row in rows[:box]]

    def send(self, text: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", "-l", text], check=True)
        subprocess.run([*self.tmux, "send-keys", "-t", "t", "Enter"], check=True)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def until(condition: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def terminal(model: Path, ctx: int, turns: int, reply: int) -> list[tuple[float, float]]:
    """(first text s, whole turn s) of each turn in ``localmed chat`` under tmux."""
    data = tempfile.mkdtemp(prefix="localmed-long-chat-")
    command = (f"LOCALMED_DATA_DIR={shlex.quote(data)} {shlex.quote(sys.executable)} -m localmed "
               f"chat {shlex.quote(str(model))} --ctx {ctx} --max-tokens {reply} "
               "--temperature 0")
    screen = Screen(command)
    out = []
    try:
        until(lambda: "tok/s" in screen.status(), 120, "the chat to start")
        for turn in range(turns):
            asked = pasted() if turn == 0 else question(turn)
            screen.send(asked)
            started = time.perf_counter()
            until(lambda: "generating" in screen.status(), 30, "the reply to start")
            empty = screen.log()  # the question and an empty reply under it
            until(lambda empty=empty: screen.log() != empty, 120, "the reply's first text")
            first = time.perf_counter() - started
            until(lambda: "generating" not in screen.status(), 300, "the reply to end")
            out.append((first, time.perf_counter() - started))
    finally:
        screen.close()
    return out


def session(model: Path, ctx: int, turns: int, reply: int) -> list[dict[str, Any]]:
    """Each turn's first-piece seconds, prompt and cached tokens, dropped turns and whether the
    record is in the prompt, through ChatSession on the chat's engine."""
    from localmed.chat import ChatSession, open_runtime, resolve_chat_model
    from localmed.registry import Registry

    chat_model = resolve_chat_model(str(model), Registry.load())
    runtime = open_runtime(chat_model, n_ctx=ctx)
    chat = ChatSession.open(chat_model, runtime)
    chat.params = dataclasses.replace(chat.params, temperature=0.0, max_tokens=reply)
    marker = record(0).splitlines()[0][:40]
    out = []
    try:
        for turn in range(turns):
            started = time.perf_counter()
            first = 0.0
            for _ in chat.ask(pasted() if turn == 0 else question(turn)):
                first = first or time.perf_counter() - started
            prompt = chat.last_prompt
            assert prompt is not None
            out.append({"first": first, "prompt_tokens": prompt.tokens,
                        "cached_tokens": chat.stats.cached_tokens,
                        "dropped": prompt.dropped_turns, "record_kept": marker in prompt.text})
    finally:
        chat.close()
    return out


def main() -> int:
    from tests.real_models import smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--reply", type=int, default=32, help="longest reply, tokens")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = args.model or smollm2_gguf()
    shown = terminal(model, args.ctx, args.turns, args.reply)
    driven = session(model, args.ctx, args.turns, args.reply)
    print(f"{model.name}, --ctx {args.ctx}, replies of at most {args.reply} tokens")
    print(f"{'turn':>4} {'first s':>8} {'turn s':>7} | {'first s':>8} {'prompt':>6} "
          f"{'cached':>6} {'dropped':>7} record")
    for number, ((first, whole), row) in enumerate(zip(shown, driven, strict=True), 1):
        print(f"{number:>4} {first:8.3f} {whole:7.3f} | {row['first']:8.3f} "
              f"{row['prompt_tokens']:>6} {row['cached_tokens']:>6} {row['dropped']:>7} "
              f"{'kept' if row['record_kept'] else 'GONE'}")
    base = statistics.median(first for first, _ in shown[1:6])
    overflow = [i for i, row in enumerate(driven) if row["dropped"]]
    late = [shown[i][0] for i in overflow] or [0.0]
    print(f"terminal, first text: turns 2-6 median {base:.3f} s; turns past the context "
          f"({len(overflow)}) median {statistics.median(late):.3f} s, worst {max(late):.3f} s "
          f"({max(late) / base:.2f}x turn 2-6)")
    hits = sum(row["cached_tokens"] >= row["prompt_tokens"] // 2 for row in driven[1:])
    print(f"the cache held half the prompt or more on {hits} of "
          f"{len(driven) - 1} later turns; the record is "
          f"{'in' if driven[-1]['record_kept'] else 'NOT in'} the last prompt")
    if args.json:
        args.json.write_text(json.dumps({"terminal": shown, "session": driven}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
