"""What every command module shares: the consoles (results on stdout, progress and errors on
stderr), the one-line argument parser, argument types and the options of a model to run."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

EXIT_USER_ERROR = 2


# emoji=False: text is printed as it is (a certificate fingerprint "…:CD:…" became "…💿…").
def console() -> Console:
    return Console(highlight=False, emoji=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``error: …``) and exit status 2, like ours."""

    def error(self, message: str) -> NoReturn:
        err_console().print(f"[bold red]error:[/] {escape(self.prog)}: {escape(message)} "
                            f"(see {escape(self.prog)} --help)", soft_wrap=True)
        raise SystemExit(EXIT_USER_ERROR)


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not {what}")
    return value


def positive(text: str) -> int:
    return _integer(text, 1, "a positive number")


def non_negative(text: str) -> int:
    return _integer(text, 0, "zero or more")


def size(text: str) -> int:
    """A memory size: ``32G`` or ``32GiB`` (2^30 bytes a G), ``32GB`` (10^9), ``512M``; bytes
    without a unit."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (such as 32G)")
    prefix, unit = match[2].upper(), match[3].upper()
    base = 1000 if prefix and unit == "B" else 1024
    return int(float(match[1]) * base ** " KMGT".index(prefix or " "))


def port_number(text: str) -> int:
    value = _integer(text, 1, "a TCP port (1-65535)")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def layers(text: str) -> int:
    return _integer(text, -1, "a number of layers (-1: all)")


def model_options(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """MODEL and the options that say how to load it (chat, serve, export, plan, doctor)."""
    p.add_argument("model", metavar="MODEL", nargs="?" if optional else None,
                   help="registry id (internist-7b), a .gguf file, or 'demo'")
    p.add_argument("--quant", "-q", help="which local quant of a registry model "
                   "(default: its default quant)")
    p.add_argument("--ctx", type=positive, help="context size in tokens (default: the model's, "
                   "at most 4096)")
    p.add_argument("--gpu-layers", type=layers, help="layers to offload to the GPU (-1: all); "
                   "default: as many as fit")
    p.add_argument("--threads", type=positive, help="CPU threads for llama.cpp")


def rpc_option(p: argparse.ArgumentParser) -> None:
    """``--rpc`` and its companions (chat, serve, bench, plan): read them with
    :func:`rpc_workers`."""
    p.add_argument("--rpc", metavar="HOST:PORT[,...]", help="workers (`localmed worker` on "
                   "the clinic's other machines) that hold part of the model's layers, in "
                   "proportion to their free memory; over TLS with the clinic's RPC secret")
    p.add_argument("--rpc-secret", type=Path, metavar="FILE", help="the clinic's RPC secret "
                   "(default: the one in localmed's configuration folder)")
    p.add_argument("--insecure-rpc", action="store_true", help="--rpc in llama.cpp's plain "
                   "protocol (a plain rpc-server, or a worker started with --insecure-rpc): "
                   "only on a link nobody else can reach")


def rpc_workers(args: argparse.Namespace):
    """``--rpc``'s workers (a :class:`~localmed.rpc.workers.Workers`), or None."""
    from localmed.rpc.workers import INSECURE, spec

    workers = spec(args.rpc, args.insecure_rpc, args.rpc_secret)
    if workers is not None and workers.insecure:
        err_console().print(f"[bold yellow]warning:[/] {INSECURE}", soft_wrap=True)
    return workers


def speculation_option(p: argparse.ArgumentParser) -> None:
    """``--speculation`` / ``--no-speculation`` and ``--draft`` (chat, serve, bench): read them
    with :func:`speculating`."""
    p.add_argument("--draft", metavar="GGUF", type=Path, help="a small model of the same "
                   "vocabulary drafts tokens for this one (speculative decoding; turns "
                   "--speculation on), counted in the plan")
    p.add_argument("--speculation", action=argparse.BooleanOptionalAction, default=None,
                   help="draft tokens by prompt lookup (speculative decoding; it backs off "
                   "where drafts do not pay): faster when a reply copies a pasted record; off "
                   "by default for now")

