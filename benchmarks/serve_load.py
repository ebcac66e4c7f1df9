"""Several clinicians at once: ``localmed serve --parallel N`` against llama.cpp's own
``llama-server -np N``, in the same run.

Both serve the same GGUF with the same threads, context per stream and prompts (each client's
numbered, as different clinicians' differ; the same again in each round and its warm-up, as
real clients repeat a system prompt, so each server's prompt cache does what it does); N clients
each stream a fixed number of tokens (``ignore_eos``, greedy) from ``/v1/completions`` at once. For
each N: aggregate tokens/s (every stream's tokens ÷ the time from the first request to the last
token: prefills included), time to first token (median and max over the streams), and each
stream's decode rate from its first token to its last (median; what a raw decode speed
compares with), the ratio of localmed to llama-server beside them. Each configuration runs
``--rounds`` times, the servers alternating, and the median round is reported.

llama-server is built once from the pinned llama-cpp-python source archive (the same llama.cpp
localmed runs), with ``scripts/install.sh``'s CMake options plus the server, into
``~/.cache/localmed-bench`` (downloading the archive from PyPI the first time), and runs with
its default settings (flash attention ``auto``, its prompt cache on), as users run it.

    python benchmarks/serve_load.py                       # SmolLM2-135M (from tests' cache)
    python benchmarks/serve_load.py --model big.gguf --streams 1 4 8 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
CACHE = Path(os.environ.get("LOCALMED_BENCH_CACHE", Path.home() / ".cache" / "localmed-bench"))
PROMPT = ("A 67-year-old man presents to the emergency department with crushing chest pain "
          "radiating to the left arm, diaphoresis and shortness of breath. Describe the workup.")


# --- llama-server, built once ---------------------------------------------------------------------

def cmake_args() -> list[str]:
    """scripts/install.sh's options (through the same shell file), plus the server."""
    line = subprocess.run(["bash", "-c", ". scripts/llama-cmake-args.sh; llama_cmake_args"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [*line, "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
            "-DCMAKE_BUILD_TYPE=Release"]


def llama_server() -> Path:
    return llama_tool("llama-server")


def llama_tool(target: str) -> Path:
    """One of llama.cpp's programs (``llama-server``, ``llama-mtmd-cli``), built once from the
    pinned llama-cpp-python source archive with scripts/install.sh's options, and cached."""
    from localmed.quantize.llama_cpp_source import extract

    args = cmake_args()
    key = hashlib.sha256(" ".join(args).encode()).hexdigest()[:12]
    binary = CACHE / f"{target}-{VERSION}-{key}" / "bin" / target
    if binary.is_file():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.is_file():
        print(f"downloading llama-cpp-python {VERSION}'s source archive (PyPI)…", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "-d",
                        str(CACHE)], check=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        print(f"building {target} from it ({' '.join(args)})…", flush=True)
        with tarfile.open(archive) as tar:
            extract(tar, Path(work))
        source = Path(work) / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
        build = Path(work) / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *args], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", target, "-j",
                        str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
        target_dir = binary.parent.parent
        shutil.rmtree(target_dir, ignore_errors=True)
        (target_dir / "bin").mkdir(parents=True)
        for built in (build / "bin").iterdir():  # the binary and the shared libraries beside it
            shutil.copy2(built, target_dir / "bin" / built.name)
    return binary


def random_llama(folder: Path, **size: int) -> int:
    """A Llama checkpoint of random bfloat16 weights (seed 0) in ``folder``, with the demo
    model's 512-token SentencePiece tokenizer; ``size``: LlamaConfig's width, depth and heads.
    Returns its parameter count. benchmarks/gpu_check.py makes its model with it too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from localmed.quantize.demo_model import build_checkpoint

    with tempfile.TemporaryDirectory() as work:
        tokenizer = build_checkpoint(Path(work) / "tokenizer", steps=1)
        config = LlamaConfig(vocab_size=512, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False, **size)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.to(torch.bfloat16).save_pretrained(folder)
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer) / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def large_model() -> Path:
    """A ~1B Llama of random weights (TinyLlama's width, 16 layers; the demo's 512-token
    vocabulary), quantized to Q4_K_M by ``localmed quantize``, made once into the cache."""
    gguf = CACHE / "serve-load-1b.Q4_K_M.gguf"
    if gguf.is_file():
        return gguf
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        folder = Path(work) / "checkpoint"
        random_llama(folder, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=4,
                     max_position_embeddings=4096)
        subprocess.run([sys.executable, "-m", "localmed", "quantize", str(folder), "--quant",
                        "Q4_K_M", "--name", "serve-load-1b", "--out", str(CACHE)], check=True)
    return gguf


# --- the servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[str]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited {proc.returncode}: "
                                   f"{proc.stderr.read()[-2000:] if proc.stderr else ''}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200 and \
                        httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[0]} did not answer in 300 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_command(which: str, model: Path, streams: int, ctx: int, threads: int,
                  port: int) -> list[str]:
    if which == "localmed":
        return [sys.executable, "-m", "localmed", "serve", str(model), "--port", str(port),
                "--parallel", str(streams), "--ctx", str(ctx * streams), "--threads",
                str(threads), "--queue", "0"]
    return [str(llama_server()), "-m", str(model), "--port", str(port), "-np", str(streams),
            "-c", str(ctx * streams), "-t", str(threads), "-tb", str(threads), "--no-webui"]


def at_once(target: Callable[[int], None], indices: Iterable[int]) -> float:
    """``target(i)`` for each index, each in a thread of its own, all started together and
    joined; when they started."""
    threads = [threading.Thread(target=target, args=(i,)) for i in indices]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return begin


def load(url: str, streams: int, tokens: int) -> dict[str, float]:
    """``streams`` clients at once, each streaming ``tokens`` tokens. Each client's prompt
    begins with its own case number, as different clinicians' do, and is the same each time
    this is called: a server's prompt cache may skip the prefill of a repeat, as it would for
    a client that repeats its system prompt."""
    firsts: list[float] = []
    counts: list[int] = []
    ends: list[float] = []
    decodes: list[float] = []  # each stream's tokens/s from its first token to its last
    go = threading.Barrier(streams)
    failures: list[str] = []
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

    def client(case: int) -> None:
        body = {"model": served, "prompt": f"Case {case}. {PROMPT}", "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        go.wait()
        start = time.monotonic()
        first, generated = None, 0
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0].get("text") and first is None:
                        first = time.monotonic() - start
                    if event.get("usage"):
                        generated = event["usage"]["completion_tokens"]
        except httpx.HTTPStatusError as exc:
            exc.response.read()
            failures.append(f"{exc.response.status_code}: {exc.response.text[:300]}")
            return
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        end = time.monotonic()
        ends.append(end)
        firsts.append(first if first is not None else float("nan"))
        counts.append(generated)
        if first is not None and generated > 1:
            decodes.append((generated - 1) / (end - start - first))

    begin = at_once(client, range(streams))
    if failures:
        raise RuntimeError(f"{len(failures)} streams failed: {failures[0]}")
    if any(c != tokens for c in counts):
        raise RuntimeError(f"streams generated {counts}, not {tokens} each")
    return {"tok_per_s": sum(counts) / (max(ends) - begin),
            "ttft_median_s": statistics.median(firsts), "ttft_max_s": max(firsts),
            "stream_decode_tok_per_s": statistics.median(decodes) if decodes else float("nan")}


def measure(model: Path, streams: list[int], tokens: int, ctx: int, threads: int,
            rounds: int) -> list[dict[str, object]]:
    rows = []
    for n in streams:
        results: dict[str, list[dict[str, float]]] = {"localmed": [], "llama-server": []}
        for round_ in range(rounds):
            order = ["localmed", "llama-server"] if round_ % 2 == 0 else \
                ["llama-server", "localmed"]
            for which in order:
                port = free_port()
                command = serve_command(which, model, n, ctx, threads, port)
                # llama-server's shared libraries lie beside it (its RUNPATH names the build
                # folder, gone once it is copied)
                env = {"LD_LIBRARY_PATH": str(Path(command[0]).parent)} \
                    if which == "llama-server" else None
                with running(command, port, env) as url:
                    load(url, n, min(tokens, 16))  # warm-up: pages in the weights
                    results[which].append(load(url, n, tokens))
        row: dict[str, object] = {"streams": n}
        for which, runs in results.items():
            runs.sort(key=lambda r: r["tok_per_s"])
            row[which] = runs[len(runs) // 2]
        ours, theirs = row["localmed"], row["llama-server"]
        row["ratio"] = ours["tok_per_s"] / theirs["tok_per_s"]  # type: ignore[index]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict[str, object]) -> str:
    ours, theirs = row["localmed"], row["llama-server"]
    return (f"{row['streams']:>3} streams  localmed {ours['tok_per_s']:7.1f} tok/s, TTFT "  # type: ignore[index]
            f"{ours['ttft_median_s']:.2f}/{ours['ttft_max_s']:.2f} s   llama-server "  # type: ignore[index]
            f"{theirs['tok_per_s']:7.1f} tok/s, TTFT {theirs['ttft_median_s']:.2f}/"  # type: ignore[index]
            f"{theirs['ttft_max_s']:.2f} s   ratio {row['ratio']:.2f}x")  # type: ignore[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: SmolLM2-135M-Instruct "
                        "from the tests' cache)")
    parser.add_argument("--large", action="store_true", help="a ~1B Llama made (once) by "
                        "localmed quantize instead")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=128, help="tokens each stream generates")
    parser.add_argument("--ctx", type=int, default=1024, help="context per stream")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--build-only", action="store_true", help="build llama-server, stop")
    args = parser.parse_args()
    server = llama_server()
    if args.build_only:
        print(server)
        return 0
    model = large_model() if args.large else args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from tests.real_models import smollm2_gguf

        model = smollm2_gguf()
    print(f"{model.name}: {args.tokens} tokens a stream, {args.ctx} tokens of context each, "
          f"{args.threads} threads, median of {args.rounds} rounds", flush=True)
    rows = measure(model, args.streams, args.tokens, args.ctx, args.threads, args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "tokens": args.tokens,
                                         "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
