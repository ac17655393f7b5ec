"""Read Fashion-MNIST from its IDX files, validating every header.

The files are the four IDX files published by Zalando Research, gzipped or not.
Debian ships them in the package ``dataset-fashion-mnist`` under
``/usr/share/datasets/fashion-mnist``; the directory can be overridden with an
argument or the ``FEDGE_DATA_DIR`` environment variable.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import DataError

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "NUM_CLASSES",
    "FashionMNIST",
    "Split",
    "load_fashion_mnist",
    "read_idx",
    "resolve_data_dir",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "FEDGE_DATA_DIR"
NUM_CLASSES = 10
IMAGE_SIDE = 28

HOW_TO_GET = (
    "Get Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu, installs to /usr/share/datasets/fashion-mnist), or download the "
    "four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
    "github.com/zalandoresearch/fashion-mnist (folder data/fashion) into a directory "
    f"and pass --data-dir DIR or set {DATA_DIR_ENV}=DIR."
)

# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the rank.
_UBYTE = 0x08


class _Kind(Enum):
    IMAGES = 3
    LABELS = 1


@dataclass(frozen=True, slots=True)
class Split:
    """One split of a data set: the inputs ``images`` (N, ...) and the ``labels`` (N,).

    The field name ``images`` is historical (Fashion-MNIST came first): for
    Fashion-MNIST it holds uint8 (N, 28, 28) images, for a tabular data set the
    float32 (N, F) feature matrix; :attr:`features` is the same array under a
    neutral name. ``labels`` are uint8 class indices.
    """

    images: npt.NDArray[Any]
    labels: npt.NDArray[np.uint8]

    @property
    def features(self) -> npt.NDArray[Any]:
        """The inputs, whatever their kind: the same array as ``images``."""
        return self.images

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, count: int) -> Split:
        """Return the first ``count`` examples (all of them when ``count`` is larger)."""
        return Split(images=self.images[:count], labels=self.labels[:count])


@dataclass(frozen=True, slots=True)
class FashionMNIST:
    """The training and test splits."""

    train: Split
    test: Split


def resolve_data_dir(explicit: Path | str | None = None) -> Path:
    """Return the data directory: ``explicit``, else ``$FEDGE_DATA_DIR``, else the default."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    from_env = os.environ.get(DATA_DIR_ENV, "")
    return Path(from_env) if from_env else DEFAULT_DATA_DIR


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}. {HOW_TO_GET}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}. The file is corrupt; {HOW_TO_GET}") from exc


def read_idx(path: Path, *, rank: int) -> npt.NDArray[np.uint8]:
    """Read one unsigned-byte IDX file of the given rank and check its header.

    Parameters
    ----------
    path
        The file, gzipped (``.gz``) or not.
    rank
        The number of dimensions the file must declare (3 for images, 1 for labels).

    Returns
    -------
    numpy.ndarray
        The payload as uint8 with the declared shape.

    Raises
    ------
    DataError
        If the file cannot be read, its magic number is wrong, or its payload is not
        exactly as long as its header declares.
    """
    raw = _read_bytes(path)
    header_len = 4 + 4 * rank
    if len(raw) < header_len:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its header")
    magic = raw[:4]
    expected_magic = bytes((0, 0, _UBYTE, rank))
    if magic != expected_magic:
        raise DataError(
            f"{path} has magic number 0x{magic.hex()}, expected 0x{expected_magic.hex()} "
            f"(unsigned bytes, rank {rank}): not a Fashion-MNIST IDX file"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected_len = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected_len:
        raise DataError(
            f"{path} is truncated or padded: its header declares {dims} "
            f"({expected_len} bytes) but it holds {payload} bytes. {HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _load_split(directory: Path, prefix: str) -> Split:
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, rank=_Kind.IMAGES.value)
    labels = read_idx(labels_path, rank=_Kind.LABELS.value)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{images_path} holds images of shape {images.shape[1:]}, "
            f"expected ({IMAGE_SIDE}, {IMAGE_SIDE})"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path} holds no images")
    if int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path} holds label {int(labels.max())}, expected 0..9")
    return Split(images=images, labels=labels)


def load_fashion_mnist(data_dir: Path | str | None = None) -> FashionMNIST:
    """Load and validate both splits of Fashion-MNIST.

    Parameters
    ----------
    data_dir
        The directory holding the IDX files; ``None`` resolves it with
        :func:`resolve_data_dir`.

    Returns
    -------
    FashionMNIST
        Read-only uint8 arrays.

    Raises
    ------
    DataError
        If the directory or a file is missing, truncated or corrupt; the message says
        how to get the data.
    """
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise DataError(f"Fashion-MNIST directory {directory} does not exist. {HOW_TO_GET}")
    return FashionMNIST(
        train=_load_split(directory, "train"),
        test=_load_split(directory, "t10k"),
    )
