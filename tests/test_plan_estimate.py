"""`localmed plan` before download: the footprint estimated from a model's shape and llama.cpp's
bits per weight, checked against real files' footprints (read from their headers)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from localmed.formats.gguf import read_gguf_footprint
from localmed.planner import ModelShape, estimate_footprint


def shape_of(path: Path) -> ModelShape:
    """The shape a registry entry would give, read from a GGUF's own metadata by gguf-py."""
    reader = gguf.GGUFReader(path)

    def value(key: str) -> object:
        field = reader.fields[key]
        return field.contents()

    arch = value("general.architecture")
    n_embd, n_head = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    names = {t.name for t in reader.tensors}
    _, footprint = read_gguf_footprint(path)
    return ModelShape(parameters=footprint.n_parameters, layers=value(f"{arch}.block_count"),
                      kv_heads=value(f"{arch}.attention.head_count_kv"),
                      head_dim=n_embd // n_head, hidden_size=n_embd,
                      vocab_size=len(value("tokenizer.ggml.tokens")),
                      tied_embeddings="output.weight" not in names,
                      context_length=value(f"{arch}.context_length"))


def assert_close(path: Path, tolerance: float = 0.10) -> float:
    info, real = read_gguf_footprint(path)
    estimate = estimate_footprint(shape_of(path), info.quant)
    assert estimate.kv_bytes_per_token == real.kv_bytes_per_token
    assert estimate.n_layers == real.n_layers
    ratio = estimate.weights_bytes / real.weights_bytes
    assert abs(ratio - 1) <= tolerance, (path.name, info.quant, ratio)
    return ratio


def test_smollm2_as_published(smollm2):
    assert_close(smollm2["gguf"])


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_smollm2_converted_by_localmed(smollm2_converted, quant):
    assert_close(smollm2_converted[quant])


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_tiny_checkpoints(converted, quant):
    assert_close(converted["llama"][quant])


def test_plan_of_a_registry_model_not_on_disk_is_a_marked_estimate(tmp_path, monkeypatch, capsys):
    from localmed import cli
    from localmed.registry import Registry

    monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path))
    code = cli.main(["plan", "meditron3-8b", "--quant", "Q4_K_M", "--ctx", "8192"])
    out = " ".join(capsys.readouterr().out.split())
    assert code in (0, 1)  # fits this machine or not
    assert "not on this machine: an estimate from the registry" in out
    entry = Registry.load()["meditron3-8b"]
    expected = estimate_footprint(entry.model_shape(), "Q4_K_M")
    assert f"~{expected.weights_bytes / 2**30:.1f} GiB GGUF" in out
    assert "KV cache 1.0 GiB for 8192 tokens" in out  # 32 layers x 8 KV heads x 128, f16
    assert "to get it: localmed quantize meditron3-8b --quant Q4_K_M" in out
    assert not list(tmp_path.rglob("*.gguf"))  # nothing downloaded or made


def test_plan_without_a_shape_says_why_in_one_line(tmp_path, monkeypatch, capsys):
    from localmed import cli

    monkeypatch.setenv("LOCALMED_DATA_DIR", str(tmp_path))
    assert cli.main(["plan", "medgemma-4b-it"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "registry gives no shape" in err and "localmed quantize medgemma-4b-it" in err
