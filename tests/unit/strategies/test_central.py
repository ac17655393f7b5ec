"""Central and local DP mechanisms: Gaussian noise of the configured size, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.errors import ConfigError
from secure_agg.noise import gaussian
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import GaussianSteps
from strategies.central import (
    AdaptiveClipping,
    CentralDpRound,
    CentralDpSettings,
    LocalDpSettings,
    add_central_noise,
    local_privatise,
    next_clip,
)
from strategies.ddp import DistributedDpSettings
from strategies.sample_dp import SampleDpSettings


def test_gaussian_has_the_configured_mean_and_variance() -> None:
    samples = gaussian(2.5, 400_001, DeterministicRandom(1))
    assert samples.shape == (400_001,)
    # Standard errors: mean 2.5/sqrt(n) = 0.004, variance ~ 6.25 * sqrt(2/n) = 0.014.
    assert abs(samples.mean()) < 0.02
    assert abs(samples.var() - 6.25) < 0.08
    # Gaussian tails: about 4.55% beyond two standard deviations.
    assert abs(np.mean(np.abs(samples) > 5.0) - 0.0455) < 0.002


def test_gaussian_is_reproducible_only_with_the_same_seed() -> None:
    a = gaussian(1.0, 1000, DeterministicRandom(7))
    assert np.array_equal(a, gaussian(1.0, 1000, DeterministicRandom(7)))
    assert not np.array_equal(a, gaussian(1.0, 1000, DeterministicRandom(8)))


@pytest.mark.parametrize(("std", "size"), [(0.0, 3), (-1.0, 3), (math.inf, 3), (1.0, -1)])
def test_gaussian_rejects_bad_parameters(std: float, size: int) -> None:
    with pytest.raises(ConfigError):
        gaussian(std, size, DeterministicRandom(0))


def test_the_noisy_mean_carries_the_configured_noise_on_the_sum() -> None:
    n, clip, z = 20, 0.5, 1.3
    mean = np.full(100_000, 0.01)
    noisy = add_central_noise(
        mean, l2_clip=clip, noise_multiplier=z, num_clients=n, rng=DeterministicRandom(2)
    )
    # The sum (n x the mean) carries N(0, (z C)^2) and nothing else.
    noise_of_sum = (noisy - mean) * n
    assert abs(noise_of_sum.std() / (z * clip) - 1) < 0.01
    assert abs(noise_of_sum.mean()) < 0.01


def test_central_noise_refuses_a_mean_holding_nan() -> None:
    with pytest.raises(ConfigError, match="NaN"):
        add_central_noise(
            np.array([np.nan]),
            l2_clip=1,
            noise_multiplier=1,
            num_clients=1,
            rng=DeterministicRandom(0),
        )


def test_adaptive_clipping_keeps_the_round_at_the_configured_noise_multiplier() -> None:
    settings = CentralDpSettings(
        l2_clip=1.0, noise_multiplier=1.0, adaptive=AdaptiveClipping(count_noise_std=5.0)
    )
    z_u = settings.update_noise_multiplier
    # Andrew et al., Theorem 1: z^-2 = z_u^-2 + (2 sigma_b)^-2.
    assert math.isclose(z_u**-2 + 10.0**-2, 1.0, rel_tol=1e-12)
    assert z_u > 1.0
    assert CentralDpSettings(l2_clip=1.0, noise_multiplier=1.0).update_noise_multiplier == 1.0


def test_adaptive_clipping_refuses_too_little_count_noise() -> None:
    with pytest.raises(ConfigError, match="count_noise_std"):
        CentralDpSettings(
            l2_clip=1.0, noise_multiplier=4.0, adaptive=AdaptiveClipping(count_noise_std=1.0)
        )


def test_next_clip_follows_the_target_quantile_and_stays_in_bounds() -> None:
    adaptive = AdaptiveClipping(count_noise_std=0.01, learning_rate=0.2, max_clip=1.05)
    rng = DeterministicRandom(3)
    # Every update fit (centred sum +100 / 2): the clip is too large and shrinks by about
    # exp(-0.2 * 0.5).
    smaller, fraction = next_clip(
        1.0, centred_sum=50, expected_clients=100, adaptive=adaptive, rng=rng
    )
    assert abs(fraction - 1.0) < 0.01
    assert math.isclose(smaller, math.exp(-0.1), rel_tol=1e-3)
    # None fit: it grows, but never past max_clip.
    larger, _ = next_clip(1.0, centred_sum=-50, expected_clients=100, adaptive=adaptive, rng=rng)
    assert larger == 1.05
    # 80 of 100 survived, all fit: the fixed count still divides (as Andrew et al., TFF).
    _, partial = next_clip(1.0, centred_sum=40, expected_clients=100, adaptive=adaptive, rng=rng)
    assert abs(partial - 0.9) < 0.01
    with pytest.raises(ConfigError, match="impossible"):
        next_clip(1.0, centred_sum=51, expected_clients=100, adaptive=adaptive, rng=rng)


def test_local_privatise_clips_then_adds_noise_of_z_c() -> None:
    settings = LocalDpSettings(l2_clip=2.0, noise_multiplier=0.5)
    update = np.full(200_000, 1.0)  # norm 447: clipped to 2
    private = local_privatise(update, settings, DeterministicRandom(4))
    clipped = update * (2.0 / np.linalg.norm(update))
    assert abs((private - clipped).std() - 1.0) < 0.01  # z C = 1
    # A zero update is accepted and only noised.
    zero = local_privatise(np.zeros(10), settings, DeterministicRandom(5))
    assert zero.shape == (10,) and np.all(zero != 0)
    assert settings.accounted_noise_multiplier == 0.25


def test_records_round_trip_and_reject_bad_fields() -> None:
    central = CentralDpRound(l2_clip=0.7, noise_multiplier=1.1, adaptive=True)
    assert CentralDpRound.from_fields(central.to_fields()) == central
    local = LocalDpSettings(l2_clip=1.0, noise_multiplier=2.0)
    assert LocalDpSettings.from_fields(local.to_fields()) == local
    sample = SampleDpSettings(target_epsilon=3.0, total_epochs=5)
    assert SampleDpSettings.from_fields(sample.to_fields()) == sample
    with pytest.raises(ConfigError):
        CentralDpRound.from_fields({**central.to_fields(), "adaptive": 1})
    with pytest.raises(ConfigError):
        CentralDpRound.from_fields({"l2-clip": 1.0})
    with pytest.raises(ConfigError):
        LocalDpSettings.from_fields({"l2-clip": -1.0, "noise-multiplier": 1.0})
    with pytest.raises(ConfigError):
        SampleDpSettings.from_fields({**sample.to_fields(), "total-epochs": 2.5})


def test_sample_dp_needs_exactly_one_of_noise_and_target() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        SampleDpSettings(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ConfigError, match="exactly one"):
        SampleDpSettings()


@pytest.mark.parametrize("z", [1e-200, 0.0, 1e300, math.inf, math.nan])
def test_noise_multipliers_outside_the_bounds_are_refused_everywhere(z: float) -> None:
    # 1e-200 squared is 0: it used to end in a ZeroDivisionError inside the accountant.
    with pytest.raises(ConfigError, match=r"noise_multiplier must be in \[1e-06, 1e\+06\]"):
        CentralDpSettings(l2_clip=1.0, noise_multiplier=z)
    with pytest.raises(ConfigError, match="noise_multiplier must be in"):
        LocalDpSettings(l2_clip=1.0, noise_multiplier=z)
    with pytest.raises(ConfigError, match="noise_multiplier must be in"):
        DistributedDpSettings(l2_clip=1.0, noise_multiplier=z)
    with pytest.raises(ConfigError, match="noise_multiplier must be in"):
        GaussianSteps(noise_multiplier=z, sample_rate=1.0, steps=1)
