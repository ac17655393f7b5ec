"""Subsampled zCDP accounting: Zhu and Wang's general bound against Opacus' exact Gaussian."""

from __future__ import annotations

import itertools
import math

import pytest
from opacus.accountants.analysis import rdp as rdp_analysis

from fedge.errors import ConfigError
from strategies.accounting import (
    GaussianSteps,
    gaussian_epsilon,
    subsampled_zcdp_epsilon,
    subsampled_zcdp_noise_multiplier,
    zcdp_epsilon,
)

DELTA = 1e-5


def _rho(z: float) -> float:
    return 1 / (2 * z * z)


def _theorem_6(rho: float, q: float, alpha: int) -> float:
    # Zhu and Wang (ICML 2019), Theorem 6, term by term in plain floats (small alpha only).
    total = (1 - q) ** (alpha - 1) * (alpha * q - q + 1)
    total += math.comb(alpha, 2) * q**2 * (1 - q) ** (alpha - 2) * math.exp(2 * rho)
    total += 3 * sum(
        math.comb(alpha, k) * q**k * (1 - q) ** (alpha - k) * math.exp((k - 1) * k * rho)
        for k in range(3, alpha + 1)
    )
    return min(math.log(total) / (alpha - 1), rho * alpha)


@pytest.mark.parametrize(("rho", "steps"), [(0.01, 1), (0.5, 40), (2.0, 300)])
def test_full_sampling_is_exactly_the_zcdp_bound(rho: float, steps: int) -> None:
    accounted = subsampled_zcdp_epsilon(rho=rho, sample_rate=1.0, steps=steps, delta=DELTA)

    assert accounted == zcdp_epsilon(rho * steps, delta=DELTA)


@pytest.mark.parametrize(("z", "q", "steps"), [(1.0, 0.1, 100), (2.0, 0.2, 50)])
def test_matches_theorem_6_written_out_term_by_term(z: float, q: float, steps: int) -> None:
    # Optimal orders here are 3 and 4: inside 2..30, where the plain sum cannot overflow.
    orders = list(range(2, 31))
    curve = [steps * _theorem_6(_rho(z), q, alpha) for alpha in orders]
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=DELTA)

    accounted = subsampled_zcdp_epsilon(rho=_rho(z), sample_rate=q, steps=steps, delta=DELTA)

    assert accounted == pytest.approx(float(expected), rel=1e-9)


def test_epsilon_grows_with_sample_rate_steps_and_rho() -> None:
    def eps(rho: float = 0.2, q: float = 0.05, steps: int = 100) -> float:
        return subsampled_zcdp_epsilon(rho=rho, sample_rate=q, steps=steps, delta=DELTA)

    by_rate = [eps(q=q) for q in (0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0)]
    by_steps = [eps(steps=steps) for steps in (1, 10, 100, 1000)]
    by_rho = [eps(rho=rho) for rho in (0.01, 0.1, 0.5, 2.0)]

    for series in (by_rate, by_steps, by_rho):
        assert all(a < b for a, b in itertools.pairwise(series)), series
    # Sampling never costs more than not sampling.
    assert eps(q=0.9999) <= zcdp_epsilon(0.2 * 100, delta=DELTA)


# Measured ratios of the general bound to Opacus' exact RDP analysis of the same
# sampled Gaussian: 1.24, 1.11 and 1.59. The factor 3 on the l >= 3 terms is what
# a bound for every mechanism costs when q * alpha is not small; only the second
# case is within 15%, so each case carries its own ceiling.
@pytest.mark.parametrize(
    ("z", "q", "steps", "ceiling"),
    [(1.0, 0.1, 100, 1.30), (0.8, 0.05, 500, 1.15), (2.0, 0.2, 50, 1.65)],
)
def test_general_bound_is_above_opacus_exact_gaussian_and_close(
    z: float, q: float, steps: int, ceiling: float
) -> None:
    exact = gaussian_epsilon(
        [GaussianSteps(noise_multiplier=z, sample_rate=q, steps=steps)], delta=DELTA
    )

    general = subsampled_zcdp_epsilon(rho=_rho(z), sample_rate=q, steps=steps, delta=DELTA)

    assert general >= exact - 1e-9
    assert general <= exact * ceiling


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")
def test_extreme_rates_and_noise_stay_finite() -> None:
    tiny = subsampled_zcdp_epsilon(rho=1e-8, sample_rate=1e-9, steps=10, delta=DELTA)
    huge = subsampled_zcdp_epsilon(rho=5e5, sample_rate=1e-9, steps=10, delta=DELTA)

    assert 0 < tiny < zcdp_epsilon(1e-7, delta=DELTA)
    assert math.isfinite(huge)
    assert huge <= zcdp_epsilon(5e6, delta=DELTA)


