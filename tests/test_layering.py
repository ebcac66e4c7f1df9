"""Imports go one way (entry → app → core → backends → base), with no cycles (STYLE.md 4).

The contract is checked statically (tests/import_contract.py), function-level imports included,
and the checker itself is shown to catch what it must on a small fixture tree.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.import_contract import check, read_graph, source_packages

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"localmed": "localmed", "quantize": "localmed.quantize", "tui": "localmed.tui"}
"""The fixture trees' folders, as the project maps them."""


def test_the_tree_keeps_the_import_contract():
    packages = source_packages(ROOT)
    assert packages == PACKAGES
    violations = check(read_graph(ROOT, packages))
    assert not violations, "\n".join(map(str, violations))


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


BASE_FIXTURE = {
    "localmed/__init__.py": "",
    "localmed/errors.py": "class LocalmedError(Exception): ...\n",
    "localmed/chat.py": "from localmed.errors import LocalmedError\n",
    "quantize/__init__.py": "",
    "quantize/pipeline.py": "from localmed import errors\n",
    "tui/__init__.py": "",
    "tui/app.py": "import textual\nfrom localmed.chat import LocalmedError\n",
}


def test_a_clean_fixture_tree_passes(tmp_path):
    root = _tree(tmp_path, BASE_FIXTURE)
    assert check(read_graph(root, PACKAGES)) == []


def test_a_wrong_way_import_inside_a_function_is_caught(tmp_path):
    root = _tree(tmp_path, {**BASE_FIXTURE, "quantize/pipeline.py": """
        from localmed import errors

        def late():
            from localmed.chat import LocalmedError  # a backend reaching up into the core
            return LocalmedError
        """})
    violations = check(read_graph(root, PACKAGES))
    assert len(violations) == 1
    assert violations[0].module == "localmed.quantize.pipeline" and violations[0].line == 5
    assert "'backends' may not import 'core'" in str(violations[0])


def test_a_relative_import_that_goes_the_wrong_way_is_caught(tmp_path):
    root = _tree(tmp_path, {**BASE_FIXTURE, "localmed/errors.py": "from . import chat\n"})
    messages = [str(v) for v in check(read_graph(root, PACKAGES))]
    assert any("'base' may not import 'core'" in m for m in messages), messages


def test_a_cycle_within_one_layer_is_caught(tmp_path):
    root = _tree(tmp_path, {**BASE_FIXTURE,
                            "quantize/a.py": "def f():\n    import localmed.quantize.b\n",
                            "quantize/b.py": "from localmed.quantize import a\n"})
    messages = [str(v) for v in check(read_graph(root, PACKAGES))]
    assert messages == ["localmed.quantize.a:0 imports localmed.quantize.b: import cycle: "
                        "localmed.quantize.a → localmed.quantize.b → localmed.quantize.a"]


def test_owned_packages_stay_in_their_layer(tmp_path):
    root = _tree(tmp_path, {**BASE_FIXTURE,
                            "localmed/chat.py": "def run():\n    import llama_cpp\n",
                            "localmed/errors.py": "from textual.app import App\n",
                            "localmed/paths.py": "from rich.progress import Progress\n"})
    messages = sorted(str(v) for v in check(read_graph(root, PACKAGES)))
    assert len(messages) == 3
    assert "llama_cpp belongs to the 'backends' layer only" in messages[0]
    assert "textual belongs to the 'app' layer only" in messages[1]
    assert "rich belongs to the 'entry' and 'app' layers only" in messages[2]


def test_importing_the_core_is_light():
    # `localmed --help` must not pay for torch, transformers, llama.cpp or Textual: importing
    # every module of the localmed package loads none of them.
    # (the converters and the Textual app are packages of their own: localmed.quantize, .tui)
    code = (
        "import importlib, pkgutil, sys, localmed\n"
        "for info in pkgutil.walk_packages(localmed.__path__, 'localmed.'):\n"
        "    if not info.name.endswith('__main__') and not info.name.startswith(\n"
        "            ('localmed.quantize', 'localmed.tui')):\n"
        "        importlib.import_module(info.name)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    loaded = set(out.stdout.split())
    assert not {"torch", "transformers", "llama_cpp", "textual", "localmed.tui"} & loaded


def test_every_module_imports_first():
    # A cycle that the static contract allows (a package's __init__ and a module inside it)
    # shows only in the order of first imports: the engine process starts from
    # localmed.runtimes.process, a test from whatever it imports. Each module is imported first,
    # in a fresh set of localmed modules.
    code = (
        "import importlib, pkgutil, sys, localmed, localmed.quantize, localmed.tui\n"
        "names = [i.name for p in (localmed, localmed.quantize, localmed.tui)\n"
        "         for i in pkgutil.walk_packages(p.__path__, p.__name__ + '.')\n"
        "         if not i.name.endswith('__main__')]\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('localmed')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print(len(names))\n"
        "print('\\n'.join(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert int(out[0]) > 50
    assert [line for line in out[1:] if line] == []


def test_the_tui_reaches_llama_cpp_only_through_the_runtime():
    for path in (ROOT / "tui").glob("*.py"):  # the Textual app's sources (localmed.tui)
        text = path.read_text()
        assert "llama_cpp" not in text and "transformers" not in text, path
