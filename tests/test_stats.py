"""Bench statistics against values worked out by hand."""

from __future__ import annotations

import pytest

from localmed.bench.scoring import kl_divergence
from localmed.bench.stats import mcnemar_exact, paired_difference, wilson_interval


@pytest.mark.parametrize("k,n,low,high", [
    (8, 10, 0.4902, 0.9433),    # Wilson 95% for 8/10
    (0, 10, 0.0, 0.2775),       # no successes: the interval still has width
    (10, 10, 0.7225, 1.0),
    (55, 100, 0.4524, 0.6438),
])
def test_wilson_interval(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_of_nothing_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),
    (0, 5, 2 / 32),              # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    (1, 6, 2 * (1 + 7) / 128),   # 2 * P(X <= 1), X ~ Bin(7, 1/2)
    (6, 1, 2 * (1 + 7) / 128),   # symmetric
    (5, 5, 1.0),
    (2, 8, 2 * (1 + 10 + 45) / 1024),
])
def test_mcnemar_exact(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_paired_difference_by_hand():
    reference = [True, True, False, False]
    other = [True, False, True, True]
    delta, (lo, hi) = paired_difference(reference, other)
    # differences 0, -1, +1, +1: mean 0.25, sample variance 0.91667, se 0.47871
    assert delta == pytest.approx(0.25)
    assert lo == pytest.approx(0.25 - 1.959964 * 0.478714, abs=1e-5)
    assert hi == pytest.approx(0.25 + 1.959964 * 0.478714, abs=1e-5)


def test_identical_answers_have_zero_width():
    same = [True, False, True]
    assert paired_difference(same, same) == (0.0, (0.0, 0.0))


def test_paired_difference_needs_the_same_questions():
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_kl_divergence():
    assert kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    # KL((0.75, 0.25) || (0.5, 0.5)) = 0.75 ln 1.5 + 0.25 ln 0.5
    assert kl_divergence([0.75, 0.25], [0.5, 0.5]) == pytest.approx(0.130812, abs=1e-6)
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.693147, abs=1e-6)
