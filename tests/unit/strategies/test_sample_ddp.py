"""Shared-noise DP-SGD's encoding: the sum it decodes to, its sensitivity, its noise, its record."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.errors import ConfigError
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import GaussianSteps, composed_epsilon
from strategies.ddp import ddp_decode_sum
from strategies.rotation import rotate, rotated_length
from strategies.sample_ddp import (
    SampleDdpConfig,
    SampleDdpSettings,
    noise_for_budget,
    sddp_encode,
)

DIMENSION = 1000
SEED = bytes(range(32))


def _settings(**overrides: float) -> SampleDdpSettings:
    values: dict[str, float] = {
        "example_clip": 1.0,
        "noise_multiplier": 1.2,
        "sample_rate": 0.05,
        "learning_rate": 0.5,
        "expected_batch": 100.0,
    }
    values.update(overrides)
    return SampleDdpSettings(**values)  # type: ignore[arg-type]


def _round(honest: int = 4, clients: int = 5) -> SampleDdpConfig:
    return _settings().for_round(
        dimension=DIMENSION, sampled=clients, min_honest=honest, rotation_seed=SEED
    )


def _modular_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(vectors[0].shape[0], dtype=np.uint64)
    for vector in vectors:
        total += vector.astype(np.uint64)
    return (total & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def test_the_decoded_mean_is_the_scaled_mean_of_the_gradient_sums_plus_the_noise() -> None:
    config = _round(clients=5)
    rng = np.random.default_rng(0)
    sums = [rng.normal(size=DIMENSION) * 3.0 for _ in range(5)]

    encoded = [sddp_encode(s, config, DeterministicRandom(i)) for i, s in enumerate(sums)]
    mean = ddp_decode_sum(_modular_sum(encoded), config.ring, num_clients=5)

    expected = config.step_scale * np.sum(sums, axis=0) / 5
    # Each coordinate carries five shares of N(0, noise_std^2), divided by 5.
    noise = config.noise_std * math.sqrt(5) / 5
    error = mean - expected
    assert abs(float(np.std(error)) / noise - 1) < 0.1
    assert abs(float(np.mean(error))) < 5 * noise / math.sqrt(DIMENSION)


def test_each_round_is_charged_exactly_the_multiplier_asked_rounding_included() -> None:
    config = _round(honest=4)

    reached = config.multiplier(4)

    assert reached >= 1.2
    assert reached == pytest.approx(1.2, rel=1e-6)
    # The rounding's sqrt(d') is inside the sensitivity, so the share is a hair above z C.
    assert config.noise_std > 1.2 * abs(config.step_scale) / 2
    # Fewer honest devices than the shares were sized for: less noise is counted.
    assert config.multiplier(2) == pytest.approx(reached * math.sqrt(2 / 4))


def test_one_example_moves_the_rounded_vector_by_at_most_the_accounted_sensitivity() -> None:
    config = _round()
    rng = np.random.default_rng(1)
    base = rng.normal(size=DIMENSION) * 5.0
    for trial in range(20):
        # One more example: its clipped gradient has norm at most C.
        example = rng.normal(size=DIMENSION)
        example *= config.example_clip / np.linalg.norm(example)
        # The same uniforms and noise on both sides (the coupling of the module notes).
        with_it = sddp_encode(base + example, config, DeterministicRandom(trial))
        without = sddp_encode(base, config, DeterministicRandom(trial))
        difference = (with_it.astype(np.int64) - without.astype(np.int64) + 2**31) % 2**32 - 2**31

        assert float(np.linalg.norm(difference)) <= config.l2_sensitivity
        assert float(np.linalg.norm(difference)) >= (
            abs(config.step_scale) * config.example_clip / config.ring.gamma
            - math.sqrt(rotated_length(DIMENSION))
        )


def test_a_gradient_sum_past_the_bound_is_clipped_not_wrapped() -> None:
    config = _round(clients=5)
    huge = np.zeros(DIMENSION)
    huge[0] = 1e9

    encoded = sddp_encode(huge, config, DeterministicRandom(1))
    mean = ddp_decode_sum(encoded, config.ring, num_clients=1)

    bound = abs(config.step_scale) * config.sum_clip
    noise = config.noise_std * math.sqrt(DIMENSION)
    assert abs(float(np.linalg.norm(mean)) - bound) < 6 * noise
    assert mean[0] < 0  # the step goes against the gradient


def test_the_encoding_rotates_with_the_rounds_public_seed() -> None:
    config = _round()
    vector = np.zeros(DIMENSION)
    vector[3] = 1.0
    # The rotation spreads one coordinate over all of them (nothing sits in one value),
    # and adds none (no padding).
    assert np.count_nonzero(np.abs(rotate(vector, config.rotation_seed)) > 1e-6) == DIMENSION


def test_the_record_round_trips_and_refuses_what_it_cannot_check() -> None:
    config = _round()

    assert SampleDdpConfig.from_fields(config.to_fields()) == config
    fields = config.to_fields()
    with pytest.raises(ConfigError, match="fields"):
        SampleDdpConfig.from_fields({k: v for k, v in fields.items() if k != "sample-rate"})
    with pytest.raises(ConfigError, match="sample_rate"):
        SampleDdpConfig.from_fields({**fields, "sample-rate": 1.5})
    with pytest.raises(ConfigError, match="32- or 64-bit"):
        SampleDdpConfig.from_fields({**fields, "ring-bits": 16})
    with pytest.raises(ConfigError, match="step_scale"):
        SampleDdpConfig.from_fields({**fields, "step-scale": 0.0})
    with pytest.raises(ConfigError, match="sum_clip"):
        SampleDdpConfig.from_fields({**fields, "sum-clip": 0.5})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("example_clip", 0.0, "example_clip"),
        ("sample_rate", 0.0, "sample_rate"),
        ("learning_rate", -1.0, "learning_rate"),
        ("expected_batch", math.inf, "expected_batch"),
        ("ring_bits", 16, "ring_bits 32"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(
    field: str, value: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(**{field: value})


def test_the_noise_for_a_budget_spends_it_and_no_less_noise_would() -> None:
    z = noise_for_budget(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, rounds=40)

    def spent(multiplier: float) -> float:
        event = GaussianSteps(noise_multiplier=multiplier, sample_rate=0.05, steps=40)
        return composed_epsilon(gaussian=[event], delta=1e-5)

    assert spent(z) <= 3.0
    assert spent(0.99 * z) > 3.0
    with pytest.raises(ConfigError, match="target_epsilon"):
        noise_for_budget(target_epsilon=0.0, delta=1e-5, sample_rate=0.05, rounds=40)
