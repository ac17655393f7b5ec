from __future__ import annotations

import numpy as np
import pytest

from fedge.errors import ConfigError
from secure_agg.encoding import EncodingConfig, decode_sum, encode
from secure_agg.randomness import DeterministicRandom


def _sum(*encoded: np.ndarray, config: EncodingConfig) -> np.ndarray:
    total = np.zeros_like(encoded[0])
    for vector in encoded:
        total = total + vector  # wraps modulo the dtype's width, like the masked sum
    reduced: np.ndarray = total & config.dtype.type(config.ring_mask)
    return reduced


def test_derived_widths() -> None:
    config = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=100, weight_cap=1000)

    assert config.quant_bits == 32 - 17
    assert config.dtype == np.uint32
    assert EncodingConfig(clip_range=1.0, ring_bits=16, max_clients=10).dtype == np.uint16
    assert EncodingConfig(clip_range=1.0, ring_bits=40, max_clients=10).dtype == np.uint64


def test_single_client_round_trip_is_within_the_bound() -> None:
    config = EncodingConfig(clip_range=0.5, ring_bits=24, max_clients=4)
    values = np.linspace(-0.5, 0.5, 10_001)

    decoded, weight = decode_sum(
        encode(values, weight=1, config=config, rng=DeterministicRandom(1)), config=config
    )

    assert weight == 1
    assert np.max(np.abs(decoded - values)) < config.error_bound


def test_out_of_range_values_are_clipped() -> None:
    config = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=2)

    decoded, _ = decode_sum(
        encode(np.array([-5.0, 5.0]), weight=1, config=config, rng=DeterministicRandom(2)),
        config=config,
    )

    np.testing.assert_allclose(decoded, [-1.0, 1.0], atol=config.error_bound)


@pytest.mark.parametrize("ring_bits", [12, 16, 20, 32, 40])
def test_values_at_the_clip_never_round_past_the_top_level(ring_bits: int) -> None:
    # x = (v + c) s lands on the top level (or a hair above it in float64) and u can be
    # 1 - 2^-32: the levels must still never pass 2^q - 1, guarded or not.
    config = EncodingConfig(clip_range=0.37, ring_bits=ring_bits, max_clients=3)
    values = np.full(50_000, 0.37)
    values[::2] = 5.0  # clipped to c

    encoded = encode(values, weight=1, config=config, rng=DeterministicRandom(ring_bits))

    top = (1 << config.quant_bits) - 1
    assert int(encoded[:-1].max()) == top


def test_an_encoding_that_consumes_its_input_is_the_same() -> None:
    config = EncodingConfig(clip_range=1.0, ring_bits=16, max_clients=10)
    values = np.linspace(-1.5, 1.5, 10_001)
    kept = encode(values.copy(), weight=1, config=config, rng=DeterministicRandom(4))

    consumed = values.copy()
    again = encode(consumed, weight=1, config=config, rng=DeterministicRandom(4), consume=True)

    assert np.array_equal(kept, again)
    assert not np.array_equal(consumed, values)  # its memory held the levels
    # A float32 vector is never written to (it is not float64: copied instead).
    single = values.astype(np.float32)
    encode(single, weight=1, config=config, rng=DeterministicRandom(4), consume=True)
    assert np.array_equal(single, values.astype(np.float32))


def test_stochastic_rounding_is_unbiased() -> None:
    config = EncodingConfig(clip_range=1.0, ring_bits=8, max_clients=1)
    value = 0.3 + config.error_bound / 3  # between two levels
    rng = DeterministicRandom(3)

    decoded = [
        decode_sum(encode(np.array([value]), weight=1, config=config, rng=rng), config=config)[0][0]
        for _ in range(4000)
    ]

    assert abs(np.mean(decoded) - value) < config.error_bound / 20


def test_weighted_mean_is_exact_in_the_weights() -> None:
    config = EncodingConfig(clip_range=1.0, ring_bits=32, max_clients=3, weight_cap=1000)
    rng = DeterministicRandom(4)
    inputs = [np.full(5, 0.5), np.full(5, -0.25), np.full(5, 0.0)]
    weights = [1000, 1, 7]

    mean, total_weight = decode_sum(
        _sum(
            *(
                encode(x, weight=w, config=config, rng=rng)
                for x, w in zip(inputs, weights, strict=True)
            ),
            config=config,
        ),
        config=config,
    )

    expected = sum(w * x for x, w in zip(inputs, weights, strict=True)) / sum(weights)
    assert total_weight == 1008
    np.testing.assert_allclose(mean, expected, atol=config.error_bound)


def test_the_largest_possible_sum_does_not_wrap() -> None:
    config = EncodingConfig(clip_range=1.0, ring_bits=16, max_clients=7, weight_cap=3)
    top = [
        encode(np.array([1.0, -1.0]), weight=3, config=config, rng=DeterministicRandom(i))
        for i in range(7)
    ]

    mean, total_weight = decode_sum(_sum(*top, config=config), config=config)

    assert total_weight == 21
    np.testing.assert_allclose(mean, [1.0, -1.0], atol=config.error_bound)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_range": 0.0, "max_clients": 2}, "clip_range must be a finite number > 0"),
        ({"clip_range": float("nan"), "max_clients": 2}, "clip_range must be a finite number > 0"),
        ({"clip_range": 1.0, "ring_bits": 7, "max_clients": 2}, r"ring_bits must be in 8\.\.64"),
        ({"clip_range": 1.0, "max_clients": 0}, "max_clients and weight_cap must be >= 1"),
        (
            {"clip_range": 1.0, "ring_bits": 16, "max_clients": 1000, "weight_cap": 100},
            "widen the ring",
        ),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EncodingConfig(**kwargs)  # type: ignore[arg-type]


def test_encode_and_decode_refuse_impossible_inputs() -> None:
    config = EncodingConfig(clip_range=1.0, max_clients=2, weight_cap=5)
    rng = DeterministicRandom(5)

    with pytest.raises(ConfigError, match=r"weight must be in \[1, 5\], got 6"):
        encode(np.zeros(3), weight=6, config=config, rng=rng)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        encode(np.array([np.nan]), weight=1, config=config, rng=rng)
    with pytest.raises(ConfigError, match="total weight 0 is impossible"):
        decode_sum(np.zeros(4, dtype=np.uint32), config=config)
