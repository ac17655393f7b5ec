from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg.encoding import EncodingConfig, decode_sum, encode
from secure_agg.randomness import DeterministicRandom


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10), min_size=1, max_size=50),
    clip_range=st.floats(0.01, 8.0),
    ring_bits=st.integers(16, 64),
    weight=st.integers(1, 50),
    seed=st.integers(0, 2**32),
)
def test_round_trip_error_stays_within_the_bound(
    values: list[float], clip_range: float, ring_bits: int, weight: int, seed: int
) -> None:
    config = EncodingConfig(
        clip_range=clip_range, ring_bits=ring_bits, max_clients=4, weight_cap=50
    )
    array = np.asarray(values)

    decoded, total_weight = decode_sum(
        encode(array, weight=weight, config=config, rng=DeterministicRandom(seed)), config=config
    )

    assert total_weight == weight
    clipped = np.clip(array, -clip_range, clip_range)
    # float64 decoding adds a relative error far below the quantisation step.
    assert np.all(np.abs(decoded - clipped) <= config.error_bound * (1 + 1e-9) + 1e-12 * clip_range)
