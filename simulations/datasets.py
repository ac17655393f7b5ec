"""Data sets for simulations: a validated :class:`Dataset`, the loader interface, built-ins.

A scenario names its data set by a built-in name (``"fashion-mnist"``,
``"shuttle"``) or by import path (``"package.module:loader"``); either way the
name resolves to a :class:`DatasetLoader`, a callable that takes an optional
directory and returns a :class:`Dataset`. Every process (the server and each
simulation worker) resolves and loads the data set again from its name, so only
the name and the directory ever travel between processes; :func:`cached_dataset`
loads it once per process.

Examples
--------
Bring your own data: a module on the import path of the server and every worker,

>>> import numpy as np
>>> from simulations.data import Split
>>> from simulations.datasets import Dataset, InputEncoding
>>> def load_sensors(data_dir):
...     rng = np.random.default_rng(0)  # loaders are deterministic
...     features = rng.normal(size=(100, 4)).astype(np.float32)
...     labels = (features[:, 0] > 0).astype(np.uint8)
...     return Dataset(
...         name="sensors",
...         train=Split(images=features[:80], labels=labels[:80]),
...         test=Split(images=features[80:], labels=labels[80:]),
...         num_classes=2,
...         encoding=InputEncoding.FLOAT32,
...         feature_shape=(4,),
...         class_names=("normal", "fault"),
...     )
>>> load_sensors(None).train.features.shape
(80, 4)

and the scenario names it ``"my_package.sensors:load_sensors"``.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import numpy as np

from edge_runtime.model_spec import InputEncoding
from fedge.errors import ConfigError
from simulations.data import Split, load_fashion_mnist
from simulations.shuttle import load_shuttle

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_CLASSES",
    "Dataset",
    "DatasetLoader",
    "InputEncoding",
    "cached_dataset",
    "load_dataset",
    "resolve_loader",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}$")


@dataclass(frozen=True, slots=True)
class Dataset:
    """A labelled classification data set, checked on construction.

    Parameters
    ----------
    name
        A short name for logs and summaries (not necessarily the name it was loaded by).
    train
        The examples the clients are partitioned from; at least one.
    test
        The held-out examples of central evaluation (may be empty).
    num_classes
        Number of classes, at least 2; every label lies in ``[0, num_classes)``.
    encoding
        How the inputs become a model's tensor: ``UINT8_IMAGES`` needs uint8
        ``(N, H, W)`` images, ``FLOAT32`` float32 ``(N, ...)`` finite features.
    feature_shape
        The shape of one example (``(28, 28)`` for Fashion-MNIST, ``(9,)`` for Shuttle).
    class_names
        One non-empty, distinct name per class, in label order.

    Raises
    ------
    ConfigError
        If any of the above does not hold; the message names the data set and the split.

    Notes
    -----
    :class:`~simulations.data.Split` keeps its historical field name ``images``
    for the inputs of every kind; ``split.features`` is the same array.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    encoding: InputEncoding
    feature_shape: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a data set's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.encoding, InputEncoding):
            raise ConfigError(f"data set {self.name}: unknown input encoding {self.encoding!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigError(
                f"data set {self.name}: num_classes must be an int, got {self.num_classes!r}"
            )
        if self.num_classes < 2:
            raise ConfigError(
                f"data set {self.name}: num_classes must be >= 2, got {self.num_classes}"
            )
        self._check_feature_shape()
        self._check_class_names()
        for split_name, split in (("train", self.train), ("test", self.test)):
            self._check_split(split_name, split)
        if len(self.train) == 0:
            raise ConfigError(f"data set {self.name}: the train split is empty")

    def _check_feature_shape(self) -> None:
        shape = self.feature_shape
        if (
            not isinstance(shape, tuple)
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
        ):
            raise ConfigError(
                f"data set {self.name}: feature_shape must be a non-empty tuple of positive "
                f"ints, got {shape!r}"
            )
        if self.encoding is InputEncoding.UINT8_IMAGES and len(shape) != 2:
            raise ConfigError(
                f"data set {self.name}: uint8 images have feature_shape (H, W), got {shape}"
            )

    def _check_class_names(self) -> None:
        names = self.class_names
        if not isinstance(names, tuple) or any(not isinstance(n, str) or not n for n in names):
            raise ConfigError(
                f"data set {self.name}: class_names must be a tuple of non-empty strings, "
                f"got {names!r}"
            )
        if len(names) != self.num_classes:
            raise ConfigError(
                f"data set {self.name}: {len(names)} class names for {self.num_classes} classes"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"data set {self.name}: class names repeat: {names}")

    def _check_split(self, split_name: str, split: Split) -> None:
        where = f"data set {self.name}, {split_name} split"
        if not isinstance(split, Split):
            raise ConfigError(
                f"{where}: expected a simulations.data.Split, got {type(split).__name__}"
            )
        inputs, labels = split.images, split.labels
        if not isinstance(inputs, np.ndarray) or not isinstance(labels, np.ndarray):
            raise ConfigError(f"{where}: inputs and labels must be numpy arrays")
        if labels.ndim != 1:
            raise ConfigError(f"{where}: labels must have shape (N,), got {labels.shape}")
        if inputs.shape[:1] != labels.shape:
            raise ConfigError(
                f"{where}: {inputs.shape[0] if inputs.ndim else 0} examples but "
                f"{labels.shape[0]} labels"
            )
        if inputs.shape[1:] != self.feature_shape:
            raise ConfigError(
                f"{where}: examples of shape {inputs.shape[1:]}, expected {self.feature_shape}"
            )
        if self.encoding is InputEncoding.UINT8_IMAGES and inputs.dtype != np.uint8:
            raise ConfigError(f"{where}: uint8-images inputs must be uint8, got {inputs.dtype}")
        if self.encoding is InputEncoding.FLOAT32:
            if inputs.dtype != np.float32:
                raise ConfigError(f"{where}: float32 inputs must be float32, got {inputs.dtype}")
            if not bool(np.isfinite(inputs).all()):
                raise ConfigError(f"{where}: features hold NaN or infinite values")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(f"{where}: labels must be integers, got {labels.dtype}")
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ConfigError(
                f"{where}: labels span {int(labels.min())}..{int(labels.max())}, "
                f"expected 0..{self.num_classes - 1}"
            )


