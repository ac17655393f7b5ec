"""Split a labelled data set across simulated clients: IID, Dirichlet label skew, shards.

Every partitioner is deterministic under its seed and returns one sorted index
array per client; the arrays are disjoint and cover the data set.

Notes
-----
Partitioning is bookkeeping, not a privacy mechanism, so numpy's PCG64
``Generator`` is the right tool here; keys, masks and DP noise never come from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError

__all__ = [
    "PartitionConfig",
    "PartitionMode",
    "label_skew",
    "partition",
]

IndexArray = npt.NDArray[np.int64]

# Dirichlet draws are resampled until every client holds an example (an empty
# client would make FedAvg's weights meaningless); after this many tries the
# least-empty draw is repaired instead.
_MAX_DIRICHLET_TRIES = 100


class PartitionMode(Enum):
    """How examples are assigned to clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionConfig:
    """How to partition: the mode, its parameter and the seed.

    Parameters
    ----------
    num_clients
        Number of partitions, at least 1.
    mode
        :class:`PartitionMode`.
    alpha
        Dirichlet concentration (``mode=DIRICHLET``); smaller means more skew. > 0.
    shards_per_client
        Label-sorted shards given to each client (``mode=SHARDS``). >= 1.
    seed
        Seed of the partitioning generator.
    """

    num_clients: int
    mode: PartitionMode = PartitionMode.DIRICHLET
    alpha: float = 0.5
    shards_per_client: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.shards_per_client < 1:
            raise ConfigError(f"shards_per_client must be >= 1, got {self.shards_per_client}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


def partition(labels: npt.NDArray[np.integer], config: PartitionConfig) -> list[IndexArray]:
    """Return one sorted array of example indices per client.

    Parameters
    ----------
    labels
        Integer class labels, one per example.
    config
        The partitioning to apply.

    Returns
    -------
    list of numpy.ndarray
        ``config.num_clients`` disjoint int64 arrays whose union is every index.

    Raises
    ------
    ConfigError
        If there are fewer examples than clients (or than shards).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {labels.shape}")
    num_examples = int(labels.shape[0])
    if num_examples < config.num_clients:
        raise ConfigError(
            f"cannot split {num_examples} examples across {config.num_clients} clients: "
            "more clients than examples"
        )
    rng = np.random.default_rng(config.seed)
    if config.mode is PartitionMode.IID:
        parts = _iid(num_examples, config.num_clients, rng)
    elif config.mode is PartitionMode.DIRICHLET:
        parts = _dirichlet(labels, config.num_clients, config.alpha, rng)
    else:
        parts = _shards(labels, config.num_clients, config.shards_per_client, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def _iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[IndexArray]:
    order = rng.permutation(num_examples)
    return [np.asarray(part, dtype=np.int64) for part in np.array_split(order, num_clients)]


def _dirichlet(
    labels: npt.NDArray[np.integer], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[IndexArray]:
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    best: list[IndexArray] = []
    for _ in range(_MAX_DIRICHLET_TRIES):
        buckets: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                buckets[client].append(chunk)
        parts = [np.concatenate(chunks).astype(np.int64) for chunks in buckets]
        if min(len(p) for p in parts) > 0:
            return parts
        if not best or _empty_count(parts) < _empty_count(best):
            best = parts
    return _fill_empty(best)


def _empty_count(parts: list[IndexArray]) -> int:
    return sum(1 for p in parts if len(p) == 0)


def _fill_empty(parts: list[IndexArray]) -> list[IndexArray]:
    # Reached only for tiny data, many clients and a very small alpha. Each empty
    # client takes one example from the largest client: the split stays a
    # partition and keeps as much of the drawn skew as possible. The caller has
    # checked there are at least as many examples as clients, so the largest
    # client always has an example to spare.
    parts = list(parts)
    for client, part in enumerate(parts):
        if len(part) == 0:
            donor = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[client] = parts[donor][-1:]
            parts[donor] = parts[donor][:-1]
    return parts


def _shards(
    labels: npt.NDArray[np.integer],
    num_clients: int,
    shards_per_client: int,
    rng: np.random.Generator,
) -> list[IndexArray]:
    num_shards = num_clients * shards_per_client
    if labels.shape[0] < num_shards:
        raise ConfigError(
            f"cannot cut {labels.shape[0]} examples into {num_shards} shards "
            f"({num_clients} clients x {shards_per_client} shards)"
        )
    # A stable sort by label, ties broken by a random permutation, so shards are
    # label-pure but which examples land in them depends on the seed.
    shuffled = rng.permutation(labels.shape[0])
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]).astype(np.int64) for row in assignment]


def label_skew(labels: npt.NDArray[np.integer], parts: list[IndexArray]) -> float:
    """Return the mean total-variation distance between client and global label mixes.

    0 means every client sees the global label distribution; 1 means clients see
    label sets disjoint from the global mix (impossible in practice).
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    global_mix = np.bincount(labels, minlength=num_classes) / labels.shape[0]
    distances = []
    for part in parts:
        if part.shape[0] == 0:
            continue
        mix = np.bincount(labels[part], minlength=num_classes) / part.shape[0]
        distances.append(0.5 * float(np.abs(mix - global_mix).sum()))
    return float(np.mean(distances))
