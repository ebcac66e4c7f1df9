"""``localmed worker``: this machine's memory and cores for a model that another machine of the
clinic runs (``chat``/``serve``/``bench``/``plan`` ``--rpc``).

llama.cpp's RPC server runs here on loopback only; the clinic reaches it through localmed's TLS
relay (:mod:`localmed.rpc.link`), with the clinic's secret (:mod:`localmed.rpc.secret`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

from localmed.cli.common import err_console, port_number, positive
from localmed.errors import WorkerError
from localmed.rpc import DEFAULT_PORT

GIB = 2**30
READY_SECONDS = 30


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="lend this machine's memory to a model another machine "
                       "runs with --rpc (llama.cpp's RPC server, behind TLS and the clinic's "
                       "secret)")
    p.add_argument("--host", default="0.0.0.0", help="the address the clinic reaches this "
                   "worker at (default: all of this machine's)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"default {DEFAULT_PORT}")
    p.add_argument("--cache", type=Path, metavar="DIR", help="where weights sent once are kept, "
                   "so the next load sends only their hashes (default: localmed's data folder)")
    p.add_argument("--no-cache", action="store_true", help="keep no weights between loads")
    p.add_argument("--threads", type=positive, help="CPU threads (default: all cores)")
    p.add_argument("--rpc-secret", type=Path, metavar="FILE", help="the clinic's RPC secret "
                   "(default: localmed's configuration folder; made there if absent)")
    p.add_argument("--insecure-rpc", action="store_true", help="llama.cpp's plain protocol, "
                   "no TLS and no secret: only on a link nobody else can reach")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from localmed import __version__, paths
    from localmed.rpc import secret
    from localmed.rpc.link import Device, WorkerInfo, WorkerRelay, llama_hello, version_text
    from localmed.runtimes import ggml_rpc

    threads = args.threads or os.cpu_count() or 1
    cache = None if args.no_cache else (args.cache or paths.data_dir() / "rpc-cache")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    offered = ggml_rpc.local_devices()
    out = _own_stdout()  # llama.cpp's server prints each connection on fd 1
    if args.insecure_rpc:
        err_console().print("[bold yellow]warning:[/] --insecure-rpc: llama.cpp's plain protocol "
                            "on the network, with no secret and no encryption; anyone who "
                            "reaches this port can use it and read what crosses", soft_wrap=True)
        endpoint = f"{args.host}:{args.port}"
        _say(out, f"localmed worker: llama.cpp's RPC server at {endpoint}, in clear", offered,
             cache, threads)
        print(f"  use it  localmed chat MODEL --rpc {socket.gethostname()}:{args.port} "
              "--insecure-rpc   (Ctrl-C stops this worker)", file=out, flush=True)
        _serve_until_stopped(ggml_rpc, endpoint, cache, threads)
        return 0
    path, made = secret.ensure(args.rpc_secret)
    context = secret.server_context(path)
    backend = _free_loopback_port()
    _serve_until_stopped(ggml_rpc, f"127.0.0.1:{backend}", cache, threads, wait=False)
    version = _wait_for_backend(backend, llama_hello)
    info = WorkerInfo(rpc=version, host=socket.gethostname(), localmed=__version__,
                      devices=tuple(Device(d.name, d.description, d.free, d.total)
                                    for _, d in offered))
    relay = WorkerRelay(args.host, args.port, backend, context, info,
                        said=lambda line: print(f"  {line}", file=out, flush=True))
    try:
        relay.start()
    except OSError as exc:
        raise WorkerError(f"cannot listen on {args.host}:{args.port}: "
                          f"{exc.strerror or exc}") from None
    _say(out, f"localmed worker: llama.cpp's RPC server (protocol {version_text(version)}) "
         f"behind TLS 1.3 at {args.host}:{relay.port}", offered, cache, threads)
    print(f"  secret  {path}" + (" (made now: copy this one file to each machine of the "
                                  "clinic that uses this worker, readable by its user only)"
                                  if made else ""), file=out)
    if not secret.private(path):
        print(f"  warning: {path} is readable by other users: chmod 600 it", file=out)
    print(f"  use it  localmed chat MODEL --rpc {socket.gethostname()}:{relay.port}   "
          "(Ctrl-C stops this worker)", file=out, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        relay.close()
        print("worker stopped", file=out, flush=True)
        return 0


def _say(out, title: str, offered, cache: Path | None, threads: int) -> None:
    print(title, file=out)
    for _, d in offered:
        print(f"  offers  {d.name}: {d.description} ({d.free / GIB:.1f} GiB free of "
              f"{d.total / GIB:.1f} GiB), {threads} thread{'s' if threads > 1 else ''}", file=out)
    print(f"  cache   {cache} (weights sent once are kept here)" if cache else
          "  cache   none (--no-cache: every load sends every weight)", file=out, flush=True)


def _serve_until_stopped(ggml_rpc, endpoint: str, cache: Path | None, threads: int,
                         wait: bool = True) -> None:
    server = threading.Thread(target=ggml_rpc.serve, name="llama-rpc-server", daemon=True,
                              args=(endpoint, str(cache) if cache else None, threads))
    server.start()
    if not wait:
        return
    try:
        server.join()
    except KeyboardInterrupt:
        return
    raise WorkerError(f"llama.cpp's RPC server could not listen on {endpoint} (its own words "
                      "are above)")


def _wait_for_backend(port: int, hello) -> tuple[int, int, int]:
    deadline = time.monotonic() + READY_SECONDS
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return hello(sock)
        except (OSError, EOFError):
            if time.monotonic() > deadline:
                raise WorkerError("llama.cpp's RPC server did not start (its own words are "
                                  "above)") from None
            time.sleep(0.05)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_stdout():
    """This command's own copy of stdout; fd 1 itself then goes nowhere (llama.cpp's server
    prints a line per connection there)."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return out



def plan_over_workers(footprint, hw, args: argparse.Namespace, n_ctx: int | None):
    """``plan --rpc``: the split over this machine and the workers (what each says it has free,
    or ``--worker-memory`` for each, asking nothing of them), and a line on the workers."""
    from localmed.cli.common import rpc_workers
    from localmed.planner import gib
    from localmed.rpc.link import version_text
    from localmed.rpc.split import plan_split

    workers = rpc_workers(args)
    if args.worker_memory is not None:
        frees = [(str(w), args.worker_memory) for w in workers.workers]
        said = (f"workers: {len(frees)}, planned as if each had {gib(args.worker_memory)} free "
                "(--worker-memory: nothing was asked of them)")
    else:
        infos = workers.check()
        frees = [(str(w), i.free) for w, i in zip(workers.workers, infos, strict=True)]
        said = "\n".join(
            f"worker {w}: {i.host or '?'}, " + ", ".join(
                f"{d.name} {d.description}".strip() for d in i.devices)
            + f", {gib(i.free)} free, llama.cpp RPC {version_text(i.rpc)}"
            + ("" if i.secured else " (in clear: --insecure-rpc)")
            for w, i in zip(workers.workers, infos, strict=True))
    n_ctx = n_ctx or min(footprint.n_ctx_train, 4096)
    plan, _ = plan_split(footprint, hw, frees, n_ctx=n_ctx, remote_layers=args.gpu_layers)
    return plan, said
