"""A client's update as one flat float64 vector: trained weights minus the global ones, and back."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from fedge.errors import ConfigError

__all__ = ["apply_update", "flat_update"]


def flat_update(sent: ArrayRecord, trained: ArrayRecord) -> npt.NDArray[np.float64]:
    """Return ``trained - sent`` flattened in the records' key order.

    Raises
    ------
    ConfigError
        If the two records do not hold the same arrays in the same shapes.
    """
    keys = list(sent.keys())
    if list(trained.keys()) != keys:
        raise ConfigError("the trained model's arrays differ from the global model's")
    for key in keys:
        if tuple(sent[key].shape) != tuple(trained[key].shape):
            raise ConfigError(f"array {key!r} changed shape during training")
    sizes = [int(np.prod(sent[key].shape)) for key in keys]
    update = np.empty(sum(sizes), dtype=np.float64)
    offset = 0
    for key, size in zip(keys, sizes, strict=True):
        # One pass per array, computed in float64 straight into the flat update.
        np.subtract(
            trained[key].numpy().reshape(-1),
            sent[key].numpy().reshape(-1),
            out=update[offset : offset + size],
            dtype=np.float64,
        )
        offset += size
    return update


def apply_update(sent: ArrayRecord, update: npt.NDArray[np.floating]) -> ArrayRecord:
    """Return ``sent + update`` as a record of ``sent``'s keys, shapes and dtypes.

    Raises
    ------
    ConfigError
        If the update's length differs from the model's.
    """
    flat = np.asarray(update).reshape(-1)
    keys = list(sent.keys())
    total = sum(int(np.prod(sent[key].shape)) for key in keys)
    if flat.shape[0] != total:
        raise ConfigError(f"the update has {flat.shape[0]} values, the model {total}")
    out: dict[str, Array] = {}
    offset = 0
    for key in keys:
        current = sent[key].numpy()
        size = current.size
        step = flat[offset : offset + size].reshape(current.shape)
        out[key] = Array(np.asarray(current + step, dtype=current.dtype))
        offset += size
    return ArrayRecord(out)
