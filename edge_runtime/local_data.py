"""A device's own labelled examples on disk: the documented local format.

A device keeps its training data as ``.npz`` files (NumPy's zip of arrays) in
one directory, each with:

- ``images``: uint8, shape (N, 28, 28) — the model's input before scaling;
- ``labels``: integers in [0, 10), shape (N,).

Every file in the directory ending in ``.npz`` is a shard; shards are read in
name order and concatenated. The same format holds a server's held-out
evaluation set (one file). ``fedge sim samples --out FILE`` writes one from
Fashion-MNIST. Pickled objects are refused (``allow_pickle=False``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedge.errors import DataError

__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "load_examples"]

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
_MAX_SHARDS = 10_000


def _load_shard(path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"images", "labels"} - set(archive.files)
            if missing:
                raise DataError(f"{path} lacks the arrays {sorted(missing)} (needs images, labels)")
            images = archive["images"]
            labels = archive["labels"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path}: images must be uint8 of shape (N, 28, 28), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (images.shape[0],):
        raise DataError(f"{path}: labels must be {images.shape[0]} integers, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in [0, {NUM_CLASSES})")
    return images, labels.astype(np.int64)


def load_examples(source: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Return the images and labels of an ``.npz`` file or a directory of ``.npz`` shards.

    Raises
    ------
    DataError
        If the path is missing, holds no shard or no example, or a shard is
        truncated, pickled or of the wrong shape, type or label range.
    """
    if source.is_dir():
        shards = sorted(p for p in source.iterdir() if p.suffix == ".npz" and p.is_file())
        if not shards:
            raise DataError(f"{source} holds no .npz shard (see docs/deployment.md: local data)")
        if len(shards) > _MAX_SHARDS:
            raise DataError(f"{source} holds {len(shards)} shards; at most {_MAX_SHARDS}")
    elif source.is_file():
        shards = [source]
    else:
        raise DataError(f"no local data at {source} (a .npz file or a directory of them)")
    parts = [_load_shard(shard) for shard in shards]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(images) == 0:
        raise DataError(f"{source} holds no example")
    return images, labels
