from __future__ import annotations

import numpy as np
import pytest

from fedge.errors import ConfigError
from simulations.partition import PartitionConfig, PartitionMode, label_skew, partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 100 per class


@pytest.mark.parametrize("mode", list(PartitionMode))
def test_partitions_are_disjoint_and_cover_every_example(mode: PartitionMode) -> None:
    parts = partition(LABELS, PartitionConfig(num_clients=7, mode=mode, seed=1))

    assert len(parts) == 7
    assert sum(len(p) for p in parts) == len(LABELS)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("mode", list(PartitionMode))
def test_same_seed_same_partition_other_seed_other_partition(mode: PartitionMode) -> None:
    first = partition(LABELS, PartitionConfig(num_clients=5, mode=mode, seed=4))
    again = partition(LABELS, PartitionConfig(num_clients=5, mode=mode, seed=4))
    other = partition(LABELS, PartitionConfig(num_clients=5, mode=mode, seed=5))

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [
        len(p) for p in partition(LABELS, PartitionConfig(num_clients=7, mode=PartitionMode.IID))
    ]

    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 2000)

    def skew(mode: PartitionMode, alpha: float) -> float:
        config = PartitionConfig(num_clients=10, mode=mode, alpha=alpha, seed=0)
        return label_skew(labels, partition(labels, config))

    iid = skew(PartitionMode.IID, 1.0)
    mild = skew(PartitionMode.DIRICHLET, 100.0)
    strong = skew(PartitionMode.DIRICHLET, 0.1)

    assert iid < 0.05
    assert mild < 0.1
    assert strong > 0.5
    assert strong > 4 * mild


def test_shards_give_each_client_at_most_its_shard_count_of_labels() -> None:
    config = PartitionConfig(num_clients=10, mode=PartitionMode.SHARDS, shards_per_client=2)
    parts = partition(LABELS, config)

    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    assert label_skew(LABELS, parts) > 0.7


def test_label_skew_is_zero_for_identical_mixes() -> None:
    parts = [np.arange(0, 1000, 2), np.arange(1, 1000, 2)]

    assert label_skew(LABELS, parts) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, r"num_clients must be >= 1, got 0"),
        ({"num_clients": 2, "alpha": 0.0}, r"alpha must be > 0, got 0.0"),
        ({"num_clients": 2, "alpha": -1.0}, r"alpha must be > 0, got -1.0"),
        ({"num_clients": 2, "shards_per_client": 0}, r"shards_per_client must be >= 1"),
        ({"num_clients": 2, "seed": -3}, r"seed must be >= 0, got -3"),
    ],
)
def test_impossible_configs_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PartitionConfig(**kwargs)  # type: ignore[arg-type]


def test_more_clients_than_examples_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot split 1000 examples across 1001 clients"):
        partition(LABELS, PartitionConfig(num_clients=1001))


def test_too_many_shards_are_refused() -> None:
    config = PartitionConfig(num_clients=600, mode=PartitionMode.SHARDS, shards_per_client=2)

    with pytest.raises(ConfigError, match="cannot cut 1000 examples into 1200 shards"):
        partition(LABELS, config)


def test_labels_must_be_one_dimensional() -> None:
    with pytest.raises(ConfigError, match="one-dimensional"):
        partition(LABELS.reshape(10, 100), PartitionConfig(num_clients=2))


def test_dirichlet_gives_every_client_an_example_even_when_draws_leave_some_empty() -> None:
    labels = np.repeat(np.arange(10), 2)  # 20 examples for 20 clients
    config = PartitionConfig(num_clients=20, mode=PartitionMode.DIRICHLET, alpha=0.01, seed=3)

    parts = partition(labels, config)

    assert sorted(len(p) for p in parts) == [1] * 20
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(20))
