"""The default install has no torch: every command it offers runs with torch unimportable, and
every command that needs an extra says so in one line (exit 2) before it downloads anything.

torch is made unimportable in each command's process and in the engine processes it starts: a
``sitecustomize`` on ``PYTHONPATH`` puts ``None`` in ``sys.modules["torch"]`` (``import torch``
raises, ``importlib.util.find_spec("torch")`` answers None, as with torch not installed;
transformers then reports torch unavailable, as it does in a venv without it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.terminal import Terminal
from tests.test_pull import REPO, lay_out
from tests.test_serve import Server
from tests.tiny_models import SHARED

TORCHLESS = ("torch", "torchao", "torchvision", "accelerate", "gptqmodel", "optimum")


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict[str, str]:
    """Environment of a process (and its children) that cannot import torch."""
    folder = tmp_path_factory.mktemp("no-torch")
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in TORCHLESS))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def localmed(env: dict[str, str], *args: str, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "localmed", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    assert "PyTorch was not found" not in done.stderr + done.stdout
    return done


def test_torch_is_unimportable_under_the_fixture(no_torch):
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                           text=True, env={**os.environ, **no_torch})
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr


def test_every_module_imports_without_torch(no_torch):
    """What the default commands load is imported at start; torch only inside the functions of
    the extras' paths (GPTQ, llama.cpp's converter, pickles, the demo's training)."""
    script = """
import importlib, json, pkgutil, sys
import localmed
failed = {}
for module in pkgutil.walk_packages(localmed.__path__, "localmed."):
    if module.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        failed[module.name] = repr(exc)
print(json.dumps({"failed": failed, "count": len(sys.modules)}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **no_torch}, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["failed"] == {}


def test_the_default_commands_run_without_torch(no_torch, tmp_path, checkpoints, smollm2):
    """pull (from a local hub cache), plan, info, models, doctor, quantize by localmed's own
    converter (SentencePiece and BPE vocabularies), bench on GGUFs and export."""
    cache = tmp_path / "hf"
    lay_out(cache, REPO, {"smollm2-135m-instruct-q4_1.gguf": smollm2["gguf"]})
    env = {**no_torch, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "LOCALMED_DATA_DIR": str(tmp_path / "data")}

    def ok(*args: str) -> str:
        done = localmed(env, *args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    ok("pull", f"{REPO}:Q4_1")
    assert "Q4_1" in ok("plan", "smollm2-135m-instruct")
    assert "demo" in ok("plan", "demo")
    ok("models")
    ok("doctor")
    out = tmp_path / "out"
    ok("quantize", str(checkpoints["llama"]), "--quant", "F16,Q8_0,Q4_K_M", "--imatrix", "none",
       "--out", str(out))
    ok("quantize", str(checkpoints["llama3"]), "--quant", "Q8_0", "--out", str(tmp_path / "bpe"))
    assert (tmp_path / "bpe" / "llama3.Q8_0.gguf").is_file()
    made = sorted(p.name for p in out.glob("*.gguf"))
    assert made == ["llama.F16.gguf", "llama.Q4_K_M.gguf", "llama.Q8_0.gguf"]
    info = json.loads(ok("info", str(out / "llama.Q4_K_M.gguf"), "--json"))
    assert info["provenance"]["converter"] == "localmed"
    ok("bench", str(out), "--quants", "Q8_0,Q4_K_M", "--data",
       str(SHARED / "benchmarks" / "medqa.jsonl"), "--limit", "4", "--threads", "2",
       "--out", str(tmp_path / "bench"))
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["runs"]
    ok("export", "smollm2-135m-instruct", "--ollama", str(tmp_path / "ollama"))
    assert (tmp_path / "ollama" / "Modelfile").is_file()


def test_serve_answers_the_openai_client_without_torch(no_torch, smollm2):
    import openai

    running = Server(smollm2["gguf"], "--threads", "2", env=no_torch)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", timeout=120)
        (model,) = client.models.list().data
        reply = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Name one vitamin."}],
            max_tokens=12, temperature=0)
        assert reply.choices[0].message.content
    finally:
        running.stop()
    assert "PyTorch was not found" not in running.proc.stderr.read()


def test_chat_demo_in_a_terminal_without_torch(no_torch, tmp_path):
    """README's run command, `localmed chat demo`, under tmux: the banner, then a reply."""
    env = " ".join(f"{k}={v}" for k, v in {**no_torch,
                                           "LOCALMED_DATA_DIR": str(tmp_path)}.items())
    with Terminal(f"localmed-light-{os.getpid()}",
                  f"env {env} {sys.executable} -m localmed chat demo") as terminal:
        # no model to build any more: the screen comes as fast as the app starts (its time is
        # measured by hand, not asserted here: 0.6 s on two cores)
        shown = terminal.wait(lambda s: "Ask the model" in s, "the chat screen")
        assert "Not medical advice" in shown and "DEMO ONLY" in shown
        terminal.type("How do I stop a reply?")
        terminal.press("Enter")
        shown = terminal.wait(lambda s: "tok/s" in s and "Escape" in s, "the demo's reply")
        assert "Traceback" not in shown


