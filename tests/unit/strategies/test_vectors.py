"""The one model <-> flat vector conversion: exact round trips, dtypes kept, bad shapes refused."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from fedge.errors import ConfigError
from strategies import vectors

MODEL: dict[str, npt.NDArray[np.generic]] = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([0.5, -1.0], dtype=np.float64),
}


def test_flatten_and_unflatten_round_trip_in_key_order_with_dtypes() -> None:
    flat = vectors.flatten(MODEL)
    assert flat.dtype == np.float64 and flat.tolist() == [0, 1, 2, 3, 4, 5, 0.5, -1.0]
    back = vectors.unflatten(MODEL, flat)
    assert list(back) == ["w", "b"]
    assert back["w"].dtype == np.float32 and np.array_equal(back["w"], MODEL["w"])


def test_difference_then_apply_gives_the_trained_model() -> None:
    trained: dict[str, npt.NDArray[np.generic]] = {
        k: np.asarray(np.add(v, 1.5), dtype=v.dtype) for k, v in MODEL.items()
    }
    update = vectors.difference(MODEL, trained)
    assert np.allclose(update, 1.5)
    applied = vectors.apply(MODEL, update)
    assert all(np.array_equal(applied[k], trained[k]) for k in MODEL)
    assert applied["w"].dtype == np.float32


@pytest.mark.parametrize(
    ("trained", "match"),
    [
        ({"b": MODEL["b"], "w": MODEL["w"]}, "arrays differ"),
        ({"w": MODEL["w"].reshape(3, 2), "b": MODEL["b"]}, "changed shape"),
    ],
)
def test_difference_refuses_other_layouts(
    trained: dict[str, npt.NDArray[np.generic]], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        vectors.difference(MODEL, trained)


@pytest.mark.parametrize("length", [7, 9])
def test_a_vector_of_the_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ConfigError, match="values, the model 8"):
        vectors.unflatten(MODEL, np.zeros(length))
    with pytest.raises(ConfigError, match="values, the model 8"):
        vectors.apply(MODEL, np.zeros(length))
