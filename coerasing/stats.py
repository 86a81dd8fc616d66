"""The comparison's statistics: rates with 95 % intervals, the Fréchet distance, means and spreads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: z of a two-sided 95 % interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate ``successes / n`` (95 % by default).

    Better than the normal approximation at the small counts and extreme rates an eraser produces
    (0 of 24 is an interval, not a point). ``n = 0`` gives ``(nan, nan)``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate(successes: int, n: int) -> dict[str, float | int]:
    """``{"k", "n", "rate", "low", "high"}``: a count with its rate and 95 % Wilson interval."""
    low, high = wilson_interval(successes, n)
    return {"k": int(successes), "n": int(n), "rate": successes / n if n else float("nan"), "low": low, "high": high}


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """95 % interval of ``k1/n1 − k2/n2`` for two independent binomial rates (Newcombe's hybrid score method,
    Stat. Med. 1998, method 10: each rate's Wilson interval, combined by squared distances).

    Stays inside [−1, 1] and behaves at 0 of n, where the normal approximation collapses to a point.
    """
    if n1 <= 0 or n2 <= 0:
        return float("nan"), float("nan")
    p1, p2 = k1 / n1, k2 / n2
    low1, high1 = wilson_interval(k1, n1, z)
    low2, high2 = wilson_interval(k2, n2, z)
    difference = p1 - p2
    low = difference - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2)
    high = difference + math.sqrt((high1 - p1) ** 2 + (p2 - low2) ** 2)
    return max(-1.0, low), min(1.0, high)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigendecomposition, negatives clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, d]`` (FID's formula).

    ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{½} Σ_b Σ_a^{½})^{½})``: the trace term is computed through
    symmetric square roots, which equals ``tr((Σ_a Σ_b)^{½})`` and stays real for singular covariances.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two [N, d] feature sets with N ≥ 2 and the same d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(sigma_a)
    cross = _sqrtm_psd(root_a @ sigma_b @ root_a)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(cross))
    return max(value, 0.0)


def mean_spread(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (0 for one value), minimum and maximum over training seeds."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(array):
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "sd": sd, "min": float(array.min()), "max": float(array.max()),
            "n": int(len(array))}
