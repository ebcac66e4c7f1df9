"""What travels to the GPU machine for benchmarks/gpu_check.sh, in ``.gpu/`` (``--prepare``).

llama-cpp-python's source archive pruned to what the build reads (the whole archive, 77 MB, is
over the 64 MiB transfer limit: vocabulary files, docs and llama.cpp's own tests are most of it),
localmed's wheel, the pure-Python wheels that machine's Python 3.12 lacks, and the tests' tiny
Gemma 3 image-text model converted here by ``localmed quantize`` (Q8_0 and its vision projector,
with two seeded pictures: the image step there needs no converter). The working tree plus
``.gpu/`` is checked against the limit and the device command against its 2,000 characters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSFER_LIMIT = 64 * 2**20
COMMAND_LIMIT = 2000
DEVICE_COMMAND = "bash benchmarks/gpu_check.sh --device"

WHEELS = ["gguf==0.19.0", "textual>=8.2,<9", "mdit-py-plugins", "platformdirs", "diskcache"]
"""What localmed and llama-cpp-python need that the GPU machine's image does not hold (its
package list is in the device tool's KINDS.md); the rest (torch, transformers, numpy, rich,
jinja2, httpx, pytest, scikit-build-core, cmake, ninja) is there."""

PRUNED = ("vendor/llama.cpp/models/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/media/",
          "vendor/llama.cpp/tests/", "vendor/llama.cpp/benches/", "vendor/llama.cpp/examples/",
          "vendor/llama.cpp/tools/", "vendor/llama.cpp/.devops/", "vendor/llama.cpp/gguf-py/",
          "vendor/llama.cpp/conversion/", ".git/", "docs/", "examples/", "tests/")
"""Parts of the source archive a build with scripts/llama-cmake-args.sh's options never reads
(no tests, tools, examples or server; vocab GGUFs and docs are data)..."""
KEPT = "vendor/llama.cpp/tools/mtmd/"
"""... but the multimodal library, which the build compiles (its sample media left out)."""
MEDIA = (".jpeg", ".jpg", ".png", ".mp3", ".mp4", ".wav")


def prepare(carry: Path, version: str) -> int:
    carry = ROOT / carry
    wheels = carry / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    sdist = carry / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        _pruned_sdist(version, sdist)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                   "manylinux2014_x86_64")],
                    "-d", str(wheels), *WHEELS], check=True)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: a build writes build/ and egg-info
        tree = Path(tmp) / "localmed"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".gpu", "__pycache__", "*.egg-info", "build", "dist"))
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), str(tree)], check=True)
    if not (carry / "vision" / "pictures.json").is_file():
        _vision_models(carry / "vision")
    travels = _travelling_bytes(carry)
    manifest = {
        "files": {p.relative_to(carry).as_posix(): {"bytes": p.stat().st_size,
                                                     "sha256": _sha256(p)}
                  for p in sorted(carry.rglob("*")) if p.is_file() and p.name != "manifest.json"},
        "travels_bytes": travels, "limit_bytes": TRANSFER_LIMIT,
        "command": DEVICE_COMMAND, "carry": [carry.name],
    }
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"what travels: {travels / 2**20:.1f} MiB of {TRANSFER_LIMIT / 2**20:.0f} MiB "
          f"(the working tree and {carry.name}/)")
    print(f'device call: run(command="{DEVICE_COMMAND}", carry=["{carry.name}"], timeout_s=600)')
    if travels > TRANSFER_LIMIT:
        print("error: over the transfer limit", file=sys.stderr)
        return 2
    if len(DEVICE_COMMAND) > COMMAND_LIMIT:
        print("error: the device command is over 2,000 characters", file=sys.stderr)
        return 2
    return 0


def _pruned_sdist(version: str, target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary=:all:", f"llama-cpp-python=={version}", "-d", tmp],
                       check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        partial = target.with_name(target.name + ".part")
        with tarfile.open(archive) as src, tarfile.open(partial, "w:gz") as dst:
            for member in src:
                inner = member.name.split("/", 1)[1] if "/" in member.name else ""
                if inner.startswith(KEPT) or KEPT.startswith(inner.rstrip("/") + "/"):
                    if inner.lower().endswith(MEDIA):
                        continue
                elif inner.startswith(PRUNED) or inner.rstrip("/") + "/" in PRUNED:
                    continue
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        partial.replace(target)


def _vision_models(folder: Path) -> None:
    """tests/tiny_models' Gemma 3 image-text checkpoint (seed 0) converted by localmed (Q8_0
    and its F16 projector) and its two seeded pictures (the tests' own), in ``folder``; ``pictures.json``,
    written last, names them (its absence means: make them again)."""
    sys.path.insert(0, str(ROOT))
    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry
    from tests.tiny_models import build_gemma3_vision_model, seeded_pictures

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_gemma3_vision_model(Path(tmp) / "tiny-gemma3-vision")
        made = {o.quant: o.path for o in run_quantize(
            resolve_source(str(checkpoint), Registry.load()), parse_quant_list("Q8_0"), folder)}
    pictures = [p.name for p in seeded_pictures(folder).values()]
    (folder / "pictures.json").write_text(json.dumps(
        {"model": made["Q8_0"].name, "projector": made["mmproj-F16"].name,
         "pictures": pictures}) + "\n")


def _travelling_bytes(carry: Path) -> int:
    """The working tree as the device tool sends it (tracked, and untracked files git does not
    ignore) plus the carried folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    tree = sum((ROOT / name.decode()).stat().st_size for name in listed
               if name and (ROOT / name.decode()).is_file())
    return tree + sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", type=Path, default=Path(".gpu"))
    parser.add_argument("--version", default="0.3.36")
    args = parser.parse_args()
    return prepare(args.carry, args.version)


if __name__ == "__main__":
    sys.exit(main())
