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


def activations_imatrix(checkpoint: Path, out: Path,
                        token_chunks: list[list[int]] | None = None) -> Path:
    """sum(x^2) per input column of every linear layer in the blocks, with token counts, from
    the checkpoint's real activations in transformers (an independent reference for what
    llama-imatrix collects): on ``token_chunks``, or on three medical sentences."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    from localmed.quantize.imatrix import ImportanceMatrix, write_imatrix

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    if token_chunks is None:
        token_chunks = [[1, *sp.encode(text)] for text in CALIBRATION]
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
        for chunk in token_chunks:
            model(torch.tensor([chunk]))
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


def test_ggml_s_own_list_of_matrix_types_is_within_the_quantizer_s():
    # llama.cpp's quantizer refuses six types without a matrix (tensor_requires_imatrix, not
    # exported); ggml's exported check knows the row quantizers' three. If ggml ever names one
    # that localmed's table lacks, the table is out of date.
    import gguf

    from localmed.quantize.ggml_rows import requires_imatrix
    from localmed.quantize.llama_quant import NEEDS_MATRIX

    ggml_says = {t.name.lower() for t in gguf.GGMLQuantizationType if requires_imatrix(t.value)}
    assert ggml_says and ggml_says <= set(NEEDS_MATRIX)


class TestBadImatrix:
    def test_without_an_imatrix_the_i_quants_are_refused(self, checkpoints, tmp_path, capsys):
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "IQ2_XS",
                            "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, "IQ2_XS", "--imatrix FILE")

    def test_one_made_for_another_model_is_refused_before_quantizing(self, checkpoints,
                                                                     imatrix_file, tmp_path,
                                                                     capsys):
        from localmed.quantize.imatrix import read_imatrix, write_imatrix

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


def test_llama_cpp_engine_collects_what_the_activations_are(checkpoints, converted, tmp_path):
    """The eval-callback engine, run on the F32 GGUF, gives the sums and counts that
    transformers' own activations give on the same token chunks."""
    import llama_cpp

    from localmed.quantize.imatrix import read_imatrix
    from localmed.quantize.imatrix_compute import compute_imatrix

    texts, n_ctx = [MEDICAL_TEXT] * 12, 64
    gguf_path = converted["llama"]["F32"]
    engine = compute_imatrix(gguf_path, texts, n_ctx=n_ctx, chunks=3, threads=2)
    vocab = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    ids = vocab.tokenize("\n\n".join(texts).encode(), add_bos=False, special=False)
    chunks = [[1, *ids[i * n_ctx + 1:(i + 1) * n_ctx]] for i in range(3)]
    reference = read_imatrix(activations_imatrix(checkpoints["llama"],
                                                 tmp_path / "ref.imatrix.gguf", chunks))
    assert engine.chunk_count == 3 and set(engine.sums) == set(reference.sums)
    for name in reference.sums:
        np.testing.assert_array_equal(engine.counts[name], reference.counts[name])
        np.testing.assert_allclose(engine.sums[name], reference.sums[name], rtol=2e-3,
                                   atol=1e-3, err_msg=name)


class TestImatrixCommand:
    def test_from_a_checkpoint_to_an_i_quant(self, checkpoints, tmp_path, capsys):
        from tests.tiny_models import SHARED

        calibration = SHARED / "benchmarks" / "pubmedqa_train.jsonl"
        out = tmp_path / "tiny.imatrix.gguf"
        assert cli.main(["imatrix", str(checkpoints["llama"]), "--calibration",
                         str(calibration), "--chunks", "4", "--ctx", "128", "--out",
                         str(out)]) == 0
        reader = gguf.GGUFReader(out)
        assert reader.fields["imatrix.chunk_count"].contents() == 4
        assert reader.fields["imatrix.chunk_size"].contents() == 128
        (dataset,) = reader.fields["imatrix.datasets"].contents()
        assert dataset.startswith("pubmedqa_train.jsonl sha256:")
        assert len([t for t in reader.tensors if t.name.endswith(".in_sum2")]) == 14
        assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "IQ2_XS",
                         "--imatrix", str(out), "--out", str(tmp_path / "q")]) == 0
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    @pytest.mark.parametrize("content,fragment", [
        (b"Chest pain.\n", "less than one 512-token chunk"),
        (b"\n\n", "no text in it"),
        (b"caf\xe9 au lait\n", "not UTF-8"),
    ])
    def test_bad_calibration_text(self, content, fragment, converted, tmp_path, capsys):
        calibration = tmp_path / "calibration.txt"
        calibration.write_bytes(content)
        out = tmp_path / "x.imatrix.gguf"
        code, err = run_cli(capsys, "imatrix", str(converted["llama"]["F32"]),
                            "--calibration", str(calibration), "--out", str(out))
        assert code == 2 and fragment in err.splitlines()[-1], err
        assert "Traceback" not in err and not out.exists()


