"""Privacy accounting: agreement with the Gaussian's exact zCDP, monotonicity, the DDG bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.errors import ConfigError
from strategies.accounting import (
    AccountantKind,
    GaussianSteps,
    composed_epsilon,
    ddg_rho,
    gaussian_epsilon,
    zcdp_epsilon,
)

DELTA = 1e-5


@pytest.mark.parametrize(("sigma", "steps"), [(0.8, 1), (1.2, 50), (5.0, 1000)])
def test_unsampled_gaussian_matches_its_exact_zcdp(sigma: float, steps: int) -> None:
    # The Gaussian mechanism is exactly 1/(2 sigma^2)-zCDP; T compositions add up.
    accounted = gaussian_epsilon(
        [GaussianSteps(noise_multiplier=sigma, sample_rate=1.0, steps=steps)], delta=DELTA
    )

    assert accounted == pytest.approx(zcdp_epsilon(steps / (2 * sigma**2), delta=DELTA), rel=0.01)


def test_sampling_amplifies_and_prv_is_at_most_rdp() -> None:
    full = GaussianSteps(noise_multiplier=1.1, sample_rate=1.0, steps=100)
    sampled = GaussianSteps(noise_multiplier=1.1, sample_rate=0.01, steps=100)

    rdp = gaussian_epsilon([sampled], delta=DELTA)
    prv = gaussian_epsilon([sampled], delta=DELTA, kind=AccountantKind.PRV)

    assert rdp < gaussian_epsilon([full], delta=DELTA) / 5
    assert prv <= rdp * 1.01
    assert gaussian_epsilon([], delta=DELTA) == 0.0


@settings(max_examples=6, deadline=None)
@given(st.floats(0.5, 5.0), st.floats(0.001, 1.0), st.integers(1, 200), st.integers(1, 200))
def test_epsilon_never_decreases_as_rounds_are_added(
    sigma: float, rate: float, rounds: int, more: int
) -> None:
    def eps(steps: int) -> float:
        event = GaussianSteps(noise_multiplier=sigma, sample_rate=rate, steps=steps)
        return gaussian_epsilon([event], delta=DELTA)

    assert eps(rounds) <= eps(rounds + more) * (1 + 1e-9)


def test_ddg_approaches_the_continuous_gaussian_for_large_noise() -> None:
    # tau vanishes for sigma >> 1: rho -> D2^2 / (2 n sigma^2), the sum's Gaussian.
    rho = ddg_rho(
        l2_sensitivity=1000.0, l1_sensitivity=1e6, sigma=5000.0, num_clients=100, dimension=10**6
    )

    assert rho == pytest.approx(1000.0**2 / (2 * 100 * 5000.0**2), rel=0.01)


def test_ddg_privacy_improves_with_noise_and_clients_and_composes() -> None:
    def rho(sigma: float, clients: int) -> float:
        return ddg_rho(
            l2_sensitivity=10.0,
            l1_sensitivity=100.0,
            sigma=sigma,
            num_clients=clients,
            dimension=100,
        )

    assert rho(0.5, 10) > rho(1.0, 10) > rho(4.0, 10)
    assert rho(1.0, 10) > rho(1.0, 100)
    per_round = rho(2.0, 50)
    assert zcdp_epsilon(10 * per_round, delta=DELTA) > zcdp_epsilon(per_round, delta=DELTA)
    assert zcdp_epsilon(0.0, delta=DELTA) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}, "steps"),
    ],
)
def test_invalid_events_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GaussianSteps(**kwargs)  # type: ignore[arg-type]


def test_invalid_accounting_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="delta"):
        gaussian_epsilon([], delta=0.0)
    with pytest.raises(ConfigError, match="rho"):
        zcdp_epsilon(-1.0, delta=DELTA)
    with pytest.raises(ConfigError, match="sigma"):
        ddg_rho(l2_sensitivity=1, l1_sensitivity=1, sigma=0, num_clients=2, dimension=2)
    with pytest.raises(ConfigError, match="num_clients"):
        ddg_rho(l2_sensitivity=1, l1_sensitivity=1, sigma=1, num_clients=0, dimension=2)
    # Kairouz et al.'s Theorem 1 holds for sigma >= 1/2 only.
    with pytest.raises(ConfigError, match=r"needs sigma >= 1/2, got 0\.49"):
        ddg_rho(l2_sensitivity=1, l1_sensitivity=1, sigma=0.49, num_clients=2, dimension=2)
    assert ddg_rho(l2_sensitivity=1, l1_sensitivity=1, sigma=0.5, num_clients=2, dimension=2) > 0
    assert math.isfinite(zcdp_epsilon(0.5, delta=DELTA))


def test_composition_of_mixed_mechanisms_matches_each_alone_and_grows() -> None:
    event = GaussianSteps(noise_multiplier=1.5, sample_rate=0.05, steps=200)

    alone = composed_epsilon(gaussian=[event], delta=DELTA)
    zcdp_alone = composed_epsilon(rho=0.05, delta=DELTA)
    both = composed_epsilon(rho=0.05, gaussian=[event], delta=DELTA)

    assert alone == pytest.approx(gaussian_epsilon([event], delta=DELTA), rel=0.01)
    assert zcdp_alone == pytest.approx(zcdp_epsilon(0.05, delta=DELTA), rel=0.01)
    assert both > max(alone, zcdp_alone)
    assert composed_epsilon(delta=DELTA) == 0.0


def test_composition_with_the_prv_accountant_matches_opacus_prv() -> None:
    events = [GaussianSteps(noise_multiplier=0.8, sample_rate=0.02, steps=50)] * 2
    prv = composed_epsilon(gaussian=events, delta=1e-5, kind=AccountantKind.PRV)
    rdp = composed_epsilon(gaussian=events, delta=1e-5)
    assert prv == gaussian_epsilon(events, delta=1e-5, kind=AccountantKind.PRV)
    assert prv < rdp  # PRV is the tighter analysis
