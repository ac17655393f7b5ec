"""A client's update as one flat float64 vector, on Flower's ArrayRecords (strategies.vectors)."""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from fedge.errors import ConfigError
from strategies import vectors

__all__ = ["apply_update", "array_view", "as_arrays", "flat_update"]

_NUMPY_STYPE = "numpy.ndarray"
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def array_view(array: Array) -> npt.NDArray[np.generic]:
    """Return a read-only view of a NumPy-serialised Array's values, without copying them.

    ``Array.numpy()`` copies the whole payload out of the message (a million
    values: 4 MB, about a millisecond); an update needs only to read it.

    Raises
    ------
    ConfigError
        If the array is not a NumPy array's bytes (another serialisation, a
        damaged header, an object dtype, or fewer bytes than its shape needs).
    """
    if array.stype != _NUMPY_STYPE:
        raise ConfigError(f"unsupported array serialisation {array.stype!r}")
    data = array.data
    stream = BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        # Parsed with ast.literal_eval, never unpickled.
        shape, fortran_order, dtype = reader(stream)
        if dtype.hasobject:
            raise ValueError("object arrays are refused")
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    except ValueError as exc:
        raise ConfigError(f"a damaged array: {exc}") from None
    return flat.reshape(shape, order="F" if fortran_order else "C")


def as_arrays(record: ArrayRecord) -> dict[str, npt.NDArray[np.generic]]:
    """Return the record's arrays by name, in its order."""
    return {key: record[key].numpy() for key in record}


def flat_update(sent: ArrayRecord, trained: ArrayRecord) -> npt.NDArray[np.float64]:
    """Return ``trained - sent`` flattened in the records' key order.

    Raises
    ------
    ConfigError
        If the two records do not hold the same arrays in the same shapes.
    """
    return vectors.difference(
        {key: array_view(sent[key]) for key in sent},
        {key: array_view(trained[key]) for key in trained},
    )


def apply_update(sent: ArrayRecord, update: npt.NDArray[np.floating]) -> ArrayRecord:
    """Return ``sent + update`` as a record of ``sent``'s keys, shapes and dtypes.

    Raises
    ------
    ConfigError
        If the update's length differs from the model's.
    """
    applied = vectors.apply(as_arrays(sent), update)
    return ArrayRecord({key: Array(value) for key, value in applied.items()})
