"""Norm bounding of updates: scaled updates are bounded, short ones kept, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.errors import ConfigError
from strategies.norm_bound import bound_update, median_norm_bound, update_norm


def test_a_scaled_update_is_bounded_and_keeps_its_direction() -> None:
    honest = np.array([[0.3, -0.4], [0.0, 0.0]], dtype=np.float32)  # norm 0.5
    boosted = 100.0 * honest

    bounded, clipped = bound_update(boosted, 1.0)

    assert clipped
    assert bounded.shape == (2, 2) and bounded.dtype == np.float64
    assert np.linalg.norm(bounded) <= 1.0
    assert np.isclose(np.linalg.norm(bounded), 1.0)
    assert np.allclose(bounded, 2.0 * honest)


def test_a_short_update_is_kept_as_a_copy() -> None:
    update = np.array([0.3, -0.4])

    bounded, clipped = bound_update(update, 1.0)

    assert not clipped
    np.testing.assert_array_equal(bounded, update)
    bounded[0] = 9.0
    assert update[0] == 0.3  # the caller's array is never modified


def test_the_zero_update_is_accepted() -> None:
    bounded, clipped = bound_update(np.zeros(5, dtype=np.float32), 1.0)

    assert not clipped
    np.testing.assert_array_equal(bounded, np.zeros(5))


def test_a_zero_bound_zeroes_every_update() -> None:
    assert bound_update(np.ones(3), 0.0)[1]
    np.testing.assert_array_equal(bound_update(np.ones(3), 0.0)[0], np.zeros(3))
    assert not bound_update(np.zeros(3), 0.0)[1]


@pytest.mark.parametrize("bound", [-1.0, float("nan"), float("inf"), True])
def test_a_bad_bound_is_refused(bound: float) -> None:
    with pytest.raises(ConfigError, match=r"^max_norm must be a finite number >= 0"):
        bound_update(np.ones(3), bound)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_update_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="NaN or infinite"):
        bound_update(np.array([1.0, bad]), 1.0)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        bound_update(np.array([1.0, bad]), 0.0)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        update_norm(np.array([bad]))


def test_the_median_bound_ignores_a_few_huge_norms() -> None:
    norms = [1.0, 1.2, 0.8, 1000.0, 5000.0]

    assert median_norm_bound(norms, 1.5) == pytest.approx(1.8)


@pytest.mark.parametrize(
    ("norms", "factor", "match"),
    [
        ([], 1.0, "at least one norm"),
        ([1.0, -1.0], 1.0, "finite numbers >= 0"),
        ([1.0, float("nan")], 1.0, "finite numbers >= 0"),
        ([1.0], 0.0, "median factor must be a finite number > 0"),
        ([1.0], float("inf"), "median factor must be a finite number > 0"),
        ([1.0], True, "median factor must be a finite number > 0"),
    ],
)
def test_a_bad_median_bound_is_refused(norms: list[float], factor: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        median_norm_bound(norms, factor)
