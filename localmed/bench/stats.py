"""The statistics bench reports: Wilson intervals, McNemar's exact test, paired differences.

Plain Python (``math``) so the numbers can be checked by hand against textbook values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (good at small n and near 0 or 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``only_first``: questions the first model got right and the second wrong; ``only_second``
    the reverse. Under the null each discordant pair is a fair coin.
    """
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(reference: Sequence[bool], other: Sequence[bool],
                      z: float = Z95) -> tuple[float, tuple[float, float]]:
    """Accuracy difference (other - reference) on the same questions, with a paired 95% CI.

    The CI is the normal interval of the mean per-question difference (each -1, 0 or +1), whose
    variance counts only discordant pairs: correlated answers give a narrower interval than two
    independent accuracies would.
    """
    if len(reference) != len(other):
        raise ValueError("paired results need the same questions")
    n = len(reference)
    if n == 0:
        return 0.0, (0.0, 0.0)
    diffs = [int(b) - int(a) for a, b in zip(reference, other, strict=True)]
    mean = sum(diffs) / n
    if n == 1:
        return mean, (mean, mean)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, (mean - half, mean + half)
