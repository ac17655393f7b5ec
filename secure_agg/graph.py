"""The SecAgg+ communication graph: a random Harary graph H(n, k).

Nodes are placed on a ring in a uniformly random order and each is joined to
the k/2 nodes on either side, so every node has exactly k neighbours and, for
any fixed node, its neighbour set is a uniformly random k-subset of the others
(Bell et al., CCS 2020, section 3). With k >= n - 1 the graph is complete: the
classic SecAgg of Bonawitz et al.
"""

from __future__ import annotations

from collections.abc import Sequence

from secure_agg.randomness import RandomSource

__all__ = ["harary_neighbours", "secure_shuffle"]


def secure_shuffle(items: Sequence[int], rng: RandomSource) -> list[int]:
    """Return a uniformly random permutation of ``items`` (Fisher-Yates, rejection sampling)."""
    result = list(items)
    for i in range(len(result) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            value = int.from_bytes(rng.random_bytes(8), "big")
            if value < limit:
                break
        j = value % bound
        result[i], result[j] = result[j], result[i]
    return result


def harary_neighbours(
    node_ids: Sequence[int], degree: int, rng: RandomSource
) -> dict[int, tuple[int, ...]]:
    """Return each node's sorted neighbours in a random Harary graph of the given degree.

    Parameters
    ----------
    node_ids
        The round's participants (distinct).
    degree
        k, the number of neighbours; even, or at least ``len(node_ids) - 1``
        (then every node neighbours every other).
    rng
        Source of the random ring order.
    """
    count = len(node_ids)
    if len(set(node_ids)) != count:
        raise ValueError("node ids must be distinct")
    if count < 2:
        raise ValueError("a graph needs at least two nodes")
    if degree >= count - 1:
        return {n: tuple(sorted(m for m in node_ids if m != n)) for n in node_ids}
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be even and >= 2 (or >= n - 1), got {degree}")
    ring = secure_shuffle(node_ids, rng)
    half = degree // 2
    return {
        node: tuple(
            sorted(ring[(position + offset) % count] for offset in range(-half, half + 1) if offset)
        )
        for position, node in enumerate(ring)
    }
