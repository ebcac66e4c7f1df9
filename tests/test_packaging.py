"""One installed top-level package, ``localmed``, from a wheel and from an editable install.

PyPI has unrelated packages named ``quantize`` and ``tui``: installed beside them, top-level
folders of those names would overwrite their files (and an uninstall would delete them). The
source folders ``quantize/`` and ``tui/`` install as ``localmed.quantize`` and ``localmed.tui``.
Both installs are then run as a new user runs them: ``localmed chat demo`` in a real terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from localmed.conversation import DISCLAIMER
from tests.import_contract import source_packages
from tests.terminal import Terminal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the source tree (a build writes build/ and egg-info
    folders beside the sources; none of that belongs in the repository)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(work),
                    str(source)], check=True, capture_output=True)
    (built,) = work.glob("localmed-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package_and_every_source_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"localmed"}
    expected = {f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder, package in source_packages(ROOT).items()
                for path in (ROOT / folder).rglob("*.py")}
    assert expected <= set(names), sorted(expected - set(names))
    assert {"localmed/models.toml", "localmed/tui/app.tcss"} <= set(names)
    assert not [n for n in names if n.startswith(("localmed/tests/", "localmed/benchmarks/"))]


@pytest.fixture(scope="module")
def wheel_install(wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed on its own into a folder; dependencies come from this environment."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return target


def _where(env: dict[str, str]) -> dict[str, str]:
    """Where ``localmed`` and its sub-packages load from, and whether ``quantize``/``tui`` do."""
    code = ("import importlib.util, localmed, localmed.quantize.pipeline, localmed.tui.app\n"
            "print(localmed.__file__)\n"
            "print(localmed.quantize.pipeline.__file__)\n"
            "print(localmed.tui.app.__file__)\n"
            "print(importlib.util.find_spec('quantize'), importlib.util.find_spec('tui'))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return dict(zip(["localmed", "quantize", "tui", "top-level"], out, strict=True))


def _env(tmp_path: Path, pythonpath: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LOCALMED_DATA_DIR"] = str(tmp_path / "data")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def test_the_wheel_install_loads_from_its_folder(wheel_install, tmp_path):
    where = _where(_env(tmp_path, wheel_install))
    assert where["localmed"] == str(wheel_install / "localmed" / "__init__.py")
    assert where["quantize"] == str(wheel_install / "localmed" / "quantize" / "pipeline.py")
    assert where["tui"] == str(wheel_install / "localmed" / "tui" / "app.py")
    assert where["top-level"] == "None None"


def test_the_editable_install_maps_the_source_folders(tmp_path):
    where = _where(_env(tmp_path))
    assert where["localmed"] == str(ROOT / "localmed" / "__init__.py")
    assert where["quantize"] == str(ROOT / "quantize" / "pipeline.py")
    assert where["tui"] == str(ROOT / "tui" / "app.py")
    assert where["top-level"] == "None None"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
@pytest.mark.parametrize("install", ["editable", "wheel"])
def test_localmed_chat_demo_runs_in_a_terminal(install, request, tmp_path):
    """The `localmed` command, as each install provides it, finds the demo model it ships (in the
    wheel too: package data), shows the chat with its banner, and answers a message."""
    if install == "wheel":
        site = request.getfixturevalue("wheel_install")
        command, env = site / "bin" / "localmed", _env(tmp_path, site)
    else:
        command, env = Path(sys.executable).with_name("localmed"), _env(tmp_path)
    assert command.is_file()
    with Terminal(f"localmed-packaging-{os.getpid()}-{install}",
                  f"exec {command} chat demo --max-tokens 24", width=110, height=32,
                  env=env) as terminal:
        shown = terminal.wait(lambda s: "Ask the model" in s, "the chat screen")
        assert DISCLAIMER.split(".")[0] in shown  # "Not medical advice", on the banner
        terminal.type("How do I export a chat?")
        terminal.press("Enter")
        # the status line shows the reply's speed once it has ended
        terminal.wait(lambda s: re.search(r"\d+\.\d tok/s", s) and "generating…" not in s,
                      "the reply", timeout=180)
