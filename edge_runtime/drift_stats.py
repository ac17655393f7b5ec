"""The statistics behind drift detection: two-sample KS with its p-value, PSI, corrections.

See :mod:`edge_runtime.drift` for the references (Stephens 1970; Holm 1979; Siddiqi 2006).
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np

from fedge.errors import ConfigError

__all__ = [
    "Correction",
    "finite_array",
    "kolmogorov_sf",
    "ks_2samp_asymptotic",
    "ks_p_values",
    "ks_statistics",
    "population_stability_index",
    "psi_rows",
    "rejected_features",
]

_SERIES_TERMS = np.arange(1, 21, dtype=np.float64)


class Correction(Enum):
    """How the per-feature KS p-values are corrected for multiple testing."""

    BONFERRONI = "bonferroni"
    HOLM = "holm"


def finite_array(what: str, value: object, ndim: int) -> np.ndarray:
    """Return ``value`` as a non-empty finite float64 array of ``ndim`` dimensions."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an array of numbers") from None
    if array.ndim != ndim or array.size == 0:
        raise ConfigError(f"{what} must be a non-empty {ndim}-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ConfigError(f"{what} contain NaN or infinity")
    return array


def kolmogorov_sf(x: np.ndarray | float) -> np.ndarray:
    """Return ``P(K > x)`` for Kolmogorov's limiting distribution, elementwise.

    Uses ``2 sum (-1)^(k-1) exp(-2 k^2 x^2)`` for ``x >= 1.18`` and the Jacobi-theta
    form ``1 - sqrt(2 pi) / x sum exp(-(2k-1)^2 pi^2 / (8 x^2))`` below, where the first
    series converges slowly; 20 terms reach double precision in both ranges.
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    out = np.ones_like(x)
    large = x >= 1.18
    small = (x > 0) & ~large
    signs = np.where(_SERIES_TERMS % 2 == 1, 1.0, -1.0)
    xl = x[large][:, None]
    out[large] = 2 * (signs * np.exp(-2 * _SERIES_TERMS**2 * xl**2)).sum(axis=1)
    xs = x[small][:, None]
    odd = (2 * _SERIES_TERMS - 1) ** 2
    cdf = math.sqrt(2 * math.pi) / xs[:, 0] * np.exp(-odd * math.pi**2 / (8 * xs**2)).sum(axis=1)
    out[small] = 1 - cdf
    return np.asarray(np.clip(out, 0.0, 1.0))


def ks_statistics(reference_sorted: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Return sup |F_ref - F_window| per feature: (F, S) sorted and (m, F) -> (F,)."""
    n, m = reference_sorted.shape[1], window.shape[0]
    statistics = np.empty(reference_sorted.shape[0])
    for feature, reference in enumerate(reference_sorted):
        live = np.sort(window[:, feature])
        points = np.concatenate([reference, live])
        gap = (
            np.searchsorted(reference, points, side="right") / n
            - np.searchsorted(live, points, side="right") / m
        )
        statistics[feature] = np.abs(gap).max()
    return statistics


def ks_p_values(statistics: np.ndarray, n: int, m: int) -> np.ndarray:
    """Return the asymptotic p-values of KS statistics of samples of sizes ``n`` and ``m``."""
    root = math.sqrt(n * m / (n + m))
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * statistics)


def ks_2samp_asymptotic(reference: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """Return the two-sided two-sample KS statistic and its asymptotic p-value.

    Raises
    ------
    ConfigError
        If either sample is empty, not 1-D, or holds NaN or infinity.
    """
    reference = np.sort(finite_array("reference values", reference, 1))
    sample = finite_array("sample values", sample, 1)
    statistic = ks_statistics(reference[None, :], sample[:, None])
    p_value = ks_p_values(statistic, len(reference), len(sample))
    return float(statistic[0]), float(p_value[0])


def psi_rows(expected: np.ndarray, actual: np.ndarray, epsilon: float) -> np.ndarray:
    """Return the PSI of each row of bin fractions (last axis), floored at ``epsilon``."""
    expected = np.maximum(expected, epsilon)
    actual = np.maximum(actual, epsilon)
    return np.asarray(((actual - expected) * np.log(actual / expected)).sum(axis=-1))


def population_stability_index(
    expected: np.ndarray, actual: np.ndarray, *, epsilon: float = 1e-4
) -> float:
    """Return ``sum (a - e) ln(a / e)`` over bins, each fraction floored at ``epsilon``.

    Raises
    ------
    ConfigError
        If the fractions differ in shape, are negative or do not sum to 1, or
        ``epsilon`` is not in (0, 0.01].
    """
    if not 0 < epsilon <= 0.01:
        raise ConfigError(f"epsilon must be in (0, 0.01], got {epsilon}")
    expected = finite_array("expected fractions", expected, 1)
    actual = finite_array("actual fractions", actual, 1)
    if expected.shape != actual.shape:
        raise ConfigError(f"fractions differ in shape: {expected.shape} and {actual.shape}")
    for fractions in (expected, actual):
        if (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
            raise ConfigError("fractions must be non-negative and sum to 1")
    return float(psi_rows(expected, actual, epsilon))


def rejected_features(p_values: np.ndarray, alpha: float, correction: Correction) -> np.ndarray:
    """Return the indices whose null is rejected at family-wise level ``alpha``."""
    count = len(p_values)
    if correction is Correction.BONFERRONI:
        return np.flatnonzero(p_values <= alpha / count)
    order = np.argsort(p_values, kind="stable")
    passing = p_values[order] <= alpha / (count - np.arange(count))
    stop = count if passing.all() else int(np.argmin(passing))  # Holm stops at the first keep
    return np.sort(order[:stop])
