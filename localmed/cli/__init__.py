"""The ``localmed`` command.

Every user mistake surfaces as a :class:`~localmed.errors.LocalmedError`: printed as one line on
stderr, exit status 2, no traceback. Ctrl-C exits 130 after the command has cleaned up.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from rich.markup import escape

from localmed import __version__, offline
from localmed.cli import bench, docs, models, quantize, run, serve, worker
from localmed.cli.common import EXIT_USER_ERROR, OneLineParser, err_console
from localmed.errors import LocalmedError

EXIT_INTERRUPTED = 130

OFFLINE_COMMANDS = frozenset({"chat", "serve", "bench", "docs", "worker"})
"""Commands that refuse any socket beyond loopback, in their engine processes too
(:mod:`localmed.offline`); the ones that download say so in their help."""

COMMANDS = (models, quantize, run, serve, bench, docs, worker)
"""The command modules; each registers its own parsers, in this order in ``--help``."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="localmed",
        description="Open medical LLMs on an offline laptop. Not medical advice: for use by "
                    "medical professionals, who verify every output.",
    )
    parser.add_argument("--version", action="version", version=f"localmed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every temporary file is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM (systemd, kill) and SIGHUP (a closed terminal) end a command as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python", "huggingface_hub": "huggingface-hub",
                 "gptqmodel": "GPTQModel (the gptq extra)"}
"""Import names whose distribution is called otherwise."""


def failure_message(exc: BaseException) -> str | None:
    """The one line a user sees for an expected failure; None for a bug (shown as a traceback)."""
    if isinstance(exc, LocalmedError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name and \
            exc.name.partition(".")[0] != "localmed":
        package = DISTRIBUTIONS.get(exc.name.partition(".")[0], exc.name)
        return (f"{package} is not installed in this Python ({sys.executable}); reinstall "
                "localmed with scripts/install.sh (README: Install)")
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{where}out of disk space; the partial file was removed"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}permission denied ({exc.strerror})"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            return f"{where}{exc.strerror}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. From the command line (``argv`` None) ``chat``, ``serve`` and ``bench``
    make this whole process offline; called from Python with arguments, the caller's process
    is left as it is (their engine processes are offline either way)."""
    # transformers (gguf-py's BPE vocabulary loads its tokenizer) would say on every import that
    # torch is missing: the default install leaves torch out on purpose.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    whole_process = argv is None
    args = build_parser().parse_args(argv)
    if whole_process and args.command in OFFLINE_COMMANDS:
        offline.enforce(f"localmed {args.command}", names={getattr(args, "host", None) or ""})
    try:
        with _signals_as_interrupts():
            return args.func(args)
    except Terminated as stop:
        err_console().print(f"[yellow]terminated[/] ({signal.Signals(stop.signum).name}): no "
                            "partial files were left behind")
        return 128 + stop.signum
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/]: no partial files were left behind")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = failure_message(exc)
        if message is None:
            raise
        err_console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
