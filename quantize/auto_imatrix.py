"""``quantize --imatrix auto``: this checkpoint's medical importance matrix, computed once on
the calibration text and cached per checkpoint and settings, for the types of 4 bits and fewer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from localmed import library
from localmed.atomic import atomic_path
from localmed.calibration import Calibration
from localmed.progress import Progress
from localmed.provenance import sha256_file
from localmed.quantize.conversion import Conversion
from localmed.quantize.imatrix import ImportanceMatrix, read_imatrix, write_imatrix
from localmed.quants import QuantType

AUTO_CHUNKS, AUTO_CTX = 32, 512
"""Calibration run of ``--imatrix auto``: 32 chunks of 512 tokens (about 40 PubMedQA abstracts)."""


@dataclass
class AutoImatrix:
    """``--imatrix auto``: the cached medical matrix of this source, or one computed on the
    intermediate file before quantizing."""

    calibration: Calibration
    cache: Path


def plan_auto_imatrix(conv: Conversion, quants: list[QuantType], calibration: Calibration | None,
                      progress: Progress) -> AutoImatrix | None:
    """Reuse this source's cached medical matrix, or say that one must be computed."""
    if calibration is None:
        return None
    settings = [conv.input_hashes, calibration.sha256, AUTO_CHUNKS, AUTO_CTX]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = library.imatrix_cache_path(conv.source.name, key)
    conv.imatrix_quants = frozenset(q.name for q in quants if q.low_bit)
    if cache.is_file():
        progress.info(f"imatrix: reusing {cache}")
        use_imatrix(conv, read_imatrix(cache), cache)
        return None
    return AutoImatrix(calibration, cache)


def compute_auto_imatrix(conv: Conversion, pending: AutoImatrix, base: Path,
                         threads: int | None, progress: Progress) -> None:
    from localmed.quantize.imatrix_compute import compute_imatrix

    task = progress.add_task("imatrix (medical)", total=AUTO_CHUNKS, unit="chunks")
    matrix = compute_imatrix(
        base, list(pending.calibration.texts), n_ctx=AUTO_CTX, chunks=AUTO_CHUNKS,
        threads=threads,
        progress=lambda done, total, _: progress.update(task, completed=done, total=total))
    matrix.datasets = [pending.calibration.label]
    pending.cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pending.cache) as tmp:
        write_imatrix(tmp, matrix)
    use_imatrix(conv, matrix, pending.cache)


def use_imatrix(conv: Conversion, matrix: ImportanceMatrix, path: Path) -> None:
    conv.imatrix, conv.imatrix_file, conv.imatrix_sha256 = matrix, path, sha256_file(path)
