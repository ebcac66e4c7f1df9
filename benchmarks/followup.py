"""A pasted patient record and follow-up questions: ``localmed serve`` against llama-server with
its default settings, in the same run.

Each conversation is what a clinician does in Open WebUI: a long record (a discharge summary of
some 750 words and 1,750 tokens, its own patient in each conversation) with a first question,
then short follow-ups; like every OpenAI client, the whole history goes with each turn.
Replies are greedy and ``--reply`` tokens long. For 1 conversation, 4 at once and 8 at once (all on ``--parallel``
4 slots): the time to the first token of turn 1 (the record's prefill) and of the later turns
(median and max), and the wall time; localmed's ratio to llama-server beside them. With
``--rounds R`` each configuration runs R times, the servers alternating, and each figure is the
median of its rounds.

llama-server runs as users run it: only the model, the port, the context and the slots (``-c``
and ``-np``, the same as localmed's ``--ctx`` and ``--parallel``), and the threads; flash
attention, its prompt cache and its host-memory cache left at their defaults. It is built once
from the pinned llama-cpp-python source archive by ``serve_load.llama_server``.

``--agreement`` then sends every turn again, to the server that answered it, with
``cache_prompt: false`` (the whole prompt prefilled alone) and counts the greedy replies that
differ: what each server's prompt cache and batching change (README, "what the prompt cache
changes").

    python benchmarks/followup.py                      # SmolLM2-135M (from the tests' cache)
    python benchmarks/followup.py --model qwen2.5-0.5b.gguf --conversations 1 4 --json out.json
    python benchmarks/followup.py --model gemma-3-270m-q4_k_m.gguf --template gemma
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import at_once, free_port, llama_server, running

SYSTEM = ("You are a clinical assistant. Answer from the record the clinician pasted; say when "
          "the record does not say.")
QUESTIONS = ("Summarize this patient's active problems.",
             "Which of her medications could explain the hyponatremia?",
             "What follow-up labs would you order before discharge?",
             "Draft one sentence for the handover to the night team.")
FIRST_NAMES = ("Maria", "Anna", "Ruth", "Helen", "Joan", "Grace", "Irene", "Clara", "Edith",
               "Nora")
DRUGS = ("furosemide 40 mg daily", "sertraline 50 mg daily", "metformin 1 g twice daily",
         "lisinopril 10 mg daily", "atorvastatin 40 mg nightly", "omeprazole 20 mg daily",
         "hydrochlorothiazide 25 mg daily", "apixaban 5 mg twice daily",
         "carbamazepine 200 mg twice daily", "levothyroxine 75 mcg daily")


def record(case: int) -> str:
    """A discharge summary (some 750 words, 1,750 SmolLM2 tokens: numbers cost many), the same
    each run for a case number, its own patient from the first line (no two conversations
    share more than the system prompt)."""
    rng = random.Random(case)
    name = f"{rng.choice(FIRST_NAMES)} {chr(65 + case % 26)}."
    lines = [f"Patient {case:04d}: {name}, {rng.randint(61, 89)}-year-old woman, admitted with "
             "confusion, nausea and two falls at home.",
             "History: type 2 diabetes, hypertension, atrial fibrillation, depression, "
             "hypothyroidism, chronic kidney disease stage 3a.",
             "Medications on admission: " + "; ".join(rng.sample(DRUGS, 7)) + "."]
    for day in range(1, 17):
        na, k = rng.randint(119, 134), rng.uniform(3.1, 5.2)
        cr, glu = rng.uniform(0.9, 1.8), rng.randint(88, 260)
        lines.append(
            f"Day {day}: sodium {na} mmol/L, potassium {k:.1f} mmol/L, creatinine {cr:.2f} "
            f"mg/dL, glucose {glu} mg/dL. Blood pressure {rng.randint(102, 168)}/"
            f"{rng.randint(58, 96)} mmHg, heart rate {rng.randint(58, 118)} (irregular), "
            f"temperature {rng.uniform(36.1, 38.3):.1f} C. She was "
            f"{rng.choice(['more alert', 'drowsy but rousable', 'oriented to person only', 'calm and oriented'])}"
            f" on the morning round; fluid balance {rng.randint(-900, 700):+d} mL. "
            f"{rng.choice(['Fluid restriction to 1.2 L continued.', 'Urine osmolality sent.', 'Physiotherapy assessed gait; walking frame advised.', 'Family updated by telephone.', 'Diabetes team adjusted insulin.'])}")
    lines.append("Plan at discharge: review sodium in 48 hours, medication reconciliation with "
                 "the general practitioner, falls clinic referral.")
    return "\n".join(lines)


def streamed(url: str, body: dict[str, Any]
             ) -> tuple[float | None, float | None, str, dict[str, Any]]:
    """One streamed chat completion (``body`` asks for it): when its first piece of text came
    and when its last did (``time.monotonic``; None: no text), its text and its usage."""
    first = last = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                if text := (choice.get("delta") or {}).get("content"):
                    last = time.monotonic()
                    first = first or last
                    parts.append(text)
    return first, last, "".join(parts), usage


def first_token(url: str, served: str, messages: list[dict[str, str]], reply: int,
                cache: bool = True) -> tuple[float, str, dict[str, Any]]:
    """(seconds to the first token, the reply, usage) of one streamed greedy reply."""
    body = {"model": served, "messages": messages, "max_tokens": reply, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": cache}
    start = time.monotonic()
    first, _, text, usage = streamed(url, body)
    return (first if first is not None else time.monotonic()) - start, text, usage


def conversations(url: str, count: int, turns: int, reply: int) -> dict[str, Any]:
    """``count`` conversations at once, each ``turns`` turns; their timings and transcripts."""
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    firsts: list[float] = []
    later: list[float] = []
    cached: list[int] = []
    transcripts: list[list[tuple[list[dict[str, str]], str]]] = [[] for _ in range(count)]
    failures: list[str] = []
    go = threading.Barrier(count)

    def talk(index: int) -> None:
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{record(index + 1)}\n\n{QUESTIONS[0]}"}]
        go.wait()
        try:
            for turn in range(turns):
                seconds, text, usage = first_token(url, served, messages, reply)
                (later if turn else firsts).append(seconds)
                if turn:
                    details = usage.get("prompt_tokens_details") or {}
                    cached.append(int(details.get("cached_tokens") or 0))
                transcripts[index].append(([dict(m) for m in messages], text))
                messages += [{"role": "assistant", "content": text},
                             {"role": "user", "content": QUESTIONS[(turn + 1) % len(QUESTIONS)]}]
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    begin = at_once(talk, range(count))
    if failures:
        raise RuntimeError(f"{len(failures)} conversations failed: {failures[0]}")
    return {"turn1_median_s": statistics.median(firsts), "later_median_s":
            statistics.median(later), "later_max_s": max(later),
            "wall_s": time.monotonic() - begin,
            "cached_median": statistics.median(cached) if cached else 0,
            "transcripts": transcripts}


def agreement(url: str, transcripts: list[list[tuple[list[dict[str, str]], str]]],
              reply: int) -> tuple[int, int]:
    """(replies that differ, replies) when each turn is asked again with the whole prompt
    prefilled (``cache_prompt: false``), one at a time."""
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    turns = [turn for conversation in transcripts for turn in conversation]
    differ = sum(first_token(url, served, messages, reply, cache=False)[1] != text
                 for messages, text in turns)
    return differ, len(turns)


def command(which: str, model: Path, slots: int, ctx: int, threads: int, port: int,
            template: str | None = None) -> list[str]:
    """A server's command line; ``template``: a built-in template both know by that name, for
    a GGUF that embeds none."""
    if which == "localmed":
        return [sys.executable, "-m", "localmed", "serve", str(model), "--port", str(port),
                "--parallel", str(slots), "--ctx", str(ctx * slots), "--threads",
                str(threads)] + (["--template", template] if template else [])
    return [str(llama_server()), "-m", str(model), "--port", str(port), "-np", str(slots),
            "-c", str(ctx * slots), "-t", str(threads), "-tb", str(threads)] + \
        (["--no-jinja", "--chat-template", template] if template else [])  # (built-in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: SmolLM2-135M-Instruct "
                        "from the tests' cache)")
    parser.add_argument("--conversations", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4, help="the first and the follow-ups")
    parser.add_argument("--reply", type=int, default=48, help="tokens of each greedy reply")
    parser.add_argument("--ctx", type=int, default=4096, help="context per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=1, help="run each configuration this "
                        "many times, the servers alternating, and report each figure's median "
                        "(one run varies by ~15%% on a small shared machine)")
    parser.add_argument("--agreement", action="store_true", help="then ask each server's "
                        "turns again with the cache off and count the replies that differ")
    parser.add_argument("--template", help="a template both servers have built in, for a GGUF "
                        "without one (gemma for Gemma 3 270M, a base model)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from tests.real_models import smollm2_gguf

        model = smollm2_gguf()
    print(f"{model.name}: {args.turns} turns a conversation, {args.reply}-token greedy replies, "
          f"{args.slots} slots of {args.ctx} tokens, {args.threads} threads, medians of "
          f"{args.rounds} round(s)", flush=True)
    rows = []
    for count in args.conversations:
        row: dict[str, Any] = {"conversations": count}
        runs: dict[str, list[dict[str, Any]]] = {"llama-server": [], "localmed": []}
        for round_ in range(args.rounds):  # the servers alternate, so drift hits both alike
            for which in sorted(runs, reverse=round_ % 2 == 1):
                port = free_port()
                cmd = command(which, model, args.slots, args.ctx, args.threads, port,
                              args.template)
                env = {"LD_LIBRARY_PATH": str(Path(cmd[0]).parent)} \
                    if which == "llama-server" else None
                with running(cmd, port, env) as url:
                    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
                    first_token(url, served, [{"role": "user", "content": "Hi"}], 4)  # pages in
                    result = conversations(url, count, args.turns, args.reply)
                    if args.agreement:
                        result["differ"], result["replies"] = \
                            agreement(url, result["transcripts"], args.reply)
                del result["transcripts"]
                runs[which].append(result)
        for which, results in runs.items():  # each figure's median over the rounds
            row[which] = {key: statistics.median(r[key] for r in results)
                          for key in results[0]}
        ours, theirs = row["localmed"], row["llama-server"]
        for key in ("turn1_median_s", "later_median_s", "wall_s"):
            row[f"ratio_{key}"] = ours[key] / theirs[key]
        rows.append(row)
        print(f"{count} conversation(s): first token of turn 1 {ours['turn1_median_s']:.2f} s "
              f"vs {theirs['turn1_median_s']:.2f} s ({row['ratio_turn1_median_s']:.2f}x); "
              f"later turns {ours['later_median_s']:.2f} s (max {ours['later_max_s']:.2f}) vs "
              f"{theirs['later_median_s']:.2f} s (max {theirs['later_max_s']:.2f}) "
              f"({row['ratio_later_median_s']:.2f}x); wall {ours['wall_s']:.1f} s vs "
              f"{theirs['wall_s']:.1f} s; localmed cached a median {ours['cached_median']:.0f} "
              "tokens of a follow-up's prompt"
              + (f"; greedy replies that differ asked again alone with the cache off: localmed "
                 f"{ours['differ']} of {ours['replies']}, llama-server {theirs['differ']} of "
                 f"{theirs['replies']}" if args.agreement else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
