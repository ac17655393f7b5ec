"""A client's update read straight from Flower's Arrays: the same values as ``Array.numpy()``."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedge.errors import ConfigError
from fl_client.updates import array_view, flat_update


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array(2.5, dtype=np.float16),
        np.zeros(0, dtype=np.int64),
        np.arange(5, dtype=">i4"),
    ],
    ids=["c-order", "fortran-order", "scalar", "empty", "big-endian"],
)
def test_a_view_holds_what_numpy_would_copy(values: np.ndarray) -> None:
    array = Array(values)

    view = array_view(array)

    copied = array.numpy()
    assert view.dtype == copied.dtype and view.shape == copied.shape
    np.testing.assert_array_equal(view, copied)
    # A view of the message's bytes: nothing can write through it.
    assert not view.flags.writeable


def _raw(data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype="float32", shape=(4,), stype=stype, data=data)


def _npy(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, values, allow_pickle=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (_raw(b"not an npy file"), "a damaged array"),
        (_raw(_npy(np.zeros(4, np.float32))[:-4]), "a damaged array"),
        (_raw(_npy(np.array([object()], dtype=object))), "object arrays are refused"),
        (_raw(_npy(np.zeros(4, np.float32)), stype="torch.Tensor"), "unsupported array"),
    ],
    ids=["garbage", "truncated", "object-dtype", "other-serialisation"],
)
def test_a_damaged_array_is_one_clear_error(array: Array, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        array_view(array)


def test_the_update_is_trained_minus_sent_in_float64() -> None:
    sent = ArrayRecord(
        {"a": Array(np.full((2, 2), 0.1, np.float32)), "b": Array(np.zeros(3, np.float32))}
    )
    trained = ArrayRecord(
        {"a": Array(np.full((2, 2), 0.3, np.float32)), "b": Array(np.arange(3, dtype=np.float32))}
    )

    update = flat_update(sent, trained)

    expected = np.concatenate(
        [
            (np.float32(0.3).astype(np.float64) - np.float32(0.1).astype(np.float64)) * np.ones(4),
            np.arange(3.0),
        ]
    )
    assert update.dtype == np.float64
    np.testing.assert_array_equal(update, expected)
    with pytest.raises(ConfigError, match="changed shape"):
        flat_update(sent, ArrayRecord({"a": Array(np.zeros(4, np.float32)), "b": trained["b"]}))
