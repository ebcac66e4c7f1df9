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
from localmed.quantize.imatrix import ImportanceMatrix, to_llama
from localmed.quants import QuantType

_QUIET: list[object] = []
"""The callback installed after a capture; kept referenced, as ctypes requires."""


@contextlib.contextmanager
def captured_llama_log(keep: int | None = 200) -> Iterator[list[str]]:
    """Route llama.cpp's log into a list for the duration (it is process-wide).

    ``keep``: the last pieces kept (None: all). Afterwards llama.cpp's log stays silent:
    localmed loads models with ``verbose=False``, and its messages would otherwise land on the
    terminal under the progress bars or the chat app.
    """
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))
        if keep is not None:
            del lines[:-keep]

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


def _reason(log: list[str], status: int) -> str:
    """The line of llama.cpp's log that explains a failure, said plainly where it is known."""
    text = "".join(log)
    if "requires an importance matrix" in text or "requires an imatrix" in text:
        tensor = next((line.split("offending tensor:", 1)[1].strip() for line in text.splitlines()
                       if "offending tensor:" in line), "")
        target = next((line.split("target type:", 1)[1].strip() for line in text.splitlines()
                       if "target type:" in line), "")
        which = f" ({tensor} would be {target})" if tensor and target else ""
        return (f"llama.cpp needs an importance matrix for this model at this type{which}: "
                "use --imatrix auto (the default) or --imatrix FILE")
    return next((line.strip() for line in reversed(log) if "error" in line.lower()
                 or "failed" in line.lower()), f"llama.cpp returned {status}")


def _params(quant: QuantType):
    """llama.cpp's default quantize parameters, for ``quant``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(quant.ftype)
    return params


def llama_quantize(src: Path, dst: Path, quant: QuantType, *, threads: int | None = None,
                   metadata: Mapping[str, str] | None = None,
                   imatrix: ImportanceMatrix | None = None,
                   progress: Callable[[int], None] | None = None,
                   label: Path | str | None = None) -> None:
    """Quantize GGUF ``src`` to ``dst`` as ``quant``; ``metadata`` string keys are set in ``dst``.
    ``label`` is what a failure names (default ``src``).

    ``progress`` receives the bytes written so far, polled from the growing output file (the
    quantizer has no callback of its own).
    """
    import llama_cpp

    params = _params(quant)
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
        raise QuantizeError(label or src, quant.name, _reason(log, status))
    if progress:
        progress(dst.stat().st_size)


NEEDS_MATRIX = ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s")
"""ggml types llama.cpp's quantizer refuses to write without a matrix (also Q2_K inside a Q2_K_S
file): ``tensor_requires_imatrix`` in ``llama-quant.cpp``, a static function that llama.h does
not export. ggml's exported ``ggml_quantize_requires_imatrix`` answers for the row quantizers and
names only three of these six (IQ2_XXS, IQ2_XS, IQ1_S); a test keeps that a subset of this."""


def llama_requires_imatrix(src: Path, quant: QuantType, *,
                           label: Path | str | None = None) -> str:
    """llama.cpp's layout pass for ``quant`` over GGUF ``src`` as a dry run (headers only, no
    tensor data read or written): ``""`` when it can be made without an importance matrix,
    else which tensor needs one (``"blk.0.attn_k.weight would be iq2_s"``, or ``"some
    tensors"`` where the log does not say). ``label`` is what a failure names."""
    import llama_cpp

    params = _params(quant)
    params.dry_run = True
    with captured_llama_log(keep=None) as log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), os.devnull.encode(),
                                                ctypes.byref(params))
    if status != 0:
        raise QuantizeError(label or src, quant.name, _reason(log, status))
    text = "".join(log)
    if "will require an imatrix" not in text:
        return ""
    needs = NEEDS_MATRIX + (("q2_K",) if quant.name == "Q2_K_S" else ())
    # Each tensor's line: "[  4/ 21] name - [shape], type = f16, size = ... MiB (iq2_s)".
    for line in text.splitlines():
        if "] " in line and line.rstrip().endswith(")"):
            name = line.split("] ", 1)[1].split()[0]
            target = line.rstrip()[:-1].rsplit("(", 1)[-1]
            if target in needs and not name.startswith(("token_embd.", "output.")):
                return f"{name} would be {target}"
    return "some tensors"
