"""The discrete Gaussian sampler: its pmf, its variance, seeding and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedge.errors import ConfigError
from secure_agg.noise import discrete_gaussian, discrete_gaussian_variance, uniform53
from secure_agg.randomness import DeterministicRandom


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    bound = math.ceil(40 * sigma) + 1
    everything = np.arange(-bound, bound + 1)
    normaliser = np.sum(np.exp(-(everything**2) / (2 * sigma * sigma)))
    return np.asarray(np.exp(-(support**2) / (2 * sigma * sigma)) / normaliser)


@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.5])
def test_samples_follow_the_discrete_gaussian_pmf(sigma: float) -> None:
    samples = discrete_gaussian(sigma, 200_000, DeterministicRandom(11))

    support = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1)
    observed = np.array([np.sum(samples == k) for k in support] + [0.0])
    observed[-1] = samples.shape[0] - observed[:-1].sum()  # the tails, pooled
    expected_p = _pmf(sigma, support)
    expected = np.append(expected_p, 1 - expected_p.sum()) * samples.shape[0]
    _, p_value = stats.chisquare(observed, expected)

    assert p_value > 1e-4


def test_the_variance_matches_the_configured_one() -> None:
    sigma = 12.0
    samples = discrete_gaussian(sigma, 400_000, DeterministicRandom(3))

    # Var of the sample variance of a near-Gaussian is about 2 sigma^4 / n.
    tolerance = 5 * math.sqrt(2 / samples.shape[0]) * sigma**2
    assert abs(samples.var() - discrete_gaussian_variance(sigma)) < tolerance
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(samples.shape[0])
    assert discrete_gaussian_variance(sigma) == pytest.approx(sigma**2, rel=1e-12)
    assert discrete_gaussian_variance(0.3) < 0.3**2


def test_seeded_sources_reproduce_and_distinct_seeds_differ() -> None:
    first = discrete_gaussian(4.0, 1000, DeterministicRandom(5))
    again = discrete_gaussian(4.0, 1000, DeterministicRandom(5))
    other = discrete_gaussian(4.0, 1000, DeterministicRandom(6))

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.int64
    assert discrete_gaussian(1.0, 0, DeterministicRandom(1)).shape == (0,)


@pytest.mark.parametrize(
    ("sigma", "size", "match"),
    [(0.0, 10, "sigma"), (-1.0, 10, "sigma"), (math.inf, 10, "sigma"), (1.0, -1, "size")],
)
def test_invalid_arguments_are_refused(sigma: float, size: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        discrete_gaussian(sigma, size, DeterministicRandom(1))


def test_uniforms_cover_the_unit_interval_with_53_bits() -> None:
    values = uniform53(DeterministicRandom(9), 100_000)

    assert values.min() >= 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.005
    assert np.all(values * 2.0**53 == np.floor(values * 2.0**53))