class DatasetLoader(Protocol):
    """Load a :class:`Dataset`: the interface to implement to bring your own data.

    A loader is any callable (a function, or an object with ``__call__``) taking
    the data directory, or ``None`` for the loader's own default (an environment
    variable, a system location). Name it in a scenario by import path,
    ``"package.module:callable"``; every process that needs the data imports and
    calls it again, so it must be importable there.

    Notes
    -----
    The rules a loader follows:

    - Deterministic: the same files give the same arrays in every process (a
      train/test split or a shuffle uses a fixed seed), or the clients'
      partitions would differ between workers.
    - Read-only: never write, download or cache to disk; raise
      :class:`fedge.errors.DataError` saying how to get missing files.
    - Preprocessing that uses statistics (standardisation, vocabularies) takes
      them from the train split only.

    Examples
    --------
    See the module's docstring and ``docs/datasets.md``.
    """

    def __call__(self, data_dir: Path | None) -> Dataset:
        """Return the data set, reading its files from ``data_dir`` (``None``: the default).

        Parameters
        ----------
        data_dir
            The directory holding the files, or ``None``.

        Returns
        -------
        Dataset
            The validated data set.

        Raises
        ------
        DataError
            If the files are missing or corrupt.
        """
        ...


def _fashion_mnist(data_dir: Path | None) -> Dataset:
    data = load_fashion_mnist(data_dir)
    return Dataset(
        name="fashion-mnist",
        train=data.train,
        test=data.test,
        num_classes=len(FASHION_MNIST_CLASSES),
        encoding=InputEncoding.UINT8_IMAGES,
        feature_shape=(28, 28),
        class_names=FASHION_MNIST_CLASSES,
    )


