"""A client's update as one flat float64 vector, on Flower's ArrayRecords (strategies.vectors)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from strategies import vectors

__all__ = ["apply_update", "as_arrays", "flat_update"]


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
    return vectors.difference(as_arrays(sent), as_arrays(trained))


def apply_update(sent: ArrayRecord, update: npt.NDArray[np.floating]) -> ArrayRecord:
    """Return ``sent + update`` as a record of ``sent``'s keys, shapes and dtypes.

    Raises
    ------
    ConfigError
        If the update's length differs from the model's.
    """
    applied = vectors.apply(as_arrays(sent), update)
    return ArrayRecord({key: Array(value) for key, value in applied.items()})
