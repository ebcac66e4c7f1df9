"""The direct path (no full-size intermediate on disk) writes, tensor for tensor, the bytes that
llama.cpp's ``llama_model_quantize`` writes from the F16/BF16 intermediate file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from localmed.quants import parse_quant_list
from localmed.registry import Registry
from tests.test_imatrix import CALIBRATION, activations_imatrix
from tests.tiny_models import build_spm_model


def _quantize(folder: Path, quants: str, out: Path, *, direct: bool,
              imatrix: Path | None = None) -> dict[str, Path]:
    from localmed.quantize.pipeline import resolve_source, run_quantize

    outputs = run_quantize(resolve_source(str(folder), Registry.load()), parse_quant_list(quants, imatrix=imatrix is not None),
                           out, threads=2, imatrix=imatrix,
                           direct=direct)
    return {o.quant: o.path for o in outputs}


def _fields(reader: gguf.GGUFReader) -> dict[str, object]:
    skip = {"localmed.created"}  # the time of each run
    return {name: field.contents() for name, field in reader.fields.items()
            if name not in skip and not name.startswith("GGUF.")}


def assert_identical(direct: Path, reference: Path) -> None:
    a, b = gguf.GGUFReader(direct), gguf.GGUFReader(reference)
    assert _fields(a) == _fields(b)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert (x.tensor_type, x.data_offset, list(x.shape)) == \
            (y.tensor_type, y.data_offset, list(y.shape)), x.name
        assert np.array_equal(np.asarray(x.data).view(np.uint8),
                              np.asarray(y.data).view(np.uint8)), \
            f"{x.name} ({x.tensor_type.name}) differs"
    assert direct.stat().st_size == reference.stat().st_size


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    return build_spm_model(tmp_path_factory.mktemp("bf16") / "llama-bf16", "llama", seed=5,
                           dtype="bfloat16")


@pytest.fixture(scope="module")
def llama_matrix(checkpoints, tmp_path_factory) -> Path:
    return activations_imatrix(checkpoints["llama"],
                               tmp_path_factory.mktemp("m") / "llama.imatrix.gguf")


@pytest.fixture(scope="module")
def mixtral_matrix(converted, tmp_path_factory) -> Path:
    """Per expert, over the tokens routed to each (llama.cpp's engine on the F32 file)."""
    from localmed.quantize.imatrix import write_imatrix
    from localmed.quantize.imatrix_compute import compute_imatrix

    matrix = compute_imatrix(converted["mixtral"]["F32"], CALIBRATION * 4, n_ctx=32, chunks=4,
                             threads=2)
    path = tmp_path_factory.mktemp("m") / "mixtral.imatrix.gguf"
    write_imatrix(path, matrix)
    return path


def assert_paths_agree(folder: Path, quants: str, tmp_path: Path,
                       imatrix: Path | None = None) -> None:
    """The same quants through the direct path and through the F16 file, byte for byte."""
    direct = _quantize(folder, quants, tmp_path / "d", direct=True, imatrix=imatrix)
    reference = _quantize(folder, quants, tmp_path / "r", direct=False, imatrix=imatrix)
    for quant in quants.split(","):
        assert_identical(direct[quant], reference[quant])


class TestByteIdenticalToLlamaCpp:
    def test_k_quants_and_legacy_types_without_a_matrix(self, checkpoints, tmp_path):
        assert_paths_agree(checkpoints["llama"], "Q4_K_M,Q3_K_S,Q6_K,Q4_0,IQ4_NL", tmp_path)

    def test_i_quants_with_an_importance_matrix(self, checkpoints, llama_matrix, tmp_path):
        assert_paths_agree(checkpoints["llama"], "IQ3_XXS,IQ2_XS,Q2_K_S", tmp_path,
                           llama_matrix)

    def test_moe_experts_use_their_own_matrix_rows(self, checkpoints, mixtral_matrix, tmp_path):
        assert_paths_agree(checkpoints["mixtral"], "Q3_K_M,IQ2_XXS", tmp_path, mixtral_matrix)

    def test_a_bf16_checkpoint_through_its_bf16_intermediate(self, bf16_llama, tmp_path):
        assert_paths_agree(bf16_llama, "Q4_K_M", tmp_path)


def test_a_real_model(smollm2, smollm2_converted, tmp_path):
    """SmolLM2-135M-Instruct (tied embeddings, 30 layers): the suite's Q4_K_M is written by the
    direct path; llama.cpp's quantizer on the F16 intermediate writes the same bytes."""
    reference = _quantize(smollm2["checkpoint"], "Q4_K_M", tmp_path, direct=False)
    assert_identical(smollm2_converted["Q4_K_M"], reference["Q4_K_M"])


def test_the_check_can_fail(checkpoints, llama_matrix, tmp_path):
    """With and without the matrix: same header layout, different bytes, and the check says so."""
    direct = _quantize(checkpoints["llama"], "Q3_K_M", tmp_path / "d", direct=True,
                       imatrix=llama_matrix)
    plain = _quantize(checkpoints["llama"], "Q3_K_M", tmp_path / "r", direct=False)
    with pytest.raises(AssertionError):
        assert_identical(direct["Q3_K_M"], plain["Q3_K_M"])


def test_no_full_size_file_is_ever_on_disk(checkpoints, tmp_path):
    """Sampled while it runs: the output folder never holds more than the output's size
    plus a MiB (the skeleton's header and block rounding); the intermediate path holds its
    F16 file, more than twice the output, for as long as llama.cpp quantizes it."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tests.test_direct_quant import _quantize
from pathlib import Path
_quantize(Path({str(checkpoints['llama'])!r}), "Q4_K_M", Path(sys.argv[1]),
          direct=sys.argv[2] == "direct")
"""
    peaks = {}
    for mode in ("direct", "intermediate"):
        out = tmp_path / mode
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", script, str(out), mode])
        peak = 0
        while True:
            used = 0
            for path in out.iterdir():
                try:
                    used += os.stat(path).st_blocks * 512
                except OSError:
                    pass
            peak = max(peak, used)
            try:
                proc.wait(timeout=0.01)
                break
            except subprocess.TimeoutExpired:
                continue
        assert proc.returncode == 0
        final = out / "llama.Q4_K_M.gguf"
        peaks[mode] = (peak, final.stat().st_size)
    peak, size = peaks["direct"]
    assert peak <= 1.2 * size + (1 << 20), peaks
    assert peaks["intermediate"][0] > 2 * peaks["intermediate"][1], peaks
