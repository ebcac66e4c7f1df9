"""The few functions of ggml's backend registry that llama-cpp-python does not bind, bound as it
binds the rest (ctypes, on the ``libggml`` it loaded): this machine's devices, llama.cpp's RPC
server (a worker's), and workers made devices of the models loaded from then on (``--rpc``), as
llama.cpp's own ``--rpc`` does (``ggml_backend_rpc_add_server``, then
``ggml_backend_register``)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any

from localmed.errors import WorkerError

CPU, GPU, IGPU = 0, 1, 2  # enum ggml_backend_dev_type


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: int
    free: int
    total: int


@functools.cache
def _ggml() -> Any:
    lib = _loaded_ggml()
    p, s, u = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    for name, args, result in (
            ("ggml_backend_dev_count", [], u),
            ("ggml_backend_dev_get", [u], p),
            ("ggml_backend_dev_name", [p], s),
            ("ggml_backend_dev_description", [p], s),
            ("ggml_backend_dev_type", [p], ctypes.c_int),
            ("ggml_backend_dev_memory", [p, ctypes.POINTER(u), ctypes.POINTER(u)], None),
            ("ggml_backend_reg_by_name", [s], p),
            ("ggml_backend_reg_get_proc_address", [p, s], p),
            ("ggml_backend_reg_dev_count", [p], u),
            ("ggml_backend_reg_dev_get", [p, u], p),
            ("ggml_backend_register", [p], None)):
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


def _loaded_ggml() -> Any:
    """The ``libggml`` that llama.cpp itself loaded. Not ``llama_cpp._ggml.libggml``: a wheel
    keeps no symbolic links, so ``libggml.so`` beside ``libggml.so.0`` is another copy, with a
    device registry of its own that llama.cpp never reads."""
    import llama_cpp  # noqa: F401  (loads libllama, and the libggml it links)

    for soname in ("libggml.so.0", "libggml.0.dylib"):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(soname, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
    from llama_cpp import _ggml

    return _ggml.libggml


def _rpc_function(name: str, prototype: Any) -> Any:
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise WorkerError("this llama.cpp was built without its RPC backend: run "
                          "scripts/install.sh again (it builds it with GGML_RPC=ON)")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise WorkerError(f"this llama.cpp's RPC backend has no {name}")
    return prototype(address)


def _device(dev: Any) -> Device:
    lib = _ggml()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(lib.ggml_backend_dev_name(dev).decode(),
                  lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                  lib.ggml_backend_dev_type(dev), free.value, total.value)


def local_devices() -> list[tuple[Any, Device]]:
    """What a worker offers, as llama.cpp's rpc-server picks it: its GPUs, else its CPU."""
    lib = _ggml()
    found = [(dev, _device(dev)) for dev in
             (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))]
    gpus = [(dev, d) for dev, d in found
            if d.kind in (GPU, IGPU) and not d.name.startswith("RPC")]
    return gpus or [(dev, d) for dev, d in found if d.kind == CPU][:1]


def serve(endpoint: str, cache_dir: str | None, threads: int) -> None:
    """llama.cpp's RPC server on ``endpoint`` with this machine's devices; returns only if it
    could not start (it says why on stderr)."""
    start = _rpc_function("ggml_backend_rpc_start_server", ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p)))
    devices = [dev for dev, _ in local_devices()]
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices),
          array)


def add_workers(endpoints: tuple[str, ...]) -> list[Device]:
    """Each endpoint's devices registered with ggml: the models loaded from now on in this
    process offload to them (they come first in llama.cpp's device list). The endpoints must
    have been checked: llama.cpp aborts on one it cannot reach."""
    lib = _ggml()
    add = _rpc_function("ggml_backend_rpc_add_server",
                        ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    devices: list[Device] = []
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        if not reg:
            raise WorkerError(f"worker at {endpoint} offers no device")
        lib.ggml_backend_register(reg)
        devices += [_device(lib.ggml_backend_reg_dev_get(reg, i))
                    for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return devices
