"""Give each simulated client its partition of a data set, loading the data once per process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from simulations.datasets import Dataset
from simulations.datasets import cached_dataset as _load
from simulations.partition import IndexArray, PartitionConfig, partition

__all__ = ["FASHION_MNIST", "DatasetPartitions", "cached_dataset", "training_data"]

FASHION_MNIST = "fashion-mnist"


@functools.lru_cache(maxsize=4)
def training_data(dataset: str, data_dir: str | None, train_examples: int | None) -> Dataset:
    """Load ``dataset`` once per process, keeping the first ``train_examples`` (all: None)."""
    data = _load(dataset, data_dir)
    if train_examples is None:
        return data
    return Dataset(
        name=data.name,
        train=data.train.take(train_examples),
        test=data.test,
        num_classes=data.num_classes,
        encoding=data.encoding,
        feature_shape=data.feature_shape,
        class_names=data.class_names,
    )


def cached_dataset(data_dir: str | None, train_examples: int | None) -> Dataset:
    """Load Fashion-MNIST once per process (see :func:`training_data`)."""
    return training_data(FASHION_MNIST, data_dir, train_examples)


@functools.lru_cache(maxsize=4)
def _partitions(
    dataset: str, data_dir: str | None, train_examples: int | None, config: PartitionConfig
) -> tuple[IndexArray, ...]:
    labels = training_data(dataset, data_dir, train_examples).train.labels
    return tuple(partition(labels, config))


@dataclass(frozen=True, slots=True)
class DatasetPartitions:
    """A picklable :class:`fl_client.PartitionProvider` over a data set's training split.

    Each worker process loads the data set (by name) and computes the
    deterministic partitioning once, then serves every client it hosts from memory.
    """

    dataset: str
    data_dir: str | None
    train_examples: int | None
    config: PartitionConfig

    def partitions(self) -> tuple[IndexArray, ...]:
        """Return every client's example indices."""
        return _partitions(self.dataset, self.data_dir, self.train_examples, self.config)

    def __call__(
        self, partition_id: int, num_partitions: int
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.integer]]:
        """Return client ``partition_id``'s examples and labels."""
        if num_partitions != self.config.num_clients:
            raise ConfigError(
                f"the federation has {num_partitions} nodes but the data is split "
                f"{self.config.num_clients} ways"
            )
        indices = self.partitions()[partition_id]
        train = training_data(self.dataset, self.data_dir, self.train_examples).train
        return train.images[indices], train.labels[indices]