class TestAuto:
    """--imatrix auto (the default): the types of 4 bits and fewer get this model's medical
    matrix, computed on the intermediate once and reused."""

    def test_computed_once_then_reused(self, checkpoints, tmp_path, capsys, monkeypatch):
        from localmed.public_data import calibration_path
        from tests.tiny_models import SHARED

        monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path / "data"))
        calibration_path().parent.mkdir(parents=True)
        calibration_path().write_bytes(
            (SHARED / "benchmarks" / "pubmedqa_train.jsonl").read_bytes())
        args = ["quantize", str(checkpoints["llama"]), "--quant", "Q8_0,Q3_K_M,IQ2_XS"]
        assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
        cached = list((tmp_path / "data" / "imatrix").glob("llama-*.imatrix.gguf"))
        assert len(cached) == 1
        reader = gguf.GGUFReader(cached[0])
        assert reader.fields["imatrix.datasets"].contents()[0].startswith("pubmedqa.jsonl")
        for quant, expected in (("Q3_K_M", cached[0].name), ("IQ2_XS", cached[0].name),
                                ("Q8_0", None)):
            manifest = json.loads((tmp_path / "a" / f"llama.{quant}.manifest.json").read_text())
            assert (manifest.get("imatrix_file") or None) == expected, quant
        mtime = cached[0].stat().st_mtime_ns
        capsys.readouterr()
        assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0
        assert "reusing" in capsys.readouterr().err
        assert cached[0].stat().st_mtime_ns == mtime
        # the same matrix gives the same quantized tensors
        first = gguf.GGUFReader(tmp_path / "a" / "llama.Q3_K_M.gguf")
        second = gguf.GGUFReader(tmp_path / "b" / "llama.Q3_K_M.gguf")
        for t1, t2 in zip(first.tensors, second.tensors, strict=True):
            assert np.array_equal(t1.data, t2.data), t1.name

    def test_without_calibration_text_it_says_so_and_goes_on(self, checkpoints, tmp_path,
                                                            capsys, monkeypatch):
        monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path / "data"))
        assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q4_K_M",
                         "--out", str(tmp_path / "o")]) == 0
        assert "quantizing without an importance matrix" in capsys.readouterr().err
        manifest = json.loads((tmp_path / "o" / "llama.Q4_K_M.manifest.json").read_text())
        assert "imatrix_file" not in manifest or not manifest["imatrix_file"]
        code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", "IQ2_XS",
                            "--out", str(tmp_path / "p"))
        assert_one_line_error(code, err, "IQ2_XS", "localmed data pull calibration")

    def test_none_and_a_chosen_calibration_file(self, checkpoints, tmp_path, monkeypatch):
        from tests.tiny_models import SHARED

        monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path / "data"))
        assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q3_K_M",
                         "--imatrix", "none", "--calibration",
                         str(SHARED / "benchmarks" / "pubmedqa_train.jsonl"),
                         "--out", str(tmp_path / "none")]) == 0
        assert not (tmp_path / "data" / "imatrix").exists()
        assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q3_K_M",
                         "--calibration", str(SHARED / "benchmarks" / "pubmedqa_train.jsonl"),
                         "--out", str(tmp_path / "chosen")]) == 0
        (cached,) = (tmp_path / "data" / "imatrix").glob("*.imatrix.gguf")
        datasets = gguf.GGUFReader(cached).fields["imatrix.datasets"].contents()
        assert datasets[0].startswith("pubmedqa_train.jsonl sha256:")
