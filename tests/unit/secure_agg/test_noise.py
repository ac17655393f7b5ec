"""The discrete Gaussian sampler: its pmf, its variance, seeding and validation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from fedge.errors import ConfigError
from secure_agg import noise
from secure_agg.noise import (
    add_discrete_gaussian,
    convolution_statistical_distance,
    discrete_gaussian,
    discrete_gaussian_variance,
    table_statistical_distance,
    uniform32,
    uniform53,
)
from secure_agg.prg import expand_mask
from secure_agg.randomness import DeterministicRandom, RandomSource

# Both samplers behind discrete_gaussian: the inversion table (sigma <= 512) and the
# rejection sampler (above); each must pass every distribution test.
SAMPLERS: dict[str, Callable[[float, int, RandomSource], npt.NDArray[np.signedinteger]]] = {
    "table": noise._by_table,
    "rejection": noise._by_rejection,
}


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    bound = math.ceil(40 * sigma) + 1
    everything = np.arange(-bound, bound + 1)
    normaliser = np.sum(np.exp(-(everything**2) / (2 * sigma * sigma)))
    return np.asarray(np.exp(-(support**2) / (2 * sigma * sigma)) / normaliser)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.5, 64.8])
def test_samples_follow_the_discrete_gaussian_pmf(sampler: str, sigma: float) -> None:
    samples = SAMPLERS[sampler](sigma, 200_000, DeterministicRandom(11))

    support = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1)
    observed = np.array([np.sum(samples == k) for k in support] + [0.0])
    observed[-1] = samples.shape[0] - observed[:-1].sum()  # the tails, pooled
    expected_p = _pmf(sigma, support)
    expected = np.append(expected_p, 1 - expected_p.sum()) * samples.shape[0]
    _, p_value = stats.chisquare(observed, expected)

    assert p_value > 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_variance_matches_the_configured_one(sampler: str) -> None:
    sigma = 12.0
    samples = SAMPLERS[sampler](sigma, 400_000, DeterministicRandom(3))

    # Var of the sample variance of a near-Gaussian is about 2 sigma^4 / n.
    tolerance = 5 * math.sqrt(2 / samples.shape[0]) * sigma**2
    assert abs(samples.var() - discrete_gaussian_variance(sigma)) < tolerance
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(samples.shape[0])
    assert discrete_gaussian_variance(sigma) == pytest.approx(sigma**2, rel=1e-12)
    assert discrete_gaussian_variance(0.3) < 0.3**2


def test_the_table_is_the_exact_pmf_within_its_stated_distance() -> None:
    sigma = 3.3
    table = noise._table(sigma)
    bound = table.bound
    thresholds = np.append(table.thresholds.astype(np.float64), 2.0**64) / 2.0**64
    table_pmf = np.diff(np.concatenate(([0.0], thresholds)))
    exact = _pmf(sigma, np.arange(-bound, bound + 1))

    assert np.all(np.diff(table.thresholds.astype(np.float64)) >= 0)
    # float64 cannot show 2^-65; the pmf agrees to its own rounding, and the stated
    # distance is tiny and grows with sigma.
    np.testing.assert_allclose(table_pmf, exact, atol=1e-15)
    assert table_statistical_distance(sigma) < 1e-17
    assert table_statistical_distance(64.8) < table_statistical_distance(512.0) < 1e-15
    with pytest.raises(ConfigError, match="512"):
        table_statistical_distance(513.0)


class _Recording:
    """A seeded source that keeps every seed it hands out, to rebuild the keystreams."""

    def __init__(self, seed: int) -> None:
        self._inner = DeterministicRandom(seed)
        self.seeds: list[bytes] = []

    def random_bytes(self, count: int) -> bytes:
        drawn = self._inner.random_bytes(count)
        self.seeds.append(drawn)
        return drawn


@pytest.mark.parametrize("sigma", [3.0, 40.0, 512.0])
def test_each_table_sample_is_its_64_bit_words_place_among_the_thresholds(sigma: float) -> None:
    # The sampler draws a word's top 16 bits for every sample and its low 48 only where
    # a threshold splits the top's bucket (one comparison for a bucket of one threshold,
    # a search for more): every sample must still be exactly the full word's inversion,
    # #{thresholds <= word} - bound.
    size = 100_000
    rng = _Recording(3)
    samples = noise._by_table(sigma, size, rng)
    table = noise._table(sigma)
    top = expand_mask(rng.seeds[0], size, np.dtype(np.uint16)).astype(np.uint64)
    starts = top << np.uint64(48)
    first = np.searchsorted(table.thresholds, starts, side="right") - table.bound
    last = np.searchsorted(table.thresholds, starts | np.uint64(2**48 - 1), side="right")
    sure = first == last - table.bound
    assert np.array_equal(samples[sure], first[sure])
    (split,) = np.nonzero(~sure)
    assert split.size > 0  # the low bits were needed somewhere
    if sigma >= 40:  # and some in a tail bucket of several thresholds (a search)
        assert np.any(last[split] - first[split] - table.bound > 1)
    low = expand_mask(rng.seeds[1], split.size, np.dtype(np.uint64)) >> np.uint64(16)
    words = starts[split] | low
    assert np.array_equal(
        samples[split], np.searchsorted(table.thresholds, words, side="right") - table.bound
    )


def test_each_scale_uses_its_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[str] = []

    def counted(name: str, sampler: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def sample(*args: object) -> np.ndarray:
            used.append(name)
            return sampler(*args)

        return sample

    for name in ("table", "convolution", "rejection"):
        monkeypatch.setattr(noise, f"_by_{name}", counted(name, getattr(noise, f"_by_{name}")))

    discrete_gaussian(512.0, 10, DeterministicRandom(1))
    discrete_gaussian(2.0**20, 10, DeterministicRandom(1))
    discrete_gaussian(2.0**50, 10, DeterministicRandom(1))

    # The convolution draws its levels from the table (through the module's name).
    assert used[0] == "table" and used[1] == "convolution" and used[-1] == "rejection"
    assert set(used[2:-1]) == {"table"}


# Above the table's scales: one level (fine = sigma / 2), one at 512, two levels.
CONVOLVED = [600.0, 1500.0, 70_000.0]


def _binned_pmf(sigma: float, edges: np.ndarray) -> np.ndarray:
    # The exact pmf summed over [edge_i, edge_(i+1)), by the (exact to 1e-16) sum of the
    # terms over +-40 sigma.
    bound = math.ceil(40 * sigma)
    support = np.arange(-bound, bound + 1)
    pmf = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma * sigma))
    pmf /= pmf.sum()
    return np.histogram(support, bins=edges, weights=pmf)[0]


@pytest.mark.parametrize("sigma", CONVOLVED)
def test_convolution_samples_follow_the_discrete_gaussian(sigma: float) -> None:
    samples = noise._by_convolution(sigma, 300_000, DeterministicRandom(17))

    edges = np.concatenate(([-np.inf], np.linspace(-3 * sigma, 3 * sigma, 61), [np.inf]))
    observed = np.histogram(samples, bins=edges)[0]
    expected = _binned_pmf(sigma, edges) * samples.shape[0]
    assert stats.chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-4
    tolerance = 5 * math.sqrt(2 / samples.shape[0]) * sigma**2
    assert abs(samples.var() - sigma**2) < tolerance
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(samples.shape[0])


@pytest.mark.parametrize("sigma", CONVOLVED)
def test_convolution_leaves_no_pattern_in_the_low_digits(sigma: float) -> None:
    # z Y + X is X modulo z: the residues must be those of N_Z(0, sigma^2) (uniform to
    # far below what 300,000 samples show), modulo each level's z and small numbers.
    levels, _ = noise._convolution_plan(sigma)
    samples = noise._by_convolution(sigma, 300_000, DeterministicRandom(23))

    for modulus in {2, 3, 7, *(level.z for level in levels)}:
        counts = np.bincount(samples % modulus, minlength=modulus)
        assert stats.chisquare(counts).pvalue > 1e-4, modulus


@pytest.mark.parametrize("sigma", [513.0, 1500.0, 2.378e7, 1e9, 2.0**40])
def test_the_convolution_plan_composes_to_sigma_with_smoothing_at_least_4(sigma: float) -> None:
    levels, base = noise._convolution_plan(sigma)

    assert 0 < base <= 512.0
    scale = base
    for level in reversed(levels):
        assert level.z >= 1 and level.fine <= 512.0 and level.smoothing >= 4.0 - 1e-9
        following = scale
        scale = math.sqrt(level.z**2 * following**2 + level.fine**2)
        assert level.smoothing == pytest.approx(following * level.fine / scale, rel=1e-9)
    assert scale == pytest.approx(sigma, rel=1e-12)
    assert convolution_statistical_distance(sigma) < 1e-14 * (len(levels) + 1)


@pytest.mark.parametrize("sigma", [40.0, 2.4e7])
def test_adding_in_place_adds_the_same_samples(sigma: float) -> None:
    base = np.arange(-500, 500, dtype=np.int64) * 1_000_003
    target = base.copy()
    add_discrete_gaussian(target, sigma, DeterministicRandom(9))
    assert np.array_equal(target - base, discrete_gaussian(sigma, 1000, DeterministicRandom(9)))
    assert target.dtype == np.int64


def test_the_convolution_bound_follows_the_order_the_levels_are_applied() -> None:
    # At a 32-bit ring's sigma the levels are z = 127, 127, 120 (outermost first) over a
    # base of ~11.6: the innermost level (z = 120) multiplies the base draw first, and the
    # int32 choice rests on this bound holding every value the samples can take.
    levels, base = noise._convolution_plan(2.4e7)
    assert [level.z for level in levels] == [127, 127, 120]
    table = noise._table_bound(base)
    fine = noise._table_bound(512.0)
    expected = ((table * 120 + fine) * 127 + fine) * 127 + fine
    assert noise._convolution_bound(levels, base) == expected < 2**31
    samples = noise._by_convolution(2.4e7, 10_000, DeterministicRandom(8))
    assert samples.dtype == np.int32


def test_tiny_scales_give_zero() -> None:
    # 2^-20 is the smallest sigma accepted: P[Y != 0] is about e^(-2^39).
    assert not discrete_gaussian(2.0**-20, 1000, DeterministicRandom(2)).any()


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


def test_32_bit_uniforms_cover_the_unit_interval_on_the_2_to_minus_32_grid() -> None:
    values = uniform32(DeterministicRandom(9), 100_000)

    assert values.dtype == np.float64 and values.shape == (100_000,)
    assert values.min() >= 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 0.005
    scaled = values * 2.0**32
    assert np.all(scaled == np.floor(scaled))
    # Every bit is used (not a 53-bit value truncated to a few).
    assert len(np.unique(scaled.astype(np.uint64) & np.uint64(0xFF))) == 256
    counts = np.histogram(values, bins=20, range=(0.0, 1.0))[0]
    assert stats.chisquare(counts).pvalue > 1e-4
