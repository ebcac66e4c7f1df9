"""Decode speed through localmed's Runtime and the TUI's streaming path, against raw llama.cpp.

All three run on the same GGUF in the same process, greedy, with the same threads and sampling
settings, interleaved and repeated; the median of each is reported with its ratio to raw
``llama_cpp.Llama.create_completion(stream=True)``.

    python benchmarks/decode_overhead.py [--gguf FILE] [--tokens 256] [--repeats 3]

Without --gguf a ~180M-parameter Llama (random weights, the real Llama-2 tokenizer) is built and
converted to Q8_0 first.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

PROMPT = ("### Instruction:\nA 67-year-old man has crushing chest pain for 40 minutes. "
          "What are the first steps?\n\n### Response:\n")


def build_gguf(folder: Path) -> Path:
    from localmed.quants import QUANT_TYPES
    from localmed.registry import Registry
    from quantize.pipeline import resolve_source, run_quantize
    from tests.tiny_models import build_spm_model

    ckpt = build_spm_model(folder / "ckpt", "llama", hidden_size=1024, intermediate_size=2816,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           max_position_embeddings=2048)
    source = resolve_source(str(ckpt), Registry.load())
    out = run_quantize(source, [QUANT_TYPES["Q8_0"]], folder / "gguf",
                       console=Console(file=io.StringIO()))
    return out[0].path


def raw_tps(llm, n: int) -> tuple[float, int]:
    first = None
    count = 0
    for _ in llm.create_completion(PROMPT, max_tokens=n, stream=True, temperature=0.0,
                                   top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        count += 1
        if first is None:
            first = time.perf_counter()
    elapsed = time.perf_counter() - first
    return (count - 1) / elapsed, count


def runtime_tps(runtime, n: int) -> tuple[float, int]:
    from localmed.runtime import GenerationParams

    params = GenerationParams(max_tokens=n, temperature=0.0, repeat_penalty=1.0)
    for _ in runtime.stream(PROMPT, params):
        pass
    stats = runtime.last_stats
    return stats.decode_tps, stats.generated_tokens


def tui_tps(session, n: int) -> tuple[float, int]:
    """Send one message through the app (headless): worker thread → messages → Markdown."""
    from tui.app import LocalmedApp

    app = LocalmedApp(session)

    async def run() -> tuple[float, int]:
        async with app.run_test(size=(100, 30)) as pilot:
            screen = app.screen
            app.session.new_chat()
            screen.query_one("#prompt").value = "A 67-year-old man has crushing chest pain."
            await pilot.press("enter")
            await pilot.pause()
            await screen.workers.wait_for_complete()
            await pilot.pause()
            stats = app.session.stats
            return stats.decode_tps, stats.generated_tokens

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    # llama-cpp-python's own default (half the cores), which leaves the UI a core of its own.
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args()

    import llama_cpp

    from localmed.chat import ChatModel, ChatSession
    from localmed.planner import GIB, Hardware
    from localmed.runtime import GenerationParams
    from localmed.runtime_llama import LlamaCppRuntime
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or build_gguf(Path(tmp))
        n_ctx = 1024
        raw = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=args.threads, verbose=False,
                              seed=0)
        machine = Hardware("cpu", 16 * GIB, 12 * GIB)
        runtime = LlamaCppRuntime.load(gguf, n_ctx=n_ctx, threads=args.threads, hardware=machine)
        tui_runtime = LlamaCppRuntime.load(gguf, n_ctx=n_ctx, threads=args.threads,
                                           hardware=machine)
        session = ChatSession.open(ChatModel(gguf.name, gguf, None, ""), tui_runtime,
                                   template="alpaca")
        session.params = GenerationParams(max_tokens=args.tokens, temperature=0.0,
                                          repeat_penalty=1.0)

        results: dict[str, list[float]] = {"raw llama_cpp": [], "Runtime.stream": [],
                                           "TUI streaming path": []}
        counts: dict[str, int] = {}
        raw_tps(raw, 16)  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("raw llama_cpp", lambda: raw_tps(raw, args.tokens)),
                             ("Runtime.stream", lambda: runtime_tps(runtime, args.tokens)),
                             ("TUI streaming path", lambda: tui_tps(session, args.tokens))):
                tps, count = fn()
                results[name].append(tps)
                counts[name] = count
        base = statistics.median(results["raw llama_cpp"])
        print(f"model: {gguf.name}, {args.tokens} tokens asked, {args.threads} threads, "
              f"median of {args.repeats}")
        for name, values in results.items():
            med = statistics.median(values)
            print(f"{name:20} {med:8.1f} tok/s  ({counts[name]} tokens)  {med / base:.3f}x")
        runtime.close()
        tui_runtime.close()
        raw.close()


if __name__ == "__main__":
    main()
