"""GPTQ export with GPTQModel on CPU, reloaded by transformers, used by chat and bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from localmed import cli
from tests.tiny_models import SHARED

pytest.importorskip("gptqmodel", reason="GPTQ tests need pip install -e '.[gptq]'")

CALIBRATION = SHARED / "benchmarks" / "pubmedqa_train.jsonl"
TEXT = ("A 58-year-old woman with type 2 diabetes presents with crushing substernal chest pain "
        "radiating to the left arm; troponin is elevated.")


@pytest.fixture(scope="session")
def gptq_models(checkpoints, tmp_path_factory) -> dict[str, Path]:
    from localmed.quantize.gptq import GPTQSettings, run_gptq
    from localmed.quantize.pipeline import resolve_source
    from localmed.registry import Registry

    out = tmp_path_factory.mktemp("gptq")
    settings = GPTQSettings(bits=4, group_size=128, calibration=CALIBRATION, samples=16)
    registry = Registry.load()
    return {family: run_gptq(resolve_source(str(checkpoints[family]), registry), out, settings)
            for family in ("llama", "mistral")}


def fp32_and_gptq_logits(checkpoint: Path, gptq: Path) -> tuple[np.ndarray, np.ndarray]:
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    ids = [1, *spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
           .encode(TEXT)]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        quant = AutoModelForCausalLM.from_pretrained(gptq, device_map="cpu")
        a = ref(torch.tensor([ids])).logits[0].float().numpy()
        b = quant(torch.tensor([ids])).logits[0].float().numpy()
    return a, b


def mean_kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    from localmed.bench.scoring import log_softmax

    p, q = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gptq_checkpoint_is_a_standard_hf_one(family, gptq_models):
    folder = gptq_models[family]
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", 4, 128)
    assert list(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.model").is_file()
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    manifest = json.loads((folder / "localmed.manifest.json").read_text())
    assert manifest["calibration"]["texts"] == 16 and manifest["bits"] == 4
    assert len(manifest["calibration"]["sha256"]) == 64
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gptq_reloads_in_transformers_close_to_fp32(family, checkpoints, gptq_models):
    ref, quant = fp32_and_gptq_logits(checkpoints[family], gptq_models[family])
    kld = mean_kld(ref, quant)
    print(f"{family}: GPTQ 4-bit g128 mean KLD vs fp32 = {kld:.4f}")
    # Q4_K_M of the same tiny random model measures ~0.13; 4-bit GPTQ lands in that range.
    assert 0 < kld < 0.5, kld
    # and it is still *this* model: far closer to it than a model with other weights
    other = "mistral" if family == "llama" else "llama"
    unrelated, _ = fp32_and_gptq_logits(checkpoints[other], gptq_models[other])
    assert kld < mean_kld(ref, unrelated) / 5


def test_one_chat_turn_through_the_transformers_runtime(gptq_models, no_network):
    from localmed.chat import ChatSession, open_runtime, resolve_chat_model
    from localmed.registry import Registry
    from localmed.runtimes.base import GenerationParams

    model = resolve_chat_model(str(gptq_models["llama"]), Registry.load())
    runtime = open_runtime(model)
    try:
        assert runtime.plan.label == "CPU" and runtime.info.quant == "GPTQ-4bit"
        session = ChatSession.open(model, runtime)
        session.params = GenerationParams(max_tokens=6, temperature=0.0)
        assert session.template_name == "gguf"  # the checkpoint's own chat template
        reply = "".join(session.ask("What is the first-line treatment of hypertension?"))
    finally:
        runtime.close()
    assert session.stats.generated_tokens >= 1
    assert session.conversation.messages[-1].content == reply.strip()
    assert no_network == []


def test_bench_puts_gptq_beside_the_gguf_quants(gptq_models, bench_models, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for quant in ("F16", "Q4_K_M"):
        (folder / f"llama.{quant}.gguf").symlink_to(bench_models / f"llama.{quant}.gguf")
    (folder / gptq_models["llama"].name).symlink_to(gptq_models["llama"])
    out = tmp_path / "out"
    code = cli.main(["bench", str(folder), "--data", str(SHARED / "benchmarks" / "medqa.jsonl"),
                     "--limit", "6", "--text", str(CALIBRATION), "--text-docs", "1",
                     "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    gptq = [r for r in results["runs"] if r["quant"] == "GPTQ-4bit"]
    assert len(gptq) == 1 and gptq[0]["n"] == 6
    assert gptq[0]["option_kld"] > 0 and gptq[0]["text_kld"] > 0
    assert gptq[0]["decode_tps"] > 0


class TestBadInput:
    def run(self, capsys, *args: str) -> str:
        code = cli.main(["quantize", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    def test_bits_must_be_2_3_4_or_8(self, checkpoints, tmp_path, capsys):
        err = self.run(capsys, str(checkpoints["llama"]), "--format", "gptq", "--bits", "5",
                       "--out", str(tmp_path / "o"))
        assert "--bits 5" in err and "2, 3, 4, 8" in err
        assert not (tmp_path / "o").exists()

    def test_unsupported_architecture(self, tmp_path, capsys):
        src = tmp_path / "gpt2"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
        (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
        out = tmp_path / "o"
        err = self.run(capsys, str(src), "--format", "gptq", "--out", str(out),
                       "--calibration", str(CALIBRATION))
        assert "unsupported architecture GPT2LMHeadModel" in err
        assert not out.exists() or not list(out.iterdir())

    def test_calibration_missing(self, checkpoints, tmp_path, capsys):
        out = tmp_path / "o"
        err = self.run(capsys, str(checkpoints["llama"]), "--format", "gptq", "--out", str(out),
                       "--calibration", str(tmp_path / "nope.jsonl"))
        assert "calibration file not found" in err
        assert not out.exists() or not list(out.iterdir())

    def test_calibration_empty(self, checkpoints, tmp_path, capsys):
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        out = tmp_path / "o"
        err = self.run(capsys, str(checkpoints["llama"]), "--format", "gptq", "--out", str(out),
                       "--calibration", str(empty))
        assert "no calibration text" in err
        assert not out.exists() or not list(out.iterdir())


class TestTransformersRuntime:
    """The GPTQ Runtime keeps the whole Runtime contract, as the llama.cpp one does."""

    @pytest.fixture(scope="class")
    def runtime(self, gptq_models):
        from localmed import formats

        runtime = formats.load_runtime(gptq_models["llama"])
        yield runtime
        runtime.close()

    def test_next_logits_reuses_the_shared_prefix(self, runtime):
        # GPTQModel runs this model in bf16 on the CPU: evaluating the same tokens in two steps
        # or in one rounds differently, by up to ~0.03 in a logit. A wrong context (what a
        # mistaken cache reuse gives) moves logits by far more, which the test also checks.
        tolerance = 0.08
        shared = runtime.tokenize(TEXT + "\nAnswer:")
        a = [*shared, *runtime.tokenize(" A", add_bos=False)]
        b = [*shared, *runtime.tokenize(" B. a longer tail", add_bos=False)]
        first = runtime.next_logits(a)
        before = runtime.tokens_evaluated
        reused = runtime.next_logits(b)
        # Only the part after the shared prefix is evaluated again.
        assert runtime.tokens_evaluated - before == len(b) - len(shared)
        full = runtime.sequence_logits(b)[-1]
        assert np.abs(reused - full).max() < tolerance
        assert np.abs(first - full).max() > 10 * tolerance
        assert int(reused.argmax()) == int(full.argmax())
        # A prompt that shares only BOS is evaluated after it, and still right.
        c = runtime.tokenize("Unrelated text about renal function.")
        assert c[0] == b[0] and c[1] != b[1]
        before = runtime.tokens_evaluated
        assert np.abs(runtime.next_logits(c) - runtime.sequence_logits(c)[-1]).max() < tolerance
        assert runtime.tokens_evaluated - before == (len(c) - 1) + len(c)

    def _ids(self, runtime, prompt: str = TEXT, **params) -> list[int]:
        from localmed.runtimes.base import GenerationParams

        settings = {"max_tokens": 24, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                    "min_p": 0.0, "repeat_penalty": 1.0, **params}
        list(runtime.stream(prompt, GenerationParams(**settings)))
        return list(runtime.last_stats.token_ids)

    def test_min_p_is_honoured(self, runtime):
        greedy = self._ids(runtime)
        # At temperature 5 sampling wanders; min_p = 1 keeps only the most likely token.
        assert self._ids(runtime, temperature=5.0) != greedy
        assert self._ids(runtime, temperature=5.0, min_p=1.0) == greedy

    def test_top_k_is_honoured(self, runtime):
        assert self._ids(runtime, temperature=5.0, top_k=1) == self._ids(runtime)

    def test_repeat_penalty_is_honoured(self, runtime):
        window = 64  # llama.cpp's penalty_last_n
        prompt = "aspirin aspirin aspirin aspirin aspirin aspirin aspirin"
        prompt_ids = runtime.tokenize(prompt)

        def repeats(ids: list[int]) -> int:
            return sum(t in [*prompt_ids, *ids[:i]][-window:] for i, t in enumerate(ids))

        assert repeats(self._ids(runtime, prompt, max_tokens=48)) > 0  # greedy echoes the prompt
        assert repeats(self._ids(runtime, prompt, max_tokens=48, repeat_penalty=1e6)) == 0


def test_gptq_export_leaves_no_logs_folder_where_it_runs(checkpoints, tmp_path, monkeypatch):
    work = tmp_path / "clinic-folder"
    work.mkdir()
    monkeypatch.chdir(work)
    code = cli.main(["quantize", str(checkpoints["llama"]), "--format", "gptq",
                     "--calibration", str(CALIBRATION), "--samples", "8",
                     "--out", str(tmp_path / "out")])
    assert code == 0
    assert list(work.iterdir()) == []  # GPTQModel writes ./logs/ unless kept away from here
    assert Path.cwd() == work
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["llama-GPTQ-4bit-g128"]


def test_gptq_manifest_uses_the_one_provenance_schema(gptq_models, converted):
    from localmed import formats
    from localmed.provenance import Provenance

    folder = gptq_models["llama"]
    manifest = json.loads((folder / "localmed.manifest.json").read_text())
    gguf = converted["llama"]["Q8_0"]
    gguf_manifest = json.loads(gguf.with_name(gguf.name.replace(".gguf", ".manifest.json"))
                               .read_text())
    record = Provenance.from_manifest(manifest)
    assert record is not None and record.quant == "GPTQ-4bit"
    assert record.calibration["sha256"] == manifest["calibration"]["sha256"]
    # The same field names, spelled the same way, as the GGUF manifest.
    provenance_keys = set(record.to_manifest())
    assert provenance_keys - {"calibration"} <= set(gguf_manifest)
    assert "localmed_version" not in manifest
    assert formats.describe(folder).provenance == record


def test_serve_gives_a_gptq_folder_one_reply_at_a_time(gptq_models):
    """transformers' runtime behind `localmed serve`: answered in order, one at a time; what
    only llama.cpp's samplers can do is a 400 naming it; --parallel is refused at start."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.test_serve import Server, free_port

    folder = gptq_models["llama"]
    refused = subprocess.run([sys.executable, "-m", "localmed", "serve", str(folder),
                              "--parallel", "2", "--port", str(free_port())], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "--parallel needs a GGUF" in refused.stderr
    running = Server(folder, "--queue", "4")
    try:
        def ask(i: int) -> int:
            return httpx.post(f"{running.url}/v1/completions", timeout=300, json={
                "prompt": f"Patient {i}", "max_tokens": 4, "temperature": 0}).status_code

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(ask, range(3))) == [200, 200, 200]
        r = httpx.post(f"{running.url}/v1/completions", timeout=60, json={
            "prompt": "x", "max_tokens": 4, "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
        r = httpx.post(f"{running.url}/v1/completions", timeout=60, json={
            "prompt": "x", "max_tokens": 4, "seed": 3})
        assert r.status_code == 400 and "serve a GGUF" in r.json()["error"]["message"]
        r = httpx.post(f"{running.url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "logprobs": True})
        assert r.status_code == 400 and "serve a GGUF" in r.json()["error"]["message"]
    finally:
        running.stop()
