"""llama.cpp's own Hugging Face converter, from the llama.cpp release the runtime is built from.

``convert_hf_to_gguf.py``, its ``conversion/`` package and its matching ``gguf-py`` ship inside
the llama-cpp-python source archive that ``scripts/install.sh`` builds; they are extracted to
``<venv>/share/localmed/llama.cpp`` (``localmed install-converter``). From that copy localmed reads,
without importing it:

- the architectures the converter registers (``@ModelBase.register("...")``), and
- its byte-level BPE pre-tokenizer table: the checksum of the tokenization of its fixed test text
  → llama.cpp's pre-tokenizer name (``llama-bpe``, ``smollm``, ``qwen2`` …),

and runs the script itself, unchanged, in a subprocess for every architecture or tokenizer that
localmed's streaming converter does not handle.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localmed.errors import ConverterError, ConverterMissingError

PINNED = "llama-cpp-python==0.3.36"
"""The llama-cpp-python release whose llama.cpp localmed runs (pyproject.toml pins the same)."""

INSTALL_COMMAND = "localmed install-converter"
_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
_VERSION_FILE = "LLAMA_CPP_PYTHON_VERSION"


def pinned_version() -> str:
    return PINNED.split("==")[1]


def converter_dir() -> Path:
    """Where the converter is kept (``LOCALMED_LLAMA_CPP_DIR`` overrides)."""
    if env := os.environ.get("LOCALMED_LLAMA_CPP_DIR"):
        return Path(env).expanduser()
    return Path(sys.prefix) / "share" / "localmed" / "llama.cpp"


@dataclass(frozen=True)
class LlamaCppConverter:
    """An extracted copy of llama.cpp's converter."""

    folder: Path
    version: str
    """The llama-cpp-python release it came from."""

    @property
    def script(self) -> Path:
        return self.folder / "convert_hf_to_gguf.py"

    @property
    def label(self) -> str:
        return f"llama.cpp's convert_hf_to_gguf.py (llama-cpp-python {self.version})"


def find_converter() -> LlamaCppConverter:
    """The installed converter, of the pinned release; otherwise a one-line error with the fix."""
    folder = converter_dir()
    version_file = folder / _VERSION_FILE
    if not (folder / "convert_hf_to_gguf.py").is_file() or not version_file.is_file():
        raise ConverterMissingError(
            f"llama.cpp's converter is not installed in {folder}; get it with: "
            f"{INSTALL_COMMAND}")
    version = version_file.read_text(encoding="utf-8").strip()
    if version != pinned_version():
        raise ConverterMissingError(
            f"llama.cpp's converter in {folder} is from llama-cpp-python {version}, the runtime "
            f"from {pinned_version()}; update it with: {INSTALL_COMMAND}")
    return LlamaCppConverter(folder, version)


