"""Offload planning from given memory figures: CPU only, full, partial, refusal."""

from __future__ import annotations

import pytest

from localmed.errors import ModelTooLargeError
from localmed.planner import (
    GIB,
    MIB,
    Hardware,
    ModelFootprint,
    footprint_from_tensors,
    plan_offload,
)


def seven_b(quant: str = "Q4_K_M") -> ModelFootprint:
    """Roughly Mistral-7B Q4_K_M: 32 layers of 120 MiB, 280 MiB of embeddings and head."""
    return ModelFootprint(
        n_layers=32, layer_bytes=(120 * MIB,) * 32, other_bytes=280 * MIB,
        output_bytes=140 * MIB, kv_bytes_per_token=2 * 32 * 8 * 128 * 2, n_ctx_train=32768,
        n_parameters=7_240_000_000, quant=quant)


def test_cpu_only_build_keeps_everything_on_the_cpu():
    plan = plan_offload(seven_b(), Hardware("cpu", 32 * GIB, 24 * GIB), n_ctx=4096)
    assert plan.gpu_layers == 0 and plan.fits
    assert plan.label == "CPU"
    assert plan.vram_needed == 0
    assert any("CPU only" in r for r in plan.reasons)
    # weights + 512 MiB of KV cache + overhead
    assert plan.ram_needed == 32 * 120 * MIB + 280 * MIB + 512 * MIB + 768 * MIB


def test_full_offload_when_vram_is_plenty():
    hw = Hardware("cuda", 32 * GIB, 24 * GIB, 24 * GIB, 23 * GIB, "NVIDIA RTX 4090")
    plan = plan_offload(seven_b(), hw, n_ctx=4096)
    assert plan.gpu_layers == 32 and plan.fits
    assert plan.label == "GPU 32/32 layers"
    assert plan.n_gpu_layers_arg == 33  # llama.cpp counts the output layer too
    assert "all 32 layers fit on NVIDIA RTX 4090" in plan.reasons[0]
    assert plan.ram_needed < 1.5 * GIB  # only the embeddings stay in RAM


def test_partial_offload_fills_the_gpu_and_leaves_the_rest():
    hw = Hardware("cuda", 32 * GIB, 24 * GIB, 4 * GIB, 2 * GIB, "laptop GPU")
    plan = plan_offload(seven_b(), hw, n_ctx=4096)
    # budget: 2 GiB * 0.95 - 640 MiB overhead - 140 MiB head = 1165.6 MiB; each layer 136 MiB
    assert plan.gpu_layers == 8
    assert plan.label == "GPU 8/32 layers"
    assert plan.n_gpu_layers_arg == 8
    assert plan.fits
    assert plan.vram_needed <= hw.vram_free
    assert "8 of 32 layers fit" in plan.reasons[0]


def test_no_room_on_the_gpu_means_cpu():
    hw = Hardware("cuda", 32 * GIB, 24 * GIB, 2 * GIB, 500 * MIB, "busy GPU")
    plan = plan_offload(seven_b(), hw, n_ctx=4096)
    assert plan.gpu_layers == 0 and plan.label == "CPU" and plan.fits


def test_refused_when_ram_and_vram_are_too_small_with_a_smaller_quant_to_try():
    model = ModelFootprint(n_layers=80, layer_bytes=(520 * MIB,) * 80, other_bytes=1 * GIB,
                           output_bytes=500 * MIB, kv_bytes_per_token=2 * 80 * 8 * 128 * 2,
                           n_ctx_train=4096, n_parameters=69_000_000_000, quant="Q4_K_M")
    hw = Hardware("cuda", 32 * GIB, 28 * GIB, 12 * GIB, 11 * GIB, "RTX 3060")
    plan = plan_offload(model, hw, n_ctx=4096)
    assert not plan.fits
    assert "more than the 39.0 GiB of RAM + VRAM available" in plan.reasons[-1]
    # The one recommender's choice (quant_choice): the lowest published KLD that fits.
    # Q4_K_S: 69e9 * 4.58 / 8 = 36.8 GiB + 1.25 GiB KV + 0.75 GiB overhead < 39 GiB, and with
    # its importance matrix (made by default) it loses less than IQ4_XS or IQ4_NL
    assert plan.suggestion == "Q4_K_S"


