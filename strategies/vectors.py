"""A model as one flat vector, and back: the one conversion both Flower sides use.

Clipping, DP noise, quantisation and masking all work on one float64 vector
holding every array of the model in key order; the client makes its update
with :func:`difference`, the server applies an aggregate with :func:`apply`.
These work on ordered ``name -> array`` mappings; ``fl_client.updates`` and
``fl_server._dp_records`` adapt Flower's ArrayRecord to them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError

__all__ = ["apply", "difference", "flatten", "unflatten"]

Arrays = Mapping[str, npt.NDArray[np.generic]]


def flatten(arrays: Arrays) -> npt.NDArray[np.float64]:
    """Return every array in key order as one float64 vector."""
    if not arrays:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays.values()]).astype(np.float64)


def difference(sent: Arrays, trained: Arrays) -> npt.NDArray[np.float64]:
    """Return ``trained - sent`` flattened in key order (computed in float64).

    Raises
    ------
    ConfigError
        If the two do not hold the same arrays in the same order and shapes.
    """
    keys = list(sent)
    if list(trained) != keys:
        raise ConfigError("the trained model's arrays differ from the global model's")
    for key in keys:
        if np.shape(sent[key]) != np.shape(trained[key]):
            raise ConfigError(f"array {key!r} changed shape during training")
    sizes = [int(np.size(sent[key])) for key in keys]
    update = np.empty(sum(sizes), dtype=np.float64)
    offset = 0
    for key, size in zip(keys, sizes, strict=True):
        # One pass per array, straight into the flat update.
        np.subtract(
            np.asarray(trained[key]).reshape(-1),
            np.asarray(sent[key]).reshape(-1),
            out=update[offset : offset + size],
            dtype=np.float64,
        )
        offset += size
    return update


def unflatten(template: Arrays, vector: npt.ArrayLike) -> dict[str, npt.NDArray[np.generic]]:
    """Return ``vector`` cut into ``template``'s keys, shapes and dtypes.

    Raises
    ------
    ConfigError
        If the vector's length differs from the template's size.
    """
    flat = np.asarray(vector).reshape(-1)
    total = sum(int(np.size(a)) for a in template.values())
    if flat.shape[0] != total:
        raise ConfigError(f"the vector has {flat.shape[0]} values, the model {total}")
    out: dict[str, npt.NDArray[np.generic]] = {}
    offset = 0
    for key, current in template.items():
        size = int(np.size(current))
        part = flat[offset : offset + size].reshape(np.shape(current))
        out[key] = np.asarray(part, dtype=np.asarray(current).dtype)
        offset += size
    return out


def apply(sent: Arrays, update: npt.ArrayLike) -> dict[str, npt.NDArray[np.generic]]:
    """Return ``sent + update`` in ``sent``'s keys, shapes and dtypes.

    Raises
    ------
    ConfigError
        If the update's length differs from the model's.
    """
    flat = np.asarray(update, dtype=np.float64).reshape(-1)
    total = sum(int(np.size(a)) for a in sent.values())
    if flat.shape[0] != total:
        raise ConfigError(f"the update has {flat.shape[0]} values, the model {total}")
    out: dict[str, npt.NDArray[np.generic]] = {}
    offset = 0
    for key, current in sent.items():
        base = np.asarray(current)
        step = flat[offset : offset + base.size].reshape(base.shape)
        out[key] = np.asarray(np.add(base, step), dtype=base.dtype)
        offset += base.size
    return out
