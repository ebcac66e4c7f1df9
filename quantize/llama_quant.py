"""llama.cpp's own quantizer (``llama_model_quantize``), through llama-cpp-python.

Every quant type that gguf-py does not write itself (K-quants, I-quants, legacy Q4_0 …) goes
through here, so the bits are exactly those of ``llama-quantize``. llama.cpp's log is captured
rather than printed; its last lines explain a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from localmed.errors import QuantizeError
from localmed.quants import QuantType
from quantize.imatrix import ImportanceMatrix, to_llama

_QUIET: list[object] = []
"""The callback installed after a capture; kept referenced, as ctypes requires."""


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Route llama.cpp's log into a list for the duration (it is process-wide).

    Afterwards llama.cpp's log stays silent: localmed loads models with ``verbose=False``, and
    its messages would otherwise land on the terminal under the progress bars or the chat app.
    """
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))
        del lines[:-200]

    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        if not _QUIET:
            _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_QUIET[0], ctypes.c_void_p(0))


def _kv_overrides(values: Mapping[str, str]):
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for slot, (key, value) in zip(array, values.items(), strict=False):
        encoded = value.encode("utf-8")
        if len(key) >= 128 or len(encoded) >= 128:
            raise ValueError(f"metadata override {key}={value!r} is longer than llama.cpp allows")
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        slot.key = key.encode("utf-8")
        slot.value.val_str = encoded
    return array  # the zeroed last slot ends the list


def llama_quantize(src: Path, dst: Path, quant: QuantType, *, threads: int | None = None,
                   metadata: Mapping[str, str] | None = None,
                   imatrix: ImportanceMatrix | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
    """Quantize GGUF ``src`` to ``dst`` as ``quant``; ``metadata`` string keys are set in ``dst``.

    ``progress`` receives the bytes written so far, polled from the growing output file (the
    quantizer has no callback of its own).
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(quant.ftype)
    params.nthread = threads or os.cpu_count() or 1
    overrides = _kv_overrides(metadata or {})
    params.kv_overrides = ctypes.cast(overrides, type(params.kv_overrides))
    matrix = to_llama(imatrix) if imatrix is not None else None  # kept alive until the end
    if matrix is not None:
        params.imatrix = ctypes.cast(matrix.array, type(params.imatrix))

    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.25):
            with contextlib.suppress(OSError):
                progress(dst.stat().st_size)  # type: ignore[misc]

    watcher = threading.Thread(target=poll, daemon=True) if progress else None
    with captured_llama_log() as log:
        if watcher:
            watcher.start()
        try:
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                                    ctypes.byref(params))
        finally:
            done.set()
            if watcher:
                watcher.join()
    if status != 0:
        reason = next((line.strip() for line in reversed(log) if "error" in line.lower()
                       or "failed" in line.lower()), f"llama.cpp returned {status}")
        raise QuantizeError(src, quant.name, reason)
    if progress:
        progress(dst.stat().st_size)