def test_refused_without_suggestion_when_nothing_fits():
    plan = plan_offload(seven_b("Q2_K"), Hardware("cpu", 2 * GIB, 1 * GIB), n_ctx=4096)
    assert not plan.fits and plan.suggestion is None


def test_gpu_layers_override_is_obeyed():
    hw = Hardware("cuda", 32 * GIB, 24 * GIB, 24 * GIB, 23 * GIB, "GPU")
    assert plan_offload(seven_b(), hw, gpu_layers=10).gpu_layers == 10
    assert plan_offload(seven_b(), hw, gpu_layers=-1).gpu_layers == 32
    cpu = plan_offload(seven_b(), Hardware("cpu", 32 * GIB, 24 * GIB), gpu_layers=20)
    assert cpu.gpu_layers == 0 and "ignored" in cpu.reasons[0]


def test_unified_memory_is_not_counted_twice():
    hw = Hardware("metal", 16 * GIB, 12 * GIB, int(16 * GIB * 0.66), int(10.5 * GIB),
                  "Apple M2", unified_memory=True)
    plan = plan_offload(seven_b(), hw, n_ctx=4096)
    assert plan.gpu_layers == 32 and plan.fits
    assert plan.ram_needed > 4 * GIB  # the GPU's share still comes out of RAM


def test_default_context_is_capped_at_4096():
    plan = plan_offload(seven_b(), Hardware("cpu", 32 * GIB, 24 * GIB))
    assert plan.n_ctx == 4096


def test_footprint_groups_tensors_by_block():
    tensors = [("token_embd.weight", 100), ("blk.0.attn_q.weight", 10), ("blk.0.ffn_up.weight", 5),
               ("blk.1.attn_q.weight", 7), ("output_norm.weight", 1), ("output.weight", 50)]
    fp = footprint_from_tensors(tensors, n_layers=2, n_embd=64, n_head=4, n_head_kv=2,
                                n_ctx_train=512, n_parameters=1000)
    assert fp.layer_bytes == (15, 7)
    assert fp.other_bytes == 151 and fp.output_bytes == 50
    assert fp.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2


def test_footprint_of_a_real_gguf_matches_its_file(converted):
    from localmed.formats.gguf import read_gguf_footprint as read_footprint

    path = converted["llama"]["Q4_K_M"]
    info, fp = read_footprint(path)
    assert info.quant == "Q4_K_M"
    assert fp.n_layers == 2 and len(fp.layer_bytes) == 2
    assert 0.9 * path.stat().st_size < fp.weights_bytes <= path.stat().st_size
    assert fp.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2  # 2 layers, 2 KV heads of 64, f16
    assert fp.quant == "Q4_K_M"


def test_a_model_too_big_is_refused_before_loading(converted):
    from localmed.runtimes.local import LocalRuntime

    tiny_machine = Hardware("cpu", 64 * MIB, 16 * MIB)
    with pytest.raises(ModelTooLargeError) as err:
        LocalRuntime.load(converted["llama"]["Q8_0"], hardware=tiny_machine)
    assert "does not fit" in str(err.value) and "RAM" in str(err.value)


@pytest.mark.parametrize("libs,offload,expected", [
    (("cpu", "cuda"), True, "cuda"), (("cpu", "hip"), True, "rocm"),
    (("cpu", "vulkan"), True, "vulkan"), (("cpu",), False, "cpu"),
    (("cpu", "vulkan"), False, "cpu"),
])
def test_the_gpu_backend_is_named_from_the_ggml_libraries(libs, offload, expected):
    from localmed.runtimes.hardware import LlamaBuild

    assert LlamaBuild("0.3.36", libs, offload).gpu_backend == expected


def test_the_installed_build_is_read_from_llama_cpp():
    from localmed.runtimes.hardware import llama_build

    build = llama_build()
    assert build.version == "0.3.36" and "cpu" in build.backends


def test_a_gpu_whose_vram_cannot_be_measured_is_not_guessed_at():
    plan = plan_offload(seven_b(), Hardware("vulkan", 32 * GIB, 24 * GIB), n_ctx=4096)
    assert plan.gpu_layers == 0 and plan.fits
    assert "cannot be measured" in plan.reasons[0] and "--gpu-layers" in plan.reasons[0]
    forced = plan_offload(seven_b(), Hardware("vulkan", 32 * GIB, 24 * GIB), gpu_layers=-1)
    assert forced.gpu_layers == forced.n_layers