@pytest.mark.parametrize(
    ("target", "q", "steps"), [(1.0, 0.01, 300), (3.0, 0.02, 300), (8.0, 0.1, 100)]
)
def test_noise_multiplier_is_the_smallest_that_meets_the_target(
    target: float, q: float, steps: int
) -> None:
    z = subsampled_zcdp_noise_multiplier(
        target_epsilon=target, sample_rate=q, steps=steps, delta=DELTA
    )

    def eps(multiplier: float) -> float:
        return subsampled_zcdp_epsilon(
            rho=_rho(multiplier), sample_rate=q, steps=steps, delta=DELTA
        )

    assert eps(z) <= target
    assert eps(0.99 * z) > target


def test_noise_multiplier_refuses_an_unreachable_target() -> None:
    with pytest.raises(ConfigError, match="no noise multiplier up to 10000"):
        subsampled_zcdp_noise_multiplier(
            target_epsilon=1e-4, sample_rate=1.0, steps=1000, delta=DELTA
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": -1.0}, "rho"),
        ({"rho": math.inf}, "rho"),
        ({"rho": math.nan}, "rho"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": math.nan}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, float], match: str) -> None:
    arguments: dict[str, float] = {"rho": 0.1, "sample_rate": 0.1, "steps": 10, "delta": DELTA}
    arguments.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        subsampled_zcdp_epsilon(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": math.inf}, "target_epsilon"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"delta": 2.0}, "delta"),
    ],
)
def test_invalid_noise_multiplier_arguments_are_refused(
    kwargs: dict[str, float], match: str
) -> None:
    arguments: dict[str, float] = {
        "target_epsilon": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
        "delta": DELTA,
    }
    arguments.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        subsampled_zcdp_noise_multiplier(**arguments)  # type: ignore[arg-type]


def test_merging_equal_events_changes_no_epsilon() -> None:
    from strategies.accounting import AccountantKind, GaussianSteps, composed_epsilon, merged_steps

    one_a_round = [GaussianSteps(noise_multiplier=1.1, sample_rate=0.02, steps=1)] * 50
    mixed = [*one_a_round, GaussianSteps(noise_multiplier=2.0, sample_rate=0.1, steps=3)]

    assert merged_steps(mixed) == [
        GaussianSteps(noise_multiplier=1.1, sample_rate=0.02, steps=50),
        GaussianSteps(noise_multiplier=2.0, sample_rate=0.1, steps=3),
    ]
    from opacus.accountants.analysis import rdp

    orders = [2.0, 8.0, 32.0]
    separate = sum(
        rdp.compute_rdp(
            q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=1, orders=orders
        )
        for e in mixed
        for _ in range(e.steps)
    )
    merged = sum(
        rdp.compute_rdp(
            q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=orders
        )
        for e in merged_steps(mixed)
    )
    assert list(separate) == pytest.approx(list(merged), rel=1e-12)
    assert composed_epsilon(gaussian=mixed, delta=1e-5) == pytest.approx(
        composed_epsilon(gaussian=merged_steps(mixed), delta=1e-5), rel=1e-12
    )
    assert composed_epsilon(gaussian=mixed, delta=1e-5, kind=AccountantKind.RDP) > 0
