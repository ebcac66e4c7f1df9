"""Importance-matrix quants as their own bench rows, and `localmed plan`'s quant suggestion:
measured bench results first, llama.cpp's published KLD order otherwise."""

from __future__ import annotations

import json

import pytest

from localmed import cli, paths
from localmed.quant_choice import PUBLISHED_KLD, Measured, choose_quant
from localmed.quants import QUANT_TYPES
from tests.test_bad_inputs import assert_one_line_error, leftovers, run_cli
from tests.test_bench import BENCH

GIB = 1 << 30


class TestPublishedOrder:
    def test_an_8b_model_in_6_gib(self):
        # 5 GiB for weights: Q5_K_S (5.2 GiB) does not fit; Q4_K_M with a matrix is the least loss
        choice = choose_quant(8_000_000_000, capacity=6 * GIB, fixed_bytes=GIB)
        assert choice is not None and choice.label == "Q4_K_M+imatrix" and not choice.measured
        assert choice.kld == PUBLISHED_KLD["Q4_K_M+imatrix"]

    def test_q8_0_is_the_ceiling(self):
        choice = choose_quant(8_000_000_000, capacity=200 * GIB, fixed_bytes=GIB)
        assert choice is not None and choice.label == "Q8_0"

    def test_a_70b_model_on_a_32_gib_laptop_needs_an_i_quant(self):
        # ~28 GiB available, 4 GiB of KV cache and overhead: 24 GiB (25.8 GB) for weights
        choice = choose_quant(70_000_000_000, capacity=28 * GIB, fixed_bytes=4 * GIB)
        assert choice is not None and choice.label == "IQ2_M+imatrix"

    def test_below_offers_only_smaller_quants_than_one_that_does_not_fit(self):
        # the estimate for Q4_K_M fits 6 GiB, but the model's own Q4_K_M file did not: the plan
        # offers something smaller, never the quant it already has
        choice = choose_quant(8_000_000_000, capacity=6 * GIB, fixed_bytes=GIB, below="Q4_K_M")
        assert choice is not None and choice.quant != "Q4_K_M"
        assert QUANT_TYPES[choice.quant].bits_per_weight < QUANT_TYPES["Q4_K_M"].bits_per_weight
        assert choice.label == "Q4_K_S+imatrix"  # the least loss among the smaller ones

    def test_nothing_fits(self):
        assert choose_quant(70_000_000_000, capacity=4 * GIB, fixed_bytes=GIB) is None

    def test_measured_results_win_over_the_table(self):
        measured = {"Q4_K_M": Measured(0.01, 5 * GIB), "Q3_K_M": Measured(0.5, 4 * GIB)}
        choice = choose_quant(8_000_000_000, capacity=7 * GIB, fixed_bytes=GIB,
                              measured=measured)
        assert choice is not None and choice.label == "Q4_K_M" and choice.measured
        # none measured fits: the published order again
        choice = choose_quant(8_000_000_000, capacity=4 * GIB, fixed_bytes=GIB,
                              measured=measured)
        assert choice is not None and not choice.measured


@pytest.fixture(scope="module")
def imatrix_bench(checkpoints, converted, tmp_path_factory):
    """A folder with F16, Q3_K_M (no matrix) and Q3_K_M with a matrix; benched into the data
    folder, where `localmed plan` looks."""
    from tests.test_imatrix import activations_imatrix

    folder = tmp_path_factory.mktemp("imatrix-bench") / "tiny-llama-imatrix"
    folder.mkdir()
    (folder / "llama.F16.gguf").symlink_to(converted["llama"]["F16"])
    matrix = activations_imatrix(checkpoints["llama"], folder.parent / "tiny.imatrix.gguf")
    assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q3_K_M", "--out",
                     str(folder), "--imatrix", "none"]) == 0
    assert cli.main(["quantize", str(checkpoints["llama"]), "--quant", "Q3_K_M", "--out",
                     str(folder), "--name", "llama-weighted", "--imatrix", str(matrix)]) == 0
    for manifest in folder.glob("*.manifest.json"):
        manifest.unlink()
    assert cli.main(["bench", str(folder), "--data", str(BENCH / "medqa.jsonl"), "--limit", "6",
                     "--text", str(BENCH / "pubmedqa_train.jsonl"), "--text-docs", "2"]) == 0
    results = paths.data_dir() / "bench" / folder.name / "results.json"
    return folder, matrix, json.loads(results.read_text())


def test_an_imatrix_quant_is_its_own_row_and_names_its_matrix(imatrix_bench):
    _, matrix, results = imatrix_bench
    rows = {r["quant"]: r for r in results["runs"]}
    assert set(rows) == {"F16", "Q3_K_M", "Q3_K_M+imatrix"}
    assert rows["Q3_K_M+imatrix"]["imatrix"]["file"] == matrix.name
    assert len(rows["Q3_K_M+imatrix"]["imatrix"]["sha256"]) == 64
    assert rows["Q3_K_M"]["imatrix"] is None and rows["F16"]["imatrix"] is None
    assert rows["Q3_K_M+imatrix"]["text_kld"] != rows["Q3_K_M"]["text_kld"]


def test_plan_suggests_the_least_measured_loss_and_says_why(imatrix_bench, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    folder, _, results = imatrix_bench
    assert cli.main(["plan", str(folder / "llama.F16.gguf")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    measured = {r["quant"]: r["text_kld"] for r in results["runs"] if r["quant"] != "F16"}
    best = min(measured, key=measured.__getitem__)
    assert f"tokens of context: {best} (" in out, out
    assert f"({measured[best]:.4f})" in out and "localmed bench` measured" in out, out
    assert "results.json" in out


def test_a_bench_quant_name_finds_its_imatrix_row(imatrix_bench, tmp_path):
    folder, _, _ = imatrix_bench
    out = tmp_path / "r"
    assert cli.main(["bench", str(folder), "--quants", "q3_k_m+imatrix", "--data",
                     str(BENCH / "medqa.jsonl"), "--limit", "3", "--text-docs", "0", "--out",
                     str(out)]) == 0
    quants = {r["quant"] for r in json.loads((out / "results.json").read_text())["runs"]}
    assert quants == {"F16", "Q3_K_M+imatrix"}


@pytest.mark.parametrize(("quant", "tensor"), [("IQ3_XXS", "blk.0.attn_k.weight would be iq2_s"),
                                             ("IQ3_XS", "blk.0.attn_k.weight would be iq3_xxs")])
def test_i_quants_that_need_a_matrix_for_this_model_are_refused_up_front(
        quant, tensor, checkpoints, tmp_path, capsys):
    """Whether a type needs a matrix depends on the model: on the tiny Llama's 256-wide rows
    llama.cpp's IQ3_XXS mix puts attn_k in IQ2_S, and IQ3_XS puts it in IQ3_XXS, which need one
    (on SmolLM2's 576-wide rows neither does). llama.cpp's own layout pass, as a dry run on the
    skeleton, says so before anything is hashed or written: one line, naming the tensor."""
    out = tmp_path / "out"
    code, err = run_cli(capsys, "quantize", str(checkpoints["llama"]), "--quant", quant,
                        "--out", str(out), "--imatrix", "none")
    assert_one_line_error(code, err, quant, "importance matrix", tensor, "--imatrix auto")
    assert leftovers(out) == []


def test_the_same_type_on_a_model_that_does_not_need_one(smollm2, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["quantize", str(smollm2["checkpoint"]), "--quant", "IQ3_XXS", "--out",
                     str(out), "--imatrix", "none"]) == 0
    assert len(list(out.glob("*.IQ3_XXS.gguf"))) == 1
