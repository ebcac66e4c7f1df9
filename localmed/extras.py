"""What the optional extras add, and the one line a command says when it needs a missing one.

The default install runs GGUF files (chat, serve, bench, pull, plan, export) and converts the
architectures localmed's own converter implements, from safetensors, with no torch. torch comes
with an extra, for what only it can do: llama.cpp's converter (``convert_hf_to_gguf.py`` imports
it), pickled ``.bin`` checkpoints, GPTQ export and GPTQ models (transformers' loader). A command
that needs one checks here first, before it downloads or writes anything.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from localmed.errors import MissingExtraError


@dataclass(frozen=True)
class Extra:
    name: str
    modules: tuple[str, ...]
    """What it installs that localmed imports (the distribution names may differ)."""
    adds: str


EXTRAS = {
    extra.name: extra for extra in (
        Extra("convert", ("torch",),
              "llama.cpp's converter, for architectures localmed does not convert itself; "
              "pickled .bin checkpoints"),
        Extra("gptq", ("torch", "gptqmodel", "optimum"), "GPTQ 4-bit export; GPTQ models"),
    )
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    return [module for module in EXTRAS[extra].modules if not importable(module)]


def importable(module: str) -> bool:
    """Whether ``module`` can be imported here (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or a module blocked in sys.modules
        return False


def install_command(extra: str) -> str:
    return f"LOCALMED_EXTRAS={extra} scripts/install.sh (or pip install 'localmed[{extra}]')"


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless everything ``extra`` installs can be imported."""
    if absent := missing(extra):
        raise MissingExtraError(what, extra, absent, install_command(extra))