def _shuttle(data_dir: Path | None) -> Dataset:
    data = load_shuttle(data_dir)
    return Dataset(
        name="shuttle",
        train=data.train,
        test=data.test,
        num_classes=len(data.class_names),
        encoding=InputEncoding.FLOAT32,
        feature_shape=(data.train.images.shape[1],),
        class_names=data.class_names,
    )


BUILTIN_DATASETS: Mapping[str, DatasetLoader] = MappingProxyType(
    {
        "fashion-mnist": _fashion_mnist,
        "shuttle": _shuttle,
    }
)
"""The built-in data sets by name (a registry, not an if-chain)."""


def _builtin_list() -> str:
    return ", ".join(sorted(BUILTIN_DATASETS))


def resolve_loader(name: str) -> DatasetLoader:
    """Return the loader a built-in name or a ``"package.module:callable"`` path names.

    Parameters
    ----------
    name
        A key of :data:`BUILTIN_DATASETS`, or an import path.

    Returns
    -------
    DatasetLoader
        The callable; it is not called.

    Raises
    ------
    ConfigError
        If the name is neither a built-in nor an import path, the module cannot be
        imported, or it has no such callable.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a data set is named by a string, got {type(name).__name__}")
    builtin = BUILTIN_DATASETS.get(name)
    if builtin is not None:
        return builtin
    if not _IMPORT_PATH.match(name):
        raise ConfigError(
            f"unknown data set {name!r}: use a built-in ({_builtin_list()}) "
            "or an import path 'package.module:loader'"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"data set {name!r}: cannot import its module {module_name!r}: {exc}"
        ) from exc
    loader: Callable[[Path | None], object] | None = getattr(module, attribute, None)
    if loader is None or not callable(loader):
        raise ConfigError(f"data set {name!r}: {module_name} has no callable {attribute!r}")
    return loader  # type: ignore[return-value]


def load_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Resolve ``name``, call its loader on ``data_dir`` and check what it returns.

    Parameters
    ----------
    name
        A built-in name or ``"package.module:callable"``.
    data_dir
        The directory handed to the loader; ``None`` or ``""`` for its default.

    Returns
    -------
    Dataset
        Freshly loaded; see :func:`cached_dataset` for the per-process cache.

    Raises
    ------
    ConfigError
        If the name does not resolve or the loader returns something else than a
        :class:`Dataset`.
    DataError
        If the loader cannot find or read its files.
    """
    loader = resolve_loader(name)
    directory = Path(data_dir) if data_dir is not None and str(data_dir) != "" else None
    dataset: object = loader(directory)
    if not isinstance(dataset, Dataset):
        raise ConfigError(
            f"data set {name!r}: the loader returned {type(dataset).__name__}, "
            "not a simulations.datasets.Dataset"
        )
    return dataset


@functools.lru_cache(maxsize=4)
def _cached(name: str, data_dir: str | None) -> Dataset:
    dataset = load_dataset(name, data_dir)
    # The cached arrays are shared by every client a worker hosts: freeze them so
    # one client's in-place change cannot leak into another's data.
    for split in (dataset.train, dataset.test):
        split.images.setflags(write=False)
        split.labels.setflags(write=False)
    return dataset


def cached_dataset(name: str, data_dir: Path | str | None = None) -> Dataset:
    """Return :func:`load_dataset`'s result, loading it once per process.

    The arrays of a cached data set are made read-only. Arguments are plain
    strings so whatever holds them (a partition provider shipped to Ray
    workers) pickles cheaply and each worker reloads by name.

    Parameters
    ----------
    name
        A built-in name or ``"package.module:callable"``.
    data_dir
        The directory handed to the loader; ``None`` or ``""`` for its default.

    Returns
    -------
    Dataset
        The same object for the same arguments within a process.

    Raises
    ------
    ConfigError
        As :func:`load_dataset`.
    DataError
        As :func:`load_dataset`.
    """
    directory = str(data_dir) if data_dir is not None and str(data_dir) != "" else None
    return _cached(name, directory)
