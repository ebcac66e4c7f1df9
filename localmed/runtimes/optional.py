"""Optional engine packages, imported on demand with a clear error when missing.

Shared by the GPTQ exporter (``quantize.gptq``) and the transformers Runtime, which both need
GPTQModel and neither should import the other for it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from localmed.extras import require


def require_gptqmodel() -> Any:
    """Import GPTQModel, or say how to install it (the ``gptq`` extra, :mod:`localmed.extras`)."""
    require("gptq", "GPTQ (GPTQModel)")
    # GPTQModel wants two CPU workers for loading; on a 2-core laptop it computes one and fails.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    import gptqmodel

    return gptqmodel


@contextlib.contextmanager
def private_working_dir() -> Iterator[None]:
    """Run with a private temporary working directory, removed afterwards.

    GPTQModel 7.6 writes per-layer log files to ``./logs/`` relative to the working directory
    (a module constant, with no setting or environment variable), so quantizing from any folder
    would leave ``logs/`` there. Callers pass absolute paths.
    """
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="localmed-gptq-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(before)
