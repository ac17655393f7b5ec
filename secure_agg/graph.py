"""Who holds whose shares: every client draws its own holders, so no server can bias the graph.

In SecAgg+ (Bell et al., CCS 2020) a client's security rests on how many of the
clients holding its shares collude with the server. With a graph the server
draws (or derives from values the server and colluding clients can re-draw
until it suits them, such as a hash over advertisements they sign), an active
server can surround a victim with corrupt holders. Here each client draws its k
holders itself, uniformly from the round's other participants, with its own
CSPRNG (a "random k-out graph"): the count of corrupt holders of an honest
client is hypergeometric whatever the server does, which is what
:func:`secure_agg.params.required_threshold` assumes.

Two clients are *neighbours* (they mask their updates with each other) when
either drew the other; a client sends shares only to the holders it drew.
With k >= n - 1 every client holds every other's shares: the classic SecAgg of
Bonawitz et al.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from secure_agg.randomness import RandomSource

__all__ = ["choose_holders", "neighbours_of", "secure_shuffle"]


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


def choose_holders(
    participants: Sequence[int], node: int, degree: int, rng: RandomSource
) -> tuple[int, ...]:
    """Return ``degree`` holders drawn uniformly from the participants other than ``node``, sorted.

    Raises
    ------
    ValueError
        If ``node`` is not a participant or fewer than ``degree`` others exist.
    """
    others = [p for p in participants if p != node]
    if len(others) != len(participants) - 1:
        raise ValueError("the node must be exactly one of the participants")
    if not 1 <= degree <= len(others):
        raise ValueError(f"degree must be in [1, {len(others)}], got {degree}")
    if degree == len(others):
        return tuple(sorted(others))
    return tuple(sorted(secure_shuffle(others, rng)[:degree]))


def neighbours_of(
    holders: Mapping[int, Iterable[int]], live: Iterable[int]
) -> dict[int, tuple[int, ...]]:
    """Return each live node's live neighbours: the holders it drew and those that drew it."""
    alive = set(live)
    out: dict[int, set[int]] = {node: set() for node in alive}
    for node in alive:
        for holder in holders[node]:
            if holder in alive and holder != node:
                out[node].add(holder)
                out[holder].add(node)
    return {node: tuple(sorted(peers)) for node, peers in out.items()}
