from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.partition import PartitionConfig, PartitionMode, partition


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=40, max_size=400),
    num_clients=st.integers(1, 20),
    mode=st.sampled_from([PartitionMode.IID, PartitionMode.DIRICHLET, PartitionMode.SHARDS]),
    alpha=st.floats(0.001, 50.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_example_lands_with_exactly_one_client(
    labels: list[int], num_clients: int, mode: PartitionMode, alpha: float, seed: int
) -> None:
    array = np.asarray(labels)
    parts = partition(
        array, PartitionConfig(num_clients=num_clients, mode=mode, alpha=alpha, seed=seed)
    )

    assert len(parts) == num_clients
    assert all(len(part) > 0 for part in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(array)))
