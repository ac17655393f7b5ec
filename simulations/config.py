"""The typed configuration of ``fedge sim run``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError
from fl_client.models import ModelName
from fl_client.training import TrainConfig
from simulations.partition import PartitionConfig, PartitionMode

__all__ = ["SimConfig", "default_parallelism"]


def default_parallelism() -> int:
    """Return the CPU cores this process may use (the simulation runs one client per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Everything one simulated federation needs.

    Parameters
    ----------
    num_clients
        Simulated clients (Flower SuperNodes), >= 1.
    num_rounds
        FedAvg rounds, >= 1.
    seed
        Seeds the partitioning, the initial model and the local shuffling.
    partition
        How the training set is split across clients.
    alpha
        Dirichlet concentration for ``partition=DIRICHLET``.
    fraction_train
        Fraction of clients sampled per round, in (0, 1].
    train
        Local training hyper-parameters.
    model
        The architecture.
    data_dir
        Where the Fashion-MNIST IDX files lie; ``None`` uses the default lookup.
    train_examples, test_examples
        Use only the first N examples of each split (``None``: all).
    parallelism
        Clients trained at once (Ray CPUs), >= 1.
    """

    num_clients: int = 10
    num_rounds: int = 5
    seed: int = 0
    partition: PartitionMode = PartitionMode.DIRICHLET
    alpha: float = 0.5
    fraction_train: float = 1.0
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelName = ModelName.CNN
    data_dir: Path | None = None
    train_examples: int | None = None
    test_examples: int | None = None
    parallelism: int = field(default_factory=default_parallelism)

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.num_rounds}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.parallelism < 1:
            raise ConfigError(f"parallelism must be >= 1, got {self.parallelism}")
        # Validates num_clients, alpha and seed with the partitioner's own checks.
        self.partition_config()

    def partition_config(self) -> PartitionConfig:
        """Return the partitioning this configuration asks for."""
        return PartitionConfig(
            num_clients=self.num_clients, mode=self.partition, alpha=self.alpha, seed=self.seed
        )

    def to_json(self) -> dict[str, Any]:
        """Return the configuration as JSON-ready values (enums by value, paths as strings)."""
        raw = asdict(self)
        raw["partition"] = self.partition.value
        raw["model"] = self.model.value
        raw["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        return raw
