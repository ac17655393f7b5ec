"""Clipping never increases a norm and accepts zero; the Hadamard rotation is an isometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.linalg import hadamard

from fedge.errors import ConfigError
from strategies.clipping import clip_l2
from strategies.rotation import Precision, rotate, rotated_length, spread_length, unrotate

SEED = bytes(range(32))
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 64), elements=finite), st.floats(1e-3, 1e3))
def test_clipping_never_increases_a_norm_and_respects_the_bound(
    update: np.ndarray, bound: float
) -> None:
    result = clip_l2(update, bound)

    after = float(np.linalg.norm(result.update))
    assert after <= result.norm + 1e-9 * max(1.0, result.norm)
    assert after <= bound * (1 + 1e-12)
    assert result.clipped == (result.norm > bound)
    if not result.clipped:
        np.testing.assert_array_equal(result.update, update)


def test_the_zero_update_is_accepted_unchanged() -> None:
    result = clip_l2(np.zeros(5), 1.0)

    assert result.norm == 0.0 and not result.clipped
    np.testing.assert_array_equal(result.update, np.zeros(5))


def test_a_long_update_keeps_its_direction() -> None:
    result = clip_l2(np.array([3.0, 4.0]), 1.0)

    np.testing.assert_allclose(result.update, [0.6, 0.8])
    assert result.norm == 5.0 and result.clipped


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
def test_invalid_bounds_and_values_are_refused(bound: float) -> None:
    with pytest.raises(ConfigError, match="clipping bound"):
        clip_l2(np.ones(3), bound)
    with pytest.raises(ConfigError, match="NaN"):
        clip_l2(np.array([1.0, np.nan]), 1.0)


def _overlapping_rotation_matrix(size: int) -> np.ndarray:
    # Two randomised Hadamard transforms of h = 2^floor(log2 size) values: the first on
    # the first h values, the second (the keystream's next h signs) on the last h.
    h = 1 << (size.bit_length() - 1)
    signs = 1.0 - 2.0 * (np.frombuffer(_keystream(2 * h), np.uint8) & 1)
    first = np.eye(size)
    first[:h, :h] = hadamard(h) @ np.diag(signs[:h]) / math.sqrt(h)
    second = np.eye(size)
    second[size - h :, size - h :] = hadamard(h) @ np.diag(signs[h:]) / math.sqrt(h)
    return second @ first


@pytest.mark.parametrize("size", [3, 5, 7, 100, 1000])
def test_rotation_of_other_lengths_is_two_overlapping_hadamard_transforms(size: int) -> None:
    values = np.random.default_rng(size).normal(size=size)
    matrix = _overlapping_rotation_matrix(size)

    rotated = rotate(values, SEED)

    assert rotated.shape == (size,)  # no padding
    np.testing.assert_allclose(rotated, matrix @ values, atol=1e-12)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(size), atol=1e-12)
    np.testing.assert_allclose(unrotate(rotated, SEED, size), values, atol=1e-12)


def test_every_rotated_value_combines_h_inputs_each_by_at_most_one_over_sqrt_h() -> None:
    # The spread the wrap-around bound uses: each output is a +-1/sqrt(h) combination of
    # one block's values, so a spike anywhere gives at most 1/sqrt(h) per coordinate.
    size = 1000
    h = spread_length(size)
    assert h == 512
    matrix = _overlapping_rotation_matrix(size)

    assert np.abs(matrix).max() <= 1 / math.sqrt(h) + 1e-12
    assert (np.abs(matrix) > 1e-12).sum(axis=1).min() >= h


@pytest.mark.parametrize("size", [2, 16, 32, 512, 2048])
def test_rotation_is_the_hadamard_matrix_at_every_factorisation(size: int) -> None:
    # The transform runs as products of 16 x 16 Hadamard factors: these sizes take one
    # whole factor, a partial one, two and a partial third.
    values = np.random.default_rng(size).normal(size=size)
    signs = 1.0 - 2.0 * (np.frombuffer(_keystream(size), np.uint8) & 1)

    expected = hadamard(size) @ (values * signs) / math.sqrt(size)

    np.testing.assert_allclose(rotate(values, SEED), expected, atol=1e-12)
    np.testing.assert_allclose(unrotate(expected, SEED, size), values, atol=1e-12)


def _keystream(size: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(SEED), modes.CTR(bytes(16))).encryptor().update(bytes(size))


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.integers(1, 300), elements=finite))
def test_rotation_preserves_norms_and_inverts(values: np.ndarray) -> None:
    rotated = rotate(values, SEED)

    assert rotated.shape == (rotated_length(values.shape[0]),) == values.shape
    scale = max(1.0, float(np.linalg.norm(values)))
    assert abs(np.linalg.norm(rotated) - np.linalg.norm(values)) <= 1e-9 * scale
    np.testing.assert_allclose(unrotate(rotated, SEED, values.shape[0]), values, atol=1e-9 * scale)


def test_rotation_spreads_a_spike_over_every_coordinate() -> None:
    spike = np.zeros(1024)
    spike[7] = 1.0

    rotated = rotate(spike, SEED)

    np.testing.assert_allclose(np.abs(rotated), 1 / 32)
    assert not np.array_equal(rotate(spike, bytes(32)), rotated)


def test_rotation_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="at least one value"):
        rotated_length(0)
    with pytest.raises(ConfigError, match="32 bytes"):
        rotate(np.ones(4), b"short")
    with pytest.raises(ConfigError, match="has 5 entries, got 4"):
        unrotate(np.ones(4), SEED, 5)


@pytest.mark.parametrize("size", [1, 16, 1000, 4096])
def test_single_precision_rotation_is_the_same_rotation_to_float32_accuracy(size: int) -> None:
    values = np.random.default_rng(size).normal(size=size)

    single = rotate(values, SEED, precision=Precision.SINGLE)
    double = rotate(values, SEED)

    assert single.dtype == np.float32 and double.dtype == np.float64
    scale = float(np.linalg.norm(values))
    np.testing.assert_allclose(single, double, atol=1e-6 * scale)
    np.testing.assert_allclose(unrotate(single, SEED, size), values, atol=1e-6 * scale)