def _tiny_safetensors(folder: Path, architecture: str) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture],
                                                    "model_type": "qwen2"}))
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)},
              str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("case", ["registry", "hub repo", "folder", "pickle", "gptq",
                                  "converter"])
def test_a_command_that_needs_torch_says_so_before_anything(case, no_torch, tmp_path,
                                                           checkpoints):
    """One line naming the extra and its install command, exit 2; no weights downloaded, no
    output written. The registry case runs offline with an empty cache: the refusal comes
    before the download would have failed."""
    cache = tmp_path / "hf"
    cache.mkdir()
    out = tmp_path / "out"
    env = {**no_torch, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    extra = "convert"
    if case == "registry":  # MedGemma: Gemma 3, converted by llama.cpp's converter
        args = ["quantize", "medgemma-4b-it"]
    elif case == "hub repo":  # not in the registry: its config.json alone is read first
        config = _tiny_safetensors(tmp_path / "qwen", "Qwen2ForCausalLM") / "config.json"
        lay_out(cache, "someone/qwen-med", {"config.json": config,
                                            "model.safetensors": config.with_name(
                                                "model.safetensors")})
        args = ["quantize", "someone/qwen-med"]
    elif case == "folder":
        args = ["quantize", str(_tiny_safetensors(tmp_path / "qwen", "Qwen2ForCausalLM"))]
    elif case == "pickle":
        folder = tmp_path / "pickled"
        folder.mkdir()
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really")
        args = ["quantize", str(folder), "--allow-pickle"]
    elif case == "gptq":
        extra = "gptq"
        args = ["quantize", str(checkpoints["llama"]), "--format", "gptq"]
    else:
        args = ["quantize", str(checkpoints["llama"]), "--converter", "llama.cpp"]
    blobs = sorted(p.name for p in cache.rglob("*"))
    done = localmed(env, *args, "--out", str(out))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"LOCALMED_EXTRAS={extra} scripts/install.sh" in line and "needs torch" in line, line
    assert sorted(p.name for p in cache.rglob("*")) == blobs  # nothing more in the hub cache
    assert not out.exists()


@pytest.mark.parametrize("width", [80, 120, 160])
def test_models_reads_whole_in_a_terminal(width, no_torch, tmp_path):
    """`localmed models`, the first thing read after installing: every id, hub repo, licence,
    template and default quant whole (no "…"), at 80 columns as at 120 and wider."""
    from localmed.registry import Registry

    env = " ".join(f"{k}={v}" for k, v in {**no_torch,
                                           "LOCALMED_DATA_DIR": str(tmp_path)}.items())
    with Terminal(f"localmed-models-{os.getpid()}-{width}",
                  f"env {env} {sys.executable} -m localmed models; sleep 60", width=width,
                  height=50) as terminal:
        last = list(Registry.load())[-1]
        shown = terminal.wait(lambda s: last in s, "the table", history=True)
    assert "…" not in shown
    words = set(shown.split())
    for entry in Registry.load().values():
        template = entry.template or "(embeds)"  # an embedding model has none
        assert {entry.id, entry.repo, template, entry.default_quant} <= words, entry.id
        assert entry.license.split()[0].rstrip(",") in shown
    assert max(map(len, shown.splitlines())) <= width


def test_a_gptq_folder_without_the_extra_is_one_line(no_torch, tmp_path):
    """A GPTQ folder (config, weights) served where torch is missing: the line names the gptq
    extra. (info and plan read its headers alone, and work.)"""
    from safetensors.numpy import save_file

    folder = tmp_path / "model-GPTQ-4bit-g128"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 256,
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}))
    import numpy as np

    save_file({"lm_head.weight": np.zeros((8, 64), np.float16)},
              str(folder / "model.safetensors"))
    env = {**no_torch, "LOCALMED_DATA_DIR": str(tmp_path / "data")}
    assert localmed(env, "info", str(folder)).returncode == 0
    plan = localmed(env, "plan", str(folder))
    assert plan.returncode == 0 and "transformers on CPU" in " ".join(plan.stdout.split())
    from tests.test_serve import free_port

    done = localmed(env, "serve", str(folder), "--port", str(free_port()))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "LOCALMED_EXTRAS=gptq scripts/install.sh" in line, line
