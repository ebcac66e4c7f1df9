"""What this machine and the installed llama.cpp can do: backend, devices, memory.

CUDA memory comes from NVML (``nvidia-ml-py``) when installed, else from ``nvidia-smi``; Apple
Silicon shares RAM with its GPU (Metal may use about two thirds of it by default). Nothing here
opens a network connection.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from localmed.planner import Hardware

# macOS lets Metal wire about this share of RAM by default (recommendedMaxWorkingSetSize).
METAL_SHARE = 0.66


@dataclass(frozen=True)
class GPUDevice:
    name: str
    total: int
    free: int


GPU_BACKENDS = {"cuda": "cuda", "hip": "rocm", "metal": "metal", "vulkan": "vulkan",
                "sycl": "sycl", "opencl": "opencl", "musa": "musa", "cann": "cann"}
"""ggml backend library (``libggml-<name>``) → the backend name localmed shows."""


@dataclass(frozen=True)
class LlamaBuild:
    """What the installed llama.cpp was built with."""

    version: str
    """llama-cpp-python's version."""
    backends: tuple[str, ...]
    """ggml backend libraries shipped with it (``cpu``, ``cuda``, ``vulkan`` …)."""
    offload: bool
    """Whether llama.cpp reports GPU offload support."""

    @property
    def gpu_backend(self) -> str:
        """``cuda``, ``rocm``, ``metal``, ``vulkan`` … or ``cpu`` when it cannot offload."""
        if not self.offload:
            return "cpu"
        for lib, name in GPU_BACKENDS.items():
            if lib in self.backends:
                return name
        return "metal" if sys.platform == "darwin" else "gpu"


def llama_build() -> LlamaBuild:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    names = {p.name.split(".")[0].removeprefix("libggml-") for p in lib.glob("libggml-*")}
    # llama.cpp says it offloads wherever its RPC backend is built in (localmed's is: --rpc);
    # this machine offloads where ggml lists a GPU of its own.
    return LlamaBuild(llama_cpp.__version__, tuple(sorted(names - {"base", "rpc"})),
                      bool(llama_cpp.llama_supports_gpu_offload()) and local_gpu())


def local_gpu() -> bool:
    """Whether ggml lists a GPU of this machine's (a worker's, ``--rpc``, is not)."""
    from localmed.runtimes.ggml_rpc import GPU, IGPU, local_devices

    return any(d.kind in (GPU, IGPU) for _, d in local_devices())


def llama_backend() -> tuple[str, bool]:
    """(``cuda``/``rocm``/``metal``/``vulkan``/…/``cpu``, whether llama.cpp can offload)."""
    build = llama_build()
    return build.gpu_backend, build.offload


def ram() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    import psutil

    mem = psutil.virtual_memory()
    return int(mem.total), int(mem.available)


def cuda_devices() -> list[GPUDevice]:
    """NVIDIA GPUs and their memory; empty when none can be seen."""
    try:
        import pynvml
    except ImportError:
        return _nvidia_smi_devices()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append(GPUDevice(name.decode() if isinstance(name, bytes) else name,
                                     int(info.total), int(info.free)))
        return devices
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi_devices() -> list[GPUDevice]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    devices = []
    for line in out.strip().splitlines():
        name, total, free = (part.strip() for part in line.rsplit(",", 2))
        devices.append(GPUDevice(name, int(total) * 2**20, int(free) * 2**20))
    return devices


def detect() -> Hardware:
    """The machine as the planner sees it. ``LOCALMED_FORCE_CPU=1`` plans for the CPU only."""
    total, available = ram()
    backend, _ = llama_backend()
    if os.environ.get("LOCALMED_FORCE_CPU"):
        backend = "cpu"
    if backend == "cuda":
        devices = cuda_devices()
        if not devices:
            return Hardware("cpu", total, available)
        # llama.cpp splits layers across GPUs; the planner treats them as one pool.
        return Hardware("cuda", total, available, sum(d.total for d in devices),
                        sum(d.free for d in devices), " + ".join(d.name for d in devices))
    if backend == "metal":
        share = int(total * METAL_SHARE)
        return Hardware("metal", total, available, share, min(share, available),
                        f"Apple {platform.machine()} GPU (unified memory)", unified_memory=True)
    if backend != "cpu":
        # ROCm, Vulkan, SYCL …: llama.cpp offloads, but free VRAM is not measured here.
        return Hardware(backend, total, available, device=f"{backend.upper()} GPU")
    return Hardware("cpu", total, available)
