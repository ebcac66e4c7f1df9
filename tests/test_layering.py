"""The core never imports the UI; the converters never import the TUI (STYLE.md, point 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(packages: list[str]) -> set[str]:
    code = (
        "import importlib, pkgutil, sys\n"
        f"for pkg in {packages!r}:\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        if info.name.endswith('__main__'):\n"
        "            continue\n"
        "        importlib.import_module(info.name)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


def test_core_never_imports_textual():
    loaded = _modules_after_import(["localmed"])
    assert not {m for m in loaded if m == "textual" or m.startswith("textual.")}
    assert "tui" not in loaded


def test_converters_never_import_the_tui():
    loaded = _modules_after_import(["quantize"])
    assert not {m for m in loaded if m == "tui" or m.startswith(("tui.", "textual"))}


def test_importing_the_cli_is_light():
    # `localmed --help` must not pay for torch, transformers or llama.cpp.
    loaded = _modules_after_import(["localmed"])
    heavy = {"torch", "transformers", "llama_cpp"}
    assert not heavy & loaded, heavy & loaded


def test_the_tui_reaches_llama_cpp_only_through_the_runtime():
    for path in (ROOT / "tui").glob("*.py"):
        text = path.read_text()
        assert "llama_cpp" not in text and "transformers" not in text, path
