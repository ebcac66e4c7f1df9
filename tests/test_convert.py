"""Converted GGUFs run in llama.cpp and give transformers' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

MEDICAL_TEXT = (
    "A 58-year-old woman with type 2 diabetes presents with crushing substernal chest pain "
    "radiating to the left arm. ECG shows ST elevation in leads II, III and aVF; troponin I is "
    "elevated. Start aspirin 325 mg, heparin, and arrange emergent PCI."
)


def hf_ids(folder: Path, text: str) -> list[int]:
    """Token ids (with BOS) from the checkpoint's own tokenizer."""
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm

        return [1, *spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    # F32 KV cache: the default F16 cache alone moves logits by ~1e-3.
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kld(ref: np.ndarray, other: np.ndarray) -> float:
    p, q = log_softmax(ref), log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "llama3"])
def test_f32_gguf_logits_match_transformers(family, checkpoints, converted):
    ids = hf_ids(checkpoints[family], MEDICAL_TEXT)
    ref = hf_logits(checkpoints[family], ids)
    got = gguf_logits(converted[family]["F32"], ids)
    assert got.shape == ref.shape
    # Every position, every vocab entry: same numbers to float32 rounding.
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_quant_kld_is_ordered(checkpoints, converted):
    ids = hf_ids(checkpoints["llama"], MEDICAL_TEXT)
    ref = gguf_logits(converted["llama"]["F32"], ids)
    kld = {q: mean_kld(ref, gguf_logits(converted["llama"][q], ids))
           for q in ("Q8_0", "Q4_K_M", "Q2_K")}
    assert 0 < kld["Q8_0"] < kld["Q4_K_M"] < kld["Q2_K"], kld
    assert kld["Q8_0"] < 5e-3, kld  # measured 1.2e-3 on this random model


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_quantized_files_load_and_generate(quant, converted):
    import llama_cpp

    llm = llama_cpp.Llama(str(converted["llama"][quant]), n_ctx=128, verbose=False, n_threads=2)
    out = llm.create_completion("The patient presents with", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    assert isinstance(out["choices"][0]["text"], str)
    llm.close()


def _reader_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("quant,file_type", [("F32", 0), ("Q8_0", 7), ("Q4_K_M", 15),
                                             ("Q2_K", 10)])
def test_metadata_and_provenance(quant, file_type, checkpoints, converted):
    from localmed.provenance import sha256_file

    path = converted["llama"][quant]
    reader = gguf.GGUFReader(path)
    assert _reader_value(reader, "general.file_type") == file_type
    assert _reader_value(reader, "localmed.quant") == quant
    template = json.loads((checkpoints["llama"] / "tokenizer_config.json").read_text())
    assert _reader_value(reader, "tokenizer.chat_template") == template["chat_template"]
    hashes = json.loads(_reader_value(reader, "localmed.inputs_sha256"))
    assert hashes["model.safetensors"] == sha256_file(checkpoints["llama"] / "model.safetensors")
    assert hashes["tokenizer.model"] == sha256_file(checkpoints["llama"] / "tokenizer.model")
    manifest = json.loads(path.with_name(path.name.replace(".gguf", ".manifest.json")).read_text())
    assert manifest["sha256"] == sha256_file(path)
    assert manifest["bytes"] == path.stat().st_size
    assert manifest["quant"] == quant
    assert manifest["created"] == _reader_value(reader, "localmed.created")


def test_sizes_shrink_with_bits(converted):
    sizes = {q: p.stat().st_size for q, p in converted["llama"].items()}
    assert sizes["F32"] > sizes["Q8_0"] > sizes["Q4_K_M"] > sizes["Q2_K"]


def test_mixtral_experts_are_merged(checkpoints, converted):
    config = json.loads((checkpoints["mixtral"] / "config.json").read_text())
    reader = gguf.GGUFReader(converted["mixtral"]["F32"])
    tensors = {t.name: t for t in reader.tensors}
    assert _reader_value(reader, "llama.expert_count") == config["num_local_experts"]
    assert _reader_value(reader, "llama.expert_used_count") == config["num_experts_per_tok"]
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    # GGUF lists dimensions fastest-first: (hidden, ffn, experts).
    assert list(gate.shape) == [config["hidden_size"], config["intermediate_size"],
                                config["num_local_experts"]]
    assert not any("experts.0" in name for name in tensors)
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_llama3_tied_embeddings_and_bpe_metadata(converted):
    reader = gguf.GGUFReader(converted["llama3"]["F32"])
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert _reader_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert _reader_value(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert _reader_value(reader, "llama.rope.freq_base") == pytest.approx(500000.0)
    types = reader.fields["tokenizer.ggml.token_type"]
    eot = 128009  # <|eot_id|>: must be a control token to end a turn
    assert int(types.contents(eot)) == int(gguf.TokenType.CONTROL)


def test_bf16_checkpoint_converts_exactly_and_quantizes_from_bf16(tmp_path):
    """bf16 weights stay bf16 (no f16 overflow), and K-quants are made from a BF16 file."""
    from localmed.quantize.pipeline import prepare, resolve_source, run_quantize
    from localmed.quants import parse_quant_list
    from localmed.registry import Registry
    from tests.tiny_models import build_spm_model

    folder = build_spm_model(tmp_path / "bf16", "mistral", seed=5, dtype="bfloat16")
    source = resolve_source(str(folder), Registry.load())
    assert prepare(source).intermediate.name == "BF16"
    outputs = run_quantize(source, parse_quant_list("BF16,Q4_K_M"), tmp_path / "out",
                           threads=2)
    files = {o.quant: o.path for o in outputs}
    reader = gguf.GGUFReader(files["BF16"])
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert q.tensor_type == gguf.GGMLQuantizationType.BF16
    ids = hf_ids(folder, MEDICAL_TEXT)
    ref = hf_logits(folder, ids)  # the bf16 weights, computed in float32
    got = gguf_logits(files["BF16"], ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    assert mean_kld(ref, got) < 1e-3
    assert mean_kld(ref, gguf_logits(files["Q4_K_M"], ids)) < 0.5
