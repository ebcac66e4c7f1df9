"""What a GPU must give (``-m gpu``; off by default, run by benchmarks/gpu_check.sh there).

Layers go to the GPU as the planner planned them, greedy decoding gives the CPU's tokens, and the
planner's VRAM estimate is within 15% of what the device reports. Skipped where the installed
llama.cpp has no GPU offload.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PROMPT = "### Instruction:\nHow do I export a chat?\n\n### Response:\n"


@pytest.fixture(scope="module", autouse=True)
def _needs_offload() -> None:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("the installed llama.cpp has no GPU offload (built without CUDA/Metal)")


@pytest.fixture(scope="module")
def big_gguf() -> Path:
    """A model large enough for memory to be measured (benchmarks/gpu_check.py makes one)."""
    path = os.environ.get("LOCALMED_GPU_TEST_GGUF")
    if not path:
        pytest.skip("set LOCALMED_GPU_TEST_GGUF to a GGUF of a few hundred MB or more")
    return Path(path)


def _load(path: Path, gpu_layers: int | None = None):
    """A runtime, and the layers llama.cpp says it offloaded (from its own log)."""
    from localmed import formats
    from localmed.quantize.llama_quant import captured_llama_log

    with captured_llama_log(keep=None) as log:
        runtime = formats.load_runtime(path, formats.LoadOptions(gpu_layers=gpu_layers))
    found = re.search(r"offloaded (\d+)/(\d+) layers to GPU", "".join(log))
    assert found, "llama.cpp did not report offloaded layers"
    return runtime, int(found.group(1))


@pytest.mark.parametrize("share", ["all", "half"])
def test_layers_are_offloaded_as_planned(share, demo_gguf):
    from localmed import formats

    layers = formats.describe(demo_gguf).block_count
    asked = None if share == "all" else layers // 2
    _, plan = formats.plan(demo_gguf, formats.LoadOptions(gpu_layers=asked))
    assert plan.gpu_layers == (layers if share == "all" else layers // 2), plan.reasons
    runtime, offloaded = _load(demo_gguf, asked)
    try:
        assert offloaded == plan.n_gpu_layers_arg
        assert runtime.plan.gpu_layers == plan.gpu_layers
    finally:
        runtime.close()


def test_greedy_decoding_gives_the_cpu_s_tokens(demo_gguf):
    from localmed.runtimes.base import GenerationParams

    params = GenerationParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    tokens = {}
    for where, layers in (("gpu", -1), ("cpu", 0)):
        runtime, _ = _load(demo_gguf, layers)
        try:
            "".join(runtime.stream(PROMPT, params))
            tokens[where] = runtime.last_stats.token_ids
        finally:
            runtime.close()
    assert len(tokens["gpu"]) == 32
    assert tokens["gpu"] == tokens["cpu"]


def _gpu_memory_used() -> int:
    """Bytes in use on GPU 0 as the driver counts them (nvidia-smi), the CUDA context of the
    process that loads included, as the planner's VRAM overhead includes it. Not torch: a
    process that holds llama.cpp's CUDA build and imports torch aborted on the H200 machine
    (free(): invalid pointer)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        pytest.skip("no nvidia-smi: the device's memory cannot be read")
    done = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                           "-i", "0"], capture_output=True, text=True, check=True, timeout=60)
    return int(done.stdout.strip()) * 2**20


def test_the_vram_estimate_is_within_15_percent(big_gguf):
    from localmed import formats

    before = _gpu_memory_used()
    runtime, _ = _load(big_gguf, -1)
    try:
        used = _gpu_memory_used() - before
        estimate = runtime.plan.vram_needed
        assert abs(estimate - used) <= 0.15 * used, (
            f"planned {estimate / 2**20:.0f} MiB, the device reports {used / 2**20:.0f} MiB used")
        assert runtime.plan.gpu_layers == formats.describe(big_gguf).block_count
    finally:
        runtime.close()