def install_converter(sdist: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Extract the converter from the pinned llama-cpp-python source archive (downloaded with
    pip when ``sdist`` is not given: this is the one step here that uses the network)."""
    target = converter_dir()
    with tempfile.TemporaryDirectory(prefix="localmed-llama-cpp-") as tmp:
        if sdist is None:
            log(f"downloading the {PINNED} source archive (~75 MB) …")
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "--quiet", "--disable-pip-version-check", PINNED, "-d", tmp],
                capture_output=True, text=True)
            archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if result.returncode != 0 or not archives:
                reason = (result.stderr.strip().splitlines() or ["no archive"])[-1]
                raise ConverterMissingError(f"could not download {PINNED}: {reason}")
            sdist = archives[0]
        staging = Path(tmp) / "llama.cpp"
        _extract(Path(sdist), staging)
        (staging / _VERSION_FILE).write_text(pinned_version() + "\n", encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        shutil.move(str(staging), target)
        shutil.rmtree(old, ignore_errors=True)
    _read_table.cache_clear()
    return target


def _extract(sdist: Path, staging: Path) -> None:
    prefix = f"llama_cpp_python-{pinned_version()}/vendor/llama.cpp/"
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in _PARTS
                       and (m.isfile() or m.isdir())]
            if not any(m.name == prefix + "convert_hf_to_gguf.py" for m in members):
                raise ConverterMissingError(f"{sdist}: not the {PINNED} source archive")
            for member in members:
                member.name = member.name[len(prefix):]
            extract(tar, staging, members)
    except (OSError, tarfile.TarError) as exc:
        raise ConverterMissingError(f"{sdist}: cannot read the source archive ({exc})") from None


def extract(tar: tarfile.TarFile, folder: Path, members: list[tarfile.TarInfo] | None = None
            ) -> None:
    """``tar.extractall`` with the "data" filter (no links out of the folder, no device files)
    where Python has it (3.10.12+, 3.11.4+; Debian's 3.11.2 has none)."""
    tar.extractall(folder, members=members,
                   **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


# --- what the converter knows, read from its source ---------------------------------------------

@dataclass(frozen=True)
class ConverterTable:
    architectures: frozenset[str]
    """Hugging Face architectures with a registered converter class."""
    check_text: str
    """The fixed text whose tokenization identifies a BPE pre-tokenizer."""
    pre_tokenizers: dict[str, str]
    """sha256 of ``str(tokenizer.encode(check_text))`` → llama.cpp's pre-tokenizer name."""


def converter_table(folder: Path | None = None) -> ConverterTable:
    """What the installed (or given) converter knows; read once per folder."""
    return _read_table(folder or find_converter().folder)


@functools.cache
def _read_table(folder: Path) -> ConverterTable:
    sources = [folder / "convert_hf_to_gguf.py", *sorted((folder / "conversion").glob("*.py"))]
    archs: set[str] = set()
    check_text = ""
    pre: dict[str, str] = {}
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                archs.update(_registered_names(node))
            elif isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                check_text, pre = _pre_tokenizer_table(node)
    if not check_text or not pre:
        raise ConverterMissingError(f"{folder}: no pre-tokenizer table in the converter; "
                                    f"reinstall it with: {INSTALL_COMMAND}")
    return ConverterTable(frozenset(archs), check_text, pre)


def _registered_names(cls: ast.ClassDef) -> list[str]:
    names = []
    for deco in cls.decorator_list:
        if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                and deco.func.attr == "register"):
            names += [a.value for a in deco.args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def _pre_tokenizer_table(func: ast.FunctionDef) -> tuple[str, dict[str, str]]:
    """``chktxt = '…'`` and every ``if chkhsh == "…": res = "name"`` in the function."""
    check_text = ""
    table: dict[str, str] = {}
    for node in ast.walk(func):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "chktxt"
                and isinstance(node.value, ast.Constant)):
            check_text = node.value.value
        elif (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
              and isinstance(node.test.left, ast.Name) and node.test.left.id == "chkhsh"
              and isinstance(node.test.comparators[0], ast.Constant)):
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id == "res" and isinstance(stmt.value, ast.Constant)):
                    table[node.test.comparators[0].value] = stmt.value.value
    return check_text, table


def tokenizer_checksum(folder: Path, check_text: str) -> str:
    """What llama.cpp's converter computes: sha256 of ``str(AutoTokenizer.encode(text))``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return hashlib.sha256(str(tokenizer.encode(check_text)).encode()).hexdigest()


# --- running it ----------------------------------------------------------------------------------

def run_converter(converter: LlamaCppConverter, model_dir: Path, outfile: Path, outtype: str,
                  *, expected_bytes: int, progress: Callable[[int], None] | None = None,
                  mmproj: bool = False) -> None:
    """``convert_hf_to_gguf.py MODEL --outfile OUT --outtype TYPE`` in a subprocess (with
    ``--mmproj``: an image-text model's vision projector instead of its text model).

    Progress is the output file's size, polled. A failure raises ConverterError with the
    converter's own one-line reason, never its traceback.
    """
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        process = subprocess.Popen(
            [sys.executable, str(converter.script), str(model_dir), "--outfile", str(outfile),
             "--outtype", outtype, *(["--mmproj"] if mmproj else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=converter.folder)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.25):
                with contextlib.suppress(OSError):
                    if progress:
                        progress(min(outfile.stat().st_size, expected_bytes))

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            done.set()
            watcher.join()
        if code != 0:
            log.seek(0)
            raise ConverterError(model_dir, converter.label, failure_reason(log.read(), code))


def failure_reason(output: str, code: int) -> str:
    """The converter's own last word: an exception's message or its last ERROR line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        if sep and head.replace(".", "").isidentifier() and head.endswith(("Error", "Exception")):
            return f"{head.rsplit('.', 1)[-1]}: {rest}"
        if line.startswith("ERROR:"):
            return line.split(":", 2)[-1].strip()
    return f"exited with status {code}" + (f": {lines[-1]}" if lines else "")
