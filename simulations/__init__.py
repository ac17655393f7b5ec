"""Runnable scenarios on Flower's simulation engine; data loading and partitioning."""

from simulations.data import FashionMNIST, Split, load_fashion_mnist
from simulations.partition import PartitionConfig, PartitionMode, label_skew, partition

__all__ = [
    "FashionMNIST",
    "PartitionConfig",
    "PartitionMode",
    "Split",
    "label_skew",
    "load_fashion_mnist",
    "partition",
]
