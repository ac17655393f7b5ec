"""Give each simulated client its Fashion-MNIST partition, loading the data once per process."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from simulations.data import FashionMNIST, load_fashion_mnist
from simulations.partition import IndexArray, PartitionConfig, partition

__all__ = ["FashionMnistPartitions", "cached_dataset"]


@functools.lru_cache(maxsize=2)
def cached_dataset(data_dir: str | None, train_examples: int | None) -> FashionMNIST:
    """Load Fashion-MNIST once per process, keeping the first ``train_examples`` (all: None)."""
    data = load_fashion_mnist(data_dir)
    if train_examples is None:
        return data
    return FashionMNIST(train=data.train.take(train_examples), test=data.test)


@functools.lru_cache(maxsize=4)
def _partitions(
    data_dir: str | None, train_examples: int | None, config: PartitionConfig
) -> tuple[IndexArray, ...]:
    return tuple(partition(cached_dataset(data_dir, train_examples).train.labels, config))


@dataclass(frozen=True, slots=True)
class FashionMnistPartitions:
    """A picklable :class:`fl_client.PartitionProvider` over Fashion-MNIST's training split.

    Each worker process loads the IDX files and computes the (deterministic)
    partitioning once, then serves every client it hosts from memory.
    """

    data_dir: str | None
    train_examples: int | None
    config: PartitionConfig

    def partitions(self) -> tuple[IndexArray, ...]:
        """Return every client's example indices."""
        return _partitions(self.data_dir, self.train_examples, self.config)

    def __call__(
        self, partition_id: int, num_partitions: int
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.integer]]:
        """Return client ``partition_id``'s images and labels."""
        if num_partitions != self.config.num_clients:
            raise ConfigError(
                f"the federation has {num_partitions} nodes but the data is split "
                f"{self.config.num_clients} ways"
            )
        indices = self.partitions()[partition_id]
        train = cached_dataset(self.data_dir, self.train_examples).train
        return train.images[indices], train.labels[indices]
