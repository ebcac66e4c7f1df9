"""A real pretrained model (SmolLM2-135M-Instruct) from checkpoint to GGUF to chat to bench, and
architectures localmed does not convert itself (Gemma 3) through llama.cpp's own converter."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from localmed import cli
from localmed.chat import ChatSession
from tests.test_convert import gguf_logits, hf_logits, mean_kld
from tests.tiny_models import SHARED, build_gemma3_model

MEDICAL_TEXT = ("A 58-year-old woman with type 2 diabetes presents with crushing substernal chest "
                "pain radiating to the left arm; troponin I is elevated. Start aspirin 325 mg, "
                "heparin 60 U/kg, and arrange emergent PCI (door-to-balloon < 90 min).")


def tokenizer_inputs() -> list[str]:
    texts = []
    for inp in sorted((SHARED / "vocab").glob("*.inp")):
        texts += inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return [*texts, MEDICAL_TEXT]


def token_mismatches(reference: Path, candidate: Path) -> list[str]:
    """Inputs that llama.cpp tokenizes differently with the two GGUFs' vocabularies."""
    import llama_cpp

    a = llama_cpp.Llama(str(reference), vocab_only=True, verbose=False)
    b = llama_cpp.Llama(str(candidate), vocab_only=True, verbose=False)
    return [text for text in tokenizer_inputs()
            if a.tokenize(text.encode(), add_bos=False, special=True)
            != b.tokenize(text.encode(), add_bos=False, special=True)]


@contextlib.contextmanager
def chat_session(path: Path, *, n_ctx: int, max_tokens: int, template: str | None = None,
                 system: str = "") -> Iterator[ChatSession]:
    """A chat session on a GGUF, as `localmed chat FILE` opens one, greedy decoding."""
    from localmed.chat import open_runtime, resolve_chat_model
    from localmed.registry import Registry
    from localmed.runtimes.base import GenerationParams

    model = resolve_chat_model(str(path), Registry.load())
    runtime = open_runtime(model, n_ctx=n_ctx, threads=2)
    try:
        session = ChatSession.open(model, runtime, template=template, system=system)
        session.params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
        yield session
    finally:
        runtime.close()


def gguf_field(path: Path, key: str) -> object:
    from localmed.formats.gguf_header import read_header

    return read_header(path).fields.get(key)


