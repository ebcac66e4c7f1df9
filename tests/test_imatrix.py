"""Importance matrices in llama.cpp's format: written, read back with gguf-py, validated against
the model, and used by llama.cpp's quantizer (the I-quants need one)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from localmed import cli
from tests.test_bad_inputs import assert_one_line_error, leftovers, run_cli
from tests.test_convert import MEDICAL_TEXT

CALIBRATION = [MEDICAL_TEXT, "Sepsis: lactate, cultures, antibiotics within the hour.",
               "Stroke: time of onset, glucose, CT before thrombolysis."]


def activations_imatrix(checkpoint: Path, out: Path) -> Path:
    """sum(x^2) per input column of every linear layer in the blocks, with token counts, from
    the checkpoint's real activations on medical text (what llama-imatrix collects)."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    from quantize.imatrix import ImportanceMatrix, write_imatrix

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    matrix = ImportanceMatrix(datasets=["tests: three medical sentences"], chunk_size=64)
    hooks = []
    for hf_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in hf_name:
            name = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))

            def hook(_m, inputs, _o, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums = matrix.sums.setdefault(name, np.zeros(x.shape[1], np.float32))
                sums += (x * x).sum(0).float().numpy()
                counts = matrix.counts.setdefault(name, np.zeros(1, np.float32))
                counts += x.shape[0]

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for text in CALIBRATION:
            model(torch.tensor([[1, *sp.encode(text)]]))
            matrix.chunk_count += 1
    for handle in hooks:
        handle.remove()
    write_imatrix(out, matrix)
    return out


@pytest.fixture(scope="module")
def imatrix_file(checkpoints, tmp_path_factory) -> Path:
    return activations_imatrix(checkpoints["llama"],
                               tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf")


def test_the_file_is_llama_cpps_imatrix_format(imatrix_file):
    reader = gguf.GGUFReader(imatrix_file)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_count"].contents() == 3
    assert reader.fields["imatrix.datasets"].contents() == ["tests: three medical sentences"]
    tensors = {t.name: t for t in reader.tensors}
    # two layers x (q, k, v, o, gate, up, down), each with sums and counts
    assert len(tensors) == 2 * 7 * 2
    assert tensors["blk.0.attn_q.weight.in_sum2"].data.size == 256
    assert tensors["blk.1.ffn_down.weight.in_sum2"].data.size == 512
    counts = tensors["blk.0.attn_q.weight.counts"].data
    assert counts.size == 1 and counts[0] > 50
    assert "output.weight.in_sum2" not in tensors  # the output head is left out


def test_quantizing_with_it_differs_and_is_recorded(checkpoints, imatrix_file, tmp_path):
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q3_K_M",
                     "--out", str(plain)]) == 0
    assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q3_K_M",
                     "--out", str(weighted), "--imatrix", str(imatrix_file)]) == 0
    a = gguf.GGUFReader(plain / "llama.Q3_K_M.gguf")
    b = gguf.GGUFReader(weighted / "llama.Q3_K_M.gguf")
    q_a = next(t for t in a.tensors if t.name == "blk.0.attn_q.weight")
    q_b = next(t for t in b.tensors if t.name == "blk.0.attn_q.weight")
    assert q_a.tensor_type == q_b.tensor_type and not np.array_equal(q_a.data, q_b.data)
    manifest = json.loads((weighted / "llama.Q3_K_M.manifest.json").read_text())
    assert manifest["imatrix_file"] == imatrix_file.name and len(manifest["imatrix_sha256"]) == 64
    assert b.fields["localmed.imatrix_file"].contents() == imatrix_file.name


@pytest.mark.parametrize("quant", ["IQ2_XS", "IQ1_S", "Q2_K_S"])
def test_imatrix_only_types_load_and_generate(quant, checkpoints, imatrix_file, tmp_path):
    import llama_cpp

    assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", quant,
                     "--out", str(tmp_path), "--imatrix", str(imatrix_file)]) == 0
    path = tmp_path / f"llama.{quant}.gguf"
    llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False, n_threads=2)
    out = llm.create_completion("The patient", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1
    llm.close()


class TestBadImatrix:
    def test_without_an_imatrix_the_i_quants_are_refused(self, checkpoints, tmp_path, capsys):
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "IQ2_XS",
                            "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, "IQ2_XS", "--imatrix FILE")

    def test_one_made_for_another_model_is_refused_before_quantizing(self, checkpoints,
                                                                     imatrix_file, tmp_path,
                                                                     capsys):
        from quantize.imatrix import read_imatrix, write_imatrix

        matrix = read_imatrix(imatrix_file)
        matrix.sums["blk.0.attn_q.weight"] = np.ones(512, np.float32)
        other = tmp_path / "other.imatrix.gguf"
        write_imatrix(other, matrix)
        out = tmp_path / "o"
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "Q4_K_M",
                            "--out", str(out), "--imatrix", str(other))
        assert_one_line_error(code, err, "blk.0.attn_q.weight", "made for another model")
        assert leftovers(out) == []

    def test_a_file_that_is_not_an_imatrix(self, checkpoints, converted, tmp_path, capsys):
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "Q4_K_M",
                            "--out", str(tmp_path / "o"), "--imatrix",
                            str(converted["llama"]["Q8_0"]))
        assert_one_line_error(code, err, "not an importance matrix")
