"""Speculative decoding: ``localmed serve`` with prompt lookup, with a draft model and without
speculation, beside llama-server without speculation and with its n-gram and draft-model modes,
in the same run.

Two kinds of work, as a clinician asks them: copy-heavy (a pasted discharge summary, then "list
her medications and doses as written" or "copy the day-by-day sodium values"), where a reply
repeats the record, and free questions (no record to copy from). For 1 stream and 4 at once:
each client's prompt is sent once first (so every server has it cached, and what is timed is
the reply), then again, greedy, ``--reply`` tokens at most; the figure is the reply's tokens
over the time from its first token to its last (decode speed, summed over the streams), the
median of ``--rounds`` rounds. localmed's ratios are to itself without speculation and to
llama-server's best mode; the greedy replies with speculation are compared with those without.

llama-server runs as users run it (its defaults, the model, the port, the context, the slots and
the threads), once with no speculation and once per ``--spec-type`` mode below; its draft model
is the target's own Q4_0 (``-md``), localmed's the same (``--draft``). The target is SmolLM2-135M-Instruct requantized to Q8_0
(from the tests' Q4_1: the weights are Q4_1's, the size and speed Q8_0's), made once into the
benchmarks' cache, as the draft is.

    python benchmarks/speculative.py
    python benchmarks/speculative.py --streams 1 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.followup import record, streamed
from benchmarks.serve_load import free_port, llama_server, running

COPY_ASKS = ("List her medications on admission with their doses, one per line, exactly as "
             "the record writes them.",
             "Copy the sodium value of every day in the record, one line per day, as written.")
FREE_ASKS = ("Explain how thiazide diuretics can cause hyponatremia, in a short paragraph.",
             "What are the first steps in managing suspected sepsis in the emergency "
             "department?",
             "Describe the warning signs of diabetic ketoacidosis for a patient leaflet.",
             "How should apixaban be managed before elective surgery?")

LLAMA_MODES = {"llama-server": [],
               "llama-server ngram-simple": ["--spec-type", "ngram-simple"],
               "llama-server ngram-map-k": ["--spec-type", "ngram-map-k"],
               "llama-server ngram-mod": ["--spec-type", "ngram-mod"],
               "llama-server draft": ["--spec-type", "draft-simple"]}


def requantized(source: Path, quant: str) -> Path:
    """``source`` requantized to ``quant`` (Q8_0, Q4_0), once, in the benchmarks' cache."""
    from tests.real_models import requantized as make

    return make(source, quant, Path.home() / ".cache" / "localmed-bench")


def prompts(kind: str, streams: int) -> list[list[dict[str, str]]]:
    """Each stream's messages: its own record and ask (copy), or its own question (free)."""
    if kind == "copy":
        return [[{"role": "user", "content": f"{record(case)}\n\n"
                  f"{COPY_ASKS[case % len(COPY_ASKS)]}"}] for case in range(streams)]
    return [[{"role": "user", "content": FREE_ASKS[case % len(FREE_ASKS)]}]
            for case in range(streams)]


