"""The comparison's statistics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from coerasing.stats import frechet_distance, mean_spread, rate, wilson_interval


def _frechet_by_eigenvalues(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula with tr((Σ_a Σ_b)^½) = Σ √λ(Σ_a Σ_b): another route than the code's symmetric roots."""
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(sa @ sb)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(eigenvalues.real, 0, None)).sum())


def test_frechet_distance_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(250, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, b) == pytest.approx(_frechet_by_eigenvalues(a, b), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_one_dimension_is_the_closed_form():
    a = np.array([[0.0], [2.0], [4.0]])  # mean 2, sample variance 4
    b = np.array([[1.0], [1.0 + 3.0], [1.0 + 6.0]])  # mean 4, variance 9
    assert frechet_distance(a, b) == pytest.approx((2 - 4) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_real_and_finite():
    rng = np.random.default_rng(1)
    value = frechet_distance(rng.normal(size=(5, 16)), rng.normal(size=(7, 16)))
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))


def test_wilson_interval():
    low, high = wilson_interval(0, 24)
    assert low == 0.0 and 0.13 < high < 0.15  # 0 of 24 is not "0 %"
    low, high = wilson_interval(12, 24)
    assert low < 0.5 < high and high - 0.5 == pytest.approx(0.5 - low)
    assert all(np.isnan(wilson_interval(0, 0)))
    low, high = wilson_interval(3, 4)
    assert rate(3, 4) == {"k": 3, "n": 4, "rate": 0.75, "low": low, "high": high}


def test_mean_spread():
    assert mean_spread([0.5]) == {"mean": 0.5, "sd": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    spread = mean_spread([0.2, 0.4, 0.6])
    assert spread["mean"] == pytest.approx(0.4) and spread["sd"] == pytest.approx(0.2)
