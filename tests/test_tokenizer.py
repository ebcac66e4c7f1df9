"""Token ids from converted GGUFs equal llama.cpp's test vectors and the model's own tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_convert import MEDICAL_TEXT
from tests.tiny_models import read_vocab_cases

MEDICAL_CASES = [
    MEDICAL_TEXT,
    "Metformin 500 mg PO BID; HbA1c 8.2% → titrate to 1000 mg. eGFR ≥ 45 mL/min/1.73m².",
    "Dx: acute cholecystitis (Murphy's sign +). Tx: NPO, IV ceftriaxone 2 g q24h, lap chole.",
    "  Pt c/o SOB x3d,   BNP 1,240 pg/mL\n\tCXR: bilateral effusions.",
]


def _vocab_llm(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _gguf_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def test_spm_vectors_match_sentencepiece_and_gguf(checkpoints, converted):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(checkpoints["llama"] / "tokenizer.model"))
    llm = _vocab_llm(converted["llama"]["F32"])
    cases = read_vocab_cases("llama-spm")
    assert len(cases) == 46
    for text, expected in cases:
        assert sp.encode(text) == expected, text  # the reference is right
        assert _gguf_ids(llm, text) == expected, text


def test_bpe_vectors_match_gguf(converted):
    llm = _vocab_llm(converted["llama3"]["F32"])
    cases = read_vocab_cases("llama-bpe")
    assert len(cases) == 46
    for text, expected in cases:
        assert _gguf_ids(llm, text) == expected, text


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
def test_spm_medical_text_matches_sentencepiece(family, checkpoints, converted):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(checkpoints[family] / "tokenizer.model"))
    llm = _vocab_llm(converted[family]["F32"])
    for text in MEDICAL_CASES:
        assert _gguf_ids(llm, text) == sp.encode(text), text


def test_bpe_medical_text_matches_hf_tokenizer(checkpoints, converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints["llama3"])
    llm = _vocab_llm(converted["llama3"]["F32"])
    for text in MEDICAL_CASES:
        assert _gguf_ids(llm, text) == tok.encode(text, add_special_tokens=False), text


def test_special_tokens_parse_as_one_token(converted):
    llm = _vocab_llm(converted["llama3"]["F32"])
    ids = llm.tokenize(b"<|start_header_id|>user<|end_header_id|>", add_bos=False, special=True)
    assert ids[0] == 128006 and ids[-1] == 128007 and len(ids) == 3
    spm = _vocab_llm(converted["llama"]["F32"])
    assert spm.tokenize(b"</s>", add_bos=False, special=True) == [2]
