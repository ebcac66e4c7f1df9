"""Consoles shared by the CLI modules: results on stdout, progress and errors on stderr."""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    return Console(highlight=False)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)
