"""A model split over two workers and this machine: localmed (``localmed worker`` x2, ``serve
--rpc``, through its TLS relay, and in clear with ``--insecure-rpc``: the relay's cost alone)
against llama.cpp's own (``rpc-server`` x2, ``llama-server --rpc``, its defaults otherwise) with
the same layers on the same workers, in the same run; and the first load's time with the workers'
tensor caches empty, then filled.

The model is the ~1B Llama at Q4_K_M that benchmarks/serve_load.py makes (16 layers: large
enough that the link does not dominate). Everything runs on this machine, the workers on
loopback: what is measured is each side's engine and transport, not a network.

    .venv/bin/python benchmarks/rpc.py [--tokens 128] [--rounds 3] [--threads 2]

llama-server and rpc-server are built once from the pinned source archive with scripts/install.sh's
options (``GGML_RPC=ON`` among them) and cached in ~/.cache/localmed-bench.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import free_port, large_model, llama_tool, load, running  # noqa: E402


@contextlib.contextmanager
def workers(kind: str, threads: int, cache: Path, config: Path) -> Iterator[list[str]]:
    """Two workers on loopback: ``localmed`` (TLS), ``localmed-plain`` (--insecure-rpc) or
    ``rpc-server`` (llama.cpp's), each with its tensor cache in ``cache``."""
    procs, addresses = [], []
    env = {**os.environ, "LOCALMED_CONFIG_DIR": str(config), "LLAMA_CACHE": str(cache),
           "LD_LIBRARY_PATH": str(llama_tool("ggml-rpc-server").parent)}
    try:
        for _ in range(2):
            port = free_port()
            if kind == "rpc-server":
                command = [str(llama_tool("ggml-rpc-server")), "-H", "127.0.0.1", "-p",
                           str(port), "-t", str(threads), "-c"]
            else:
                command = [sys.executable, "-m", "localmed", "worker", "--host", "127.0.0.1",
                           "--port", str(port), "--threads", str(threads), "--cache",
                           str(cache)] + (["--insecure-rpc"] if kind == "localmed-plain" else [])
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env=env))
            wait_for_port(port)
            addresses.append(f"127.0.0.1:{port}")
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()


def wait_for_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker on port {port}")
        time.sleep(0.1)


def remote_layers(model: Path, rpc: list[str], config: Path) -> int:
    """The layers localmed's plan gives the two workers (llama-server gets the same -ngl)."""
    done = subprocess.run([sys.executable, "-m", "localmed", "plan", str(model), "--rpc",
                           ",".join(rpc), "--ctx", "4096"], capture_output=True, text=True,
                          env={**os.environ, "LOCALMED_CONFIG_DIR": str(config),
                               "COLUMNS": "200"}, check=True)
    line = next(row for row in done.stdout.splitlines() if row.startswith("workers "))
    return int(line.split()[1].split("/")[0])


def server(which: str, model: Path, rpc: list[str], layers: int, threads: int, port: int
           ) -> list[str]:
    if which == "llama-server":
        return [str(llama_tool("llama-server")), "-m", str(model), "--port", str(port),
                "--rpc", ",".join(rpc), "-ngl", str(layers), "-t", str(threads), "-tb",
                str(threads), "-c", "4096", "-np", "1", "--no-webui"]
    return [sys.executable, "-m", "localmed", "serve", str(model), "--port", str(port),
            "--rpc", ",".join(rpc), "--gpu-layers", str(layers), "--threads", str(threads),
            "--ctx", "4096", "--parallel", "1"] + (["--insecure-rpc"] if which ==
                                                   "localmed-plain" else [])


SETUPS = {  # what serves, over which workers
    "llama-server": "rpc-server",
    "localmed": "localmed",
    "localmed-plain": "localmed-plain",
    "localmed-plain over rpc-server": "rpc-server",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = large_model()
    llama_tool("llama-server"), llama_tool("ggml-rpc-server")
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    loads: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config"
        with workers("localmed", args.threads, Path(work) / "probe", config) as rpc:
            layers = remote_layers(model, rpc, config)
        print(f"{model.name}: {layers} of 16 layers on the two workers, the rest here; "
              f"{args.threads} threads each, {args.tokens} tokens a reply", flush=True)
        for round_ in range(args.rounds):
            names = list(SETUPS) if round_ % 2 == 0 else list(reversed(SETUPS))
            for name in names:
                which = "localmed-plain" if name.startswith("localmed-plain") else name
                cache = Path(work) / f"cache-{name}-{round_}"
                with workers(SETUPS[name], args.threads, cache, config) as rpc:
                    for fill in ("empty", "filled"):  # the first load fills the cache
                        port = free_port()
                        start = time.monotonic()
                        with running(server(which, model, rpc, layers, args.threads, port),
                                     port, env={"LOCALMED_CONFIG_DIR": str(config),
                                                "LD_LIBRARY_PATH": str(llama_tool(
                                                    "llama-server").parent)}) as url:
                            loads.setdefault(f"{name}, cache {fill}", []).append(
                                time.monotonic() - start)
                            if fill == "filled":
                                load(url, 1, 8)  # warm
                                rates[name].append(
                                    load(url, 1, args.tokens)["stream_decode_tok_per_s"])
                print(f"  round {round_ + 1}: {name}: {rates[name][-1]:.1f} tok/s", flush=True)
    base = statistics.median(rates["llama-server"])
    print("\nmedian decode tokens/s (1 stream), and against llama-server --rpc:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:32s} {median:7.1f}  {median / base:5.2f}x")
    tls, plain = statistics.median(rates["localmed"]), statistics.median(rates["localmed-plain"])
    print(f"the TLS relay's cost alone: {tls / plain:.2f}x the speed in clear")
    print("\nload time until the server answers (median s):")
    for name, values in loads.items():
        print(f"  {name:45s} {statistics.median(values):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
