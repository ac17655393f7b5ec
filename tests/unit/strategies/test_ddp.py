"""Distributed discrete Gaussian encoding: exact sums without wrap-around, the configured noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.errors import ConfigError
from secure_agg.randomness import DeterministicRandom
from strategies.ddp import (
    DdpConfig,
    DistributedDpSettings,
    choose_gamma,
    ddp_decode_sum,
    ddp_encode,
)

SEED = bytes(range(32))


def _config(**overrides: object) -> DdpConfig:
    values: dict[str, object] = {
        "l2_clip": 1.0,
        "noise_std": 1e-6,
        "dimension": 300,
        "expected_clients": 20,
        "ring_bits": 32,
        "rotation_seed": SEED,
    }
    values.update(overrides)
    return DdpConfig(**values)  # type: ignore[arg-type]


def _secure_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector  # wraps modulo 2^bits, like the unmasked secure sum
    return total


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_the_decoded_sum_is_the_clipped_mean_within_the_rounding_error(bits: int) -> None:
    # The least noise each ring accepts (sigma >= 1/2 integer step) is ~1e-4 at 16 bits.
    noise = 1e-3 if bits == 16 else 1e-6
    config = _config(ring_bits=bits, dimension=300, noise_std=noise)
    updates = [np.linspace(-1, 1, 300) * (i - 9.5) / 30 for i in range(20)]
    encoded = [ddp_encode(u, config, DeterministicRandom(i)) for i, u in enumerate(updates)]

    mean = ddp_decode_sum(_secure_sum(encoded, bits), config, num_clients=20)

    expected = np.mean([u * min(1.0, 1.0 / float(np.linalg.norm(u))) for u in updates], axis=0)
    error = np.linalg.norm(mean - expected)
    # Each client's rounding error is < gamma per coordinate (averaged: < gamma
    # sqrt(d) in L2); the mean's noise has std noise_std / sqrt(n) per coordinate.
    assert error <= config.gamma * math.sqrt(300) + 6 * noise * math.sqrt(300 / 20)
    assert encoded[0].dtype == np.dtype(f"uint{bits}")


def test_worst_case_aligned_updates_do_not_wrap_around() -> None:
    config = _config(ring_bits=16, dimension=64, expected_clients=20, noise_std=0.01)
    spike = np.zeros(64)
    spike[3] = 5.0  # clipped to norm 1; every client sends the same direction
    encoded = [ddp_encode(spike, config, DeterministicRandom(i)) for i in range(20)]

    mean = ddp_decode_sum(_secure_sum(encoded, 16), config, num_clients=20)

    assert mean[3] == pytest.approx(1.0, abs=0.05)
    assert np.max(np.abs(np.delete(mean, 3))) < 0.05


def test_the_noisy_sum_has_the_configured_variance() -> None:
    noise_std, clients, dimension = 0.3, 10, 4096
    config = _config(noise_std=noise_std, dimension=dimension, expected_clients=clients)
    encoded = [
        ddp_encode(np.zeros(dimension), config, DeterministicRandom(100 + i))
        for i in range(clients)
    ]

    total = ddp_decode_sum(_secure_sum(encoded, 32), config, num_clients=1)

    configured = clients * noise_std**2
    # The sample variance of 4096 values is within 15 % with overwhelming probability.
    assert total.var() == pytest.approx(configured, rel=0.15)
    assert config.sigma_integer > 1


def test_the_scale_shrinks_as_the_ring_widens() -> None:
    narrow = choose_gamma(
        l2_clip=1.0, dimension=1000, expected_clients=100, noise_std=0.1, ring_bits=16
    )
    wide = choose_gamma(
        l2_clip=1.0, dimension=1000, expected_clients=100, noise_std=0.1, ring_bits=32
    )

    assert wide < narrow / 60_000


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"l2_clip": 0.0}, "l2_clip"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"dimension": 0}, "dimension"),
        ({"ring_bits": 24}, "ring_bits"),
        ({"rotation_seed": b"short"}, "rotation_seed"),
        ({"ring_bits": 8, "expected_clients": 200}, "cannot hold"),
    ],
)
def test_invalid_configs_are_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _config(**overrides)


def test_wrong_lengths_are_refused() -> None:
    config = _config()

    with pytest.raises(ConfigError, match="expected 300"):
        ddp_encode(np.zeros(299), config, DeterministicRandom(1))
    with pytest.raises(ConfigError, match="expected 300"):
        ddp_decode_sum(np.zeros(512, np.uint32), config, num_clients=2)
    with pytest.raises(ConfigError, match="num_clients"):
        ddp_decode_sum(np.zeros(300, np.uint32), config, num_clients=0)


def test_round_settings_size_noise_shares_for_the_fewest_honest_contributors() -> None:
    settings = DistributedDpSettings(l2_clip=2.0, noise_multiplier=0.5)

    config = settings.for_round(dimension=10, sampled=10, min_honest=7, rotation_seed=SEED)

    # 7 honest clients' shares add up to z c: whatever more survive only adds noise.
    assert config.noise_std == pytest.approx(0.5 * 2.0 / math.sqrt(7))
    assert config.expected_clients == 10
    with pytest.raises(ConfigError, match="min_honest"):
        settings.for_round(dimension=10, sampled=10, min_honest=11, rotation_seed=SEED)
    with pytest.raises(ConfigError, match="min_honest_contributors"):
        DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0, min_honest_contributors=0)
    assert DdpConfig.from_fields(config.to_fields()) == config
    with pytest.raises(ConfigError, match="noise_multiplier"):
        DistributedDpSettings(l2_clip=1.0, noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="ring_bits"):
        DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0, ring_bits=12)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dimension": None}, "has fields"),
        ({"dimension": "300"}, "'dimension' must be int"),
        ({"dimension": True}, "'dimension' must be int"),
        ({"rotation-seed": "text"}, "'rotation-seed' must be bytes"),
        ({"l2-clip": -1.0}, "l2_clip"),
    ],
)
def test_config_fields_from_the_network_are_validated(
    change: dict[str, object], match: str
) -> None:
    fields: dict[str, object] = dict(_config().to_fields())
    for key, value in change.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value

    with pytest.raises(ConfigError, match=match):
        DdpConfig.from_fields(fields)


def test_conditional_rounding_keeps_every_client_within_the_accounted_sensitivity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 16-bit ring: few integer steps per unit, so rounding is a large part of the norm.
    config = _config(ring_bits=16, dimension=4000, expected_clients=100, noise_std=1e-3)
    # The rounded vector alone: no noise added.
    monkeypatch.setattr("strategies.ddp.add_discrete_gaussian", lambda target, sigma, rng: None)
    scaled = config.l2_clip / config.gamma
    padded = 4096
    # Rounding adds almost nothing to c/gamma (unconditionally it could add sqrt(d') = 64).
    assert scaled < config.l2_sensitivity < scaled + 0.05 * math.sqrt(padded)
    for seed in range(20):
        update = np.cos(np.arange(4000) * (seed + 1)) * 10.0  # clipped to norm 1
        encoded = ddp_encode(update, config, DeterministicRandom(seed))
        signed = encoded.astype(np.int64)
        signed[signed >= 2**15] -= 2**16
        assert float(np.linalg.norm(signed)) <= config.l2_sensitivity


@pytest.mark.parametrize("bits", [16, 32])
def test_an_update_clipped_to_the_bound_always_rounds_at_every_ring(bits: int) -> None:
    # At a 32-bit ring the clip is ~2^27 integer steps and conditional rounding leaves
    # half a step of room: a rotation's own float error (single precision: several
    # steps for a heavy-tailed update) must not push a clipped update past the bound, or every
    # try fails and the device leaves a round it should have joined.
    config = _config(ring_bits=bits, dimension=100_000, expected_clients=4, noise_std=1.0)
    for seed in range(6):
        # Heavy-tailed, as a diverging model's update is (a few values dominate).
        update = np.tan(np.arange(100_000) * (seed + 1.5)) * 40.0  # far past the clip
        encoded = ddp_encode(update, config, DeterministicRandom(seed))
        assert encoded.shape == (100_000,)