class TestSmolLM2:
    def test_converted_natively_with_llama_cpps_pre_tokenizer(self, smollm2_converted):
        path = smollm2_converted["F16"]
        assert gguf_field(path, "tokenizer.ggml.pre") == "smollm"
        manifest = json.loads(path.with_name(path.name.replace(".gguf", ".manifest.json"))
                              .read_text())
        assert manifest["converter"] == "localmed"

    def test_token_ids_equal_the_original_gguf(self, smollm2, smollm2_converted):
        assert token_mismatches(smollm2["gguf"], smollm2_converted["F16"]) == []

    def test_a_wrong_pre_tokenizer_is_caught(self, smollm2, tmp_path, monkeypatch):
        # The same comparison fails when the GGUF names a pre-tokenizer other than the model's.
        import localmed.quantize.vocab
        from localmed.quantize.pipeline import resolve_source, run_quantize
        from localmed.quants import parse_quant_list
        from localmed.registry import Registry

        monkeypatch.setattr(localmed.quantize.vocab, "identify_pre_tokenizer",
                            lambda folder: "llama-bpe")
        source = resolve_source(str(smollm2["checkpoint"]), Registry.load())
        wrong = run_quantize(source, parse_quant_list("Q8_0"), tmp_path)[0].path
        assert gguf_field(wrong, "tokenizer.ggml.pre") == "llama-bpe"
        assert token_mismatches(smollm2["gguf"], wrong)

    def test_f32_logits_equal_transformers(self, smollm2, smollm2_converted):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(smollm2["checkpoint"]).encode(MEDICAL_TEXT)
        ref = hf_logits(smollm2["checkpoint"], ids)
        f32 = gguf_logits(smollm2_converted["F32"], ids)
        assert np.abs(f32 - ref).max() < 2e-4
        # F16 weights and activations: close in distribution, far below what Q8_0 costs.
        f16 = gguf_logits(smollm2_converted["F16"], ids)
        assert mean_kld(ref, f16) < 1e-4

    def test_q8_0_costs_less_than_q4_k_m(self, smollm2, smollm2_converted):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(smollm2["checkpoint"]).encode(MEDICAL_TEXT)
        ref = gguf_logits(smollm2_converted["F32"], ids)
        kld = {q: mean_kld(ref, gguf_logits(smollm2_converted[q], ids))
               for q in ("F16", "Q8_0", "Q4_K_M")}
        assert kld["F16"] < kld["Q8_0"] < kld["Q4_K_M"], kld

    def test_llama_cpp_converter_gives_the_same_model(self, smollm2, smollm2_converted,
                                                      tmp_path):
        from localmed.quantize.pipeline import resolve_source, run_quantize
        from localmed.quants import parse_quant_list
        from localmed.registry import Registry

        source = resolve_source(str(smollm2["checkpoint"]), Registry.load())
        out = run_quantize(source, parse_quant_list("F16"), tmp_path,
                           converter="llama.cpp")[0]
        assert out.converter.startswith("llama.cpp's convert_hf_to_gguf.py")
        manifest = json.loads(out.manifest.read_text())
        assert manifest["converter"] == out.converter
        assert manifest["inputs_sha256"]["model.safetensors"]
        assert gguf_field(out.path, "localmed.converter") == out.converter
        assert token_mismatches(smollm2["gguf"], out.path) == []
        ids = [1, 504, 3458, 282, 4649, 314, 253, 1789]
        np.testing.assert_allclose(gguf_logits(out.path, ids),
                                   gguf_logits(smollm2_converted["F16"], ids), atol=1e-5)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    def test_chat_answers_with_the_embedded_template(self, smollm2_converted, no_network):
        with chat_session(smollm2_converted["Q4_K_M"], n_ctx=512, max_tokens=48) as session:
            assert session.template_name == "gguf"  # SmolLM2's own ChatML template
            reply = "".join(session.ask("What is the capital of France?"))
            assert "Paris" in reply
            assert session.stats.stopped_by == "eos"  # <|im_end|> ended the reply
            assert "<|im_end|>" not in reply and "<|im_start|>" not in reply
            # SmolLM2 asks for no BOS, and its "BOS" is <|im_start|>: the template's text is
            # the prompt as it stands (it used to be cut off as if the runtime would add it).
            assert not session.runtime.info.add_bos
            assert session.last_prompt.text.startswith("<|im_start|>system\n")
            tokens = session.runtime.tokenize(session.last_prompt.text)
            assert tokens[0] == session.runtime.tokenize("<|im_start|>", add_bos=False)[0]
        assert no_network == []

    def test_bench_runs_on_it(self, smollm2_converted, tmp_path):
        folder = tmp_path / "smollm2"
        folder.mkdir()
        for quant in ("F16", "Q4_K_M"):
            (folder / smollm2_converted[quant].name).symlink_to(smollm2_converted[quant])
        out = tmp_path / "results"
        code = cli.main(["bench", str(folder), "--data",
                         str(SHARED / "benchmarks" / "medqa.jsonl"), "--limit", "8",
                         "--text-docs", "0", "--threads", "2", "--out", str(out)])
        assert code == 0
        runs = {r["quant"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
        assert runs["F16"]["n"] == 8 and runs["Q4_K_M"]["n"] == 8
        assert runs["Q4_K_M"]["agreement"] is not None


class TestGemma3Real:
    """A real pretrained Gemma 3 (270M, base) through llama.cpp's converter."""

    def test_converted_by_llama_cpp_with_the_original_token_ids(self, gemma3_real):
        assert gemma3_real["converter"].startswith("llama.cpp's convert_hf_to_gguf.py")
        assert gguf_field(gemma3_real["Q4_K_M"], "general.architecture") == "gemma3"
        assert token_mismatches(gemma3_real["gguf"], gemma3_real["F16"]) == []
        assert token_mismatches(gemma3_real["gguf"], gemma3_real["Q4_K_M"]) == []

    def test_f16_logits_agree_with_transformers(self, gemma3_real):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(gemma3_real["checkpoint"]).encode(MEDICAL_TEXT)
        ref = hf_logits(gemma3_real["checkpoint"], ids)
        assert mean_kld(ref, gguf_logits(gemma3_real["F16"], ids)) < 1e-3

    def test_chats_with_the_gemma_template(self, gemma3_real, no_network):
        # A base model ships no template: chat says so unless one is named.
        with chat_session(gemma3_real["Q4_K_M"], n_ctx=512, max_tokens=16,
                          template="gemma") as session:
            reply = "".join(session.ask("Which organ pumps blood through the body?"))
            assert session.last_prompt.text.startswith("<start_of_turn>user\nWhich organ")
            assert reply.strip() and session.stats.generated_tokens >= 1
            assert "<end_of_turn>" not in reply
        assert no_network == []


class TestLlamaCppPath:
    @pytest.fixture(scope="class")
    def gemma3(self, tmp_path_factory) -> dict[str, Path]:
        from localmed.quantize.pipeline import resolve_source, run_quantize
        from localmed.quants import parse_quant_list
        from localmed.registry import Registry

        root = tmp_path_factory.mktemp("gemma3")
        folder = build_gemma3_model(root / "tiny-gemma3")
        outputs = run_quantize(resolve_source(str(folder), Registry.load()),
                               parse_quant_list("F32,Q4_K_M"), root / "out")
        return {"checkpoint": folder, **{o.quant: o.path for o in outputs}}

    def test_gemma3_converts_through_llama_cpp_with_provenance(self, gemma3):
        path = gemma3["Q4_K_M"]
        assert gguf_field(path, "general.architecture") == "gemma3"
        assert gguf_field(path, "localmed.quant") == "Q4_K_M"
        assert str(gguf_field(path, "localmed.converter")).startswith("llama.cpp's")
        hashes = json.loads(str(gguf_field(path, "localmed.inputs_sha256")))
        assert {"model.safetensors", "config.json", "tokenizer.model"} <= set(hashes)
        manifest = json.loads(path.with_name(path.name.replace(".gguf", ".manifest.json"))
                              .read_text())
        assert manifest["gguf_architecture"] == "gemma3"
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]

    def test_gemma3_logits_equal_transformers(self, gemma3):
        # longer than the sliding window (8), so local and global attention both count
        ids = [1, 450, 4799, 7051, 297, 278, 2343, 338, 263, 1243, 29889, 450, 12118, 310, 278]
        ref = hf_logits(gemma3["checkpoint"], ids)
        # six layers of GELU-tanh and QK-norm: ~2e-3 on logits of magnitude ~6 (a wrong layer
        # pattern or RoPE base shows as ~0.5)
        assert np.abs(gguf_logits(gemma3["F32"], ids) - ref).max() < 5e-3

    def test_gemma3_chats_with_its_template_and_turn_token(self, gemma3, no_network):
        with chat_session(gemma3["Q4_K_M"], n_ctx=256, max_tokens=8,
                          system="Answer briefly.") as session:
            assert "<end_of_turn>" in session.template_choice.template.stop
            list(session.ask("hello"))
            assert session.last_prompt.text.startswith(
                "<start_of_turn>user\nAnswer briefly.\n\nhello<end_of_turn>\n")
            assert session.stats.generated_tokens >= 1
        assert no_network == []


class TestBadInput:
    def run(self, capsys, *args: str) -> str:
        capsys.readouterr()  # what building the fixture printed
        code = cli.main(["quantize", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
        return errors[0]

    def test_an_architecture_neither_converter_knows(self, tmp_path, capsys):
        src = tmp_path / "foo"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"architectures": ["FooBarForCausalLM"]}))
        (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
        err = self.run(capsys, str(src), "--out", str(tmp_path / "o"))
        assert "unsupported architecture FooBarForCausalLM" in err
        assert "llama-cpp-python 0.3.36" in err

    def test_a_checkpoint_llama_cpp_rejects_gets_its_one_line_reason(self, tmp_path, capsys):
        folder = build_gemma3_model(tmp_path / "no-tokenizer")
        (folder / "tokenizer.model").unlink()
        out = tmp_path / "o"
        err = self.run(capsys, str(folder), "--quant", "Q8_0", "--out", str(out))
        assert "convert_hf_to_gguf.py" in err and "failed: FileNotFoundError" in err
        assert not list(out.iterdir())

    def test_the_converter_missing_names_the_command_that_gets_it(self, tmp_path, capsys,
                                                                 monkeypatch):
        monkeypatch.setenv("LOCALMED_LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
        folder = build_gemma3_model(tmp_path / "g")
        err = self.run(capsys, str(folder), "--out", str(tmp_path / "o"))
        assert "localmed install-converter" in err

    def test_a_bpe_pre_tokenizer_neither_converter_knows(self, smollm2, tmp_path, capsys):
        # SmolLM2 with a space added before the text by its byte-level step: a pre-tokenizer
        # that neither localmed nor llama.cpp has in its table.
        folder = tmp_path / "odd-tokenizer"
        folder.mkdir()
        for item in smollm2["checkpoint"].iterdir():
            if not item.name.startswith("."):
                (folder / item.name).symlink_to(item)
        data = json.loads((smollm2["checkpoint"] / "tokenizer.json").read_text())
        assert data["pre_tokenizer"]["type"] == "ByteLevel"
        data["pre_tokenizer"]["add_prefix_space"] = True
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.json").write_text(json.dumps(data))
        out = tmp_path / "o"
        err = self.run(capsys, str(folder), "--quant", "Q8_0", "--out", str(out))
        assert "no tokenizer found" not in err
        assert "BPE pre-tokenizer" in err and "not recognized" in err  # llama.cpp's reason
        assert "not one llama.cpp knows (checksum" in err  # what localmed found
        assert not list(out.iterdir())


def test_every_registry_model_has_a_converter(capsys):
    from localmed.quantize.families import native_architectures
    from localmed.quantize.llama_cpp_source import converter_table
    from localmed.registry import Registry

    known = set(native_architectures()) | converter_table().architectures
    registry = Registry.load()
    assert {e.architecture for e in registry.values()} <= known
    assert cli.main(["models", "--json"]) == 0
    rows = {r["id"]: r["converter"] for r in json.loads(capsys.readouterr().out)}
    assert rows["medgemma-27b-text-it"] == "llama.cpp" and rows["ii-medical-8b"] == "llama.cpp"
    assert rows["meditron3-8b"] == "localmed" and rows["biomistral-7b"] == "localmed"


def test_a_forced_llama_cpp_conversion_that_fails_blames_llama_cpp_alone(checkpoints, tmp_path,
                                                                        capsys):
    # localmed's converter was not tried, so the error must not report it as refusing.
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoints["llama"], folder)
    (folder / "tokenizer.model").unlink()
    capsys.readouterr()
    code = cli.main(["quantize", str(folder), "--quant", "Q8_0", "--converter", "llama.cpp",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "convert_hf_to_gguf.py" in err and "failed" in err
    assert "localmed's converter" not in err