def reply(url: str, served: str, messages: list[dict[str, str]], tokens: int
          ) -> tuple[float, float, str, int]:
    """(when its first token came, when its last did, its text, its tokens) of one streamed
    greedy reply."""
    body = {"model": served, "messages": messages, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    first, last, text, usage = streamed(url, body)
    return first or 0.0, last or 0.0, text, int(usage.get("completion_tokens", 0))


def decode_rate(url: str, kind: str, streams: int, tokens: int) -> tuple[float, list[str]]:
    """Tokens a second after each reply's first token, summed over ``streams`` at once; the
    replies."""
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    asks = prompts(kind, streams)
    for messages in asks:  # cached: what is timed is the reply
        reply(url, served, messages, 1)
    results: list[Any] = [None] * streams

    def client(i: int) -> None:
        results[i] = reply(url, served, asks[i], tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rate = sum((n - 1) / (last - first) for first, last, _, n in results if last > first)
    return rate, [text for _, _, text, _ in results]


def command(which: str, model: Path, draft: Path, streams: int, ctx: int, threads: int,
            port: int) -> tuple[list[str], dict[str, str] | None]:
    if which.startswith("localmed"):
        mode = {"localmed without": ["--no-speculation"],
                "localmed draft": ["--draft", str(draft)]}.get(which, ["--speculation"])
        return ([sys.executable, "-m", "localmed", "serve", str(model), "--port", str(port),
                 "--parallel", str(streams), "--ctx", str(ctx * streams), "--threads",
                 str(threads), "--template", "chatml", *mode], None)
    server = llama_server()
    extra = LLAMA_MODES[which] + (["-md", str(draft)] if which.endswith("draft") else [])
    return ([str(server), "-m", str(model), "--port", str(port), "-np", str(streams), "-c",
             str(ctx * streams), "-t", str(threads), "-tb", str(threads), "--no-webui",
             "--chat-template-file", str(chatml_template()), *extra],
            {"LD_LIBRARY_PATH": str(server.parent)})


def chatml_template() -> Path:
    """SmolLM2's own template is ChatML with a default system prompt; both servers get plain
    ChatML, so the prompts are the same tokens."""
    path = Path.home() / ".cache" / "localmed-bench" / "chatml.jinja"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                        "<|im_start|>assistant\n{% endif %}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="the target GGUF (default: SmolLM2-135M-"
                        "Instruct at Q8_0, made from the tests' Q4_1)")
    parser.add_argument("--draft", type=Path, help="llama-server's draft model (default: the "
                        "target's own Q4_0)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--reply", type=int, default=192, help="tokens of each greedy reply")
    parser.add_argument("--ctx", type=int, default=4096, help="context per stream")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", nargs="+", default=["localmed", "localmed draft",
                                                          "localmed without", *LLAMA_MODES])
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    from tests.real_models import smollm2_gguf

    source = smollm2_gguf()
    model = args.model or requantized(source, "Q8_0")
    draft = args.draft or requantized(source, "Q4_0")
    print(f"{model.name} (draft {draft.name}): greedy replies of {args.reply} tokens at most, "
          f"{args.threads} threads, medians of {args.rounds} round(s)", flush=True)
    rows = []
    for streams in args.streams:
        rates: dict[tuple[str, str], list[float]] = {}
        texts: dict[tuple[str, str], list[str]] = {}
        for round_ in range(args.rounds):
            for which in (args.servers if round_ % 2 == 0 else args.servers[::-1]):
                port = free_port()
                cmd, env = command(which, model, draft, streams, args.ctx, args.threads, port)
                with running(cmd, port, env) as url:
                    for kind in ("copy", "free"):
                        rate, replies = decode_rate(url, kind, streams, args.reply)
                        rates.setdefault((which, kind), []).append(rate)
                        texts[(which, kind)] = replies
        for kind in ("copy", "free"):
            row: dict[str, Any] = {"streams": streams, "kind": kind}
            for which in args.servers:
                row[which] = statistics.median(rates[(which, kind)])
            theirs = max((w for w in args.servers if w.startswith("llama-server")),
                         key=lambda w: row[w], default=None)
            line = f"{streams} stream(s), {kind}: " + ", ".join(
                f"{w} {row[w]:.1f}" for w in args.servers) + " tok/s"
            for mode in ("localmed", "localmed draft"):
                if mode not in row:
                    continue
                key = mode.replace("localmed", "").strip() or "lookup"
                if "localmed without" in row:
                    row[f"{key}_ratio_without"] = row[mode] / row["localmed without"]
                    same = sum(a == b for a, b in zip(texts[(mode, kind)],
                                                      texts[("localmed without", kind)],
                                                      strict=True))
                    row[f"{key}_same_replies"] = f"{same}/{streams}"
                    line += (f"; {mode} {row[f'{key}_ratio_without']:.2f}x without "
                             f"speculation (greedy replies the same {same} of {streams})")
                if theirs is not None:
                    row["best_llama_server"] = theirs
                    row[f"{key}_ratio_best"] = row[mode] / row[theirs]
                    line += f", {row[f'{key}_ratio_best']:.2f}x {theirs} (its best)"
            rows.append(row)
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "draft": str(draft),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
