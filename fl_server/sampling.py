"""Seeded node sampling: the same nodes every time a run is repeated with the same seed.

Flower's strategies sample a round's nodes with Python's global ``random``, so
two runs of one experiment train different devices in each round. Wrapped in
:class:`SeededSampling`, a strategy sees only the nodes a generator seeded with
``(seed, round)`` chose from the nodes in a stable order (``node_order``: by id
by default; a simulation orders them by partition, since Flower draws fresh
node ids for every simulated run).

Notes
-----
Only the *choice of devices* is seeded: it is experiment randomness, like the
data partition. Keys, masks and DP noise never come from it. A fixed-size
sample claims no privacy amplification (only Poisson sampling from the CSPRNG
does, in :class:`fl_server.dp_strategy.DifferentialPrivacy`, which then samples
itself and ignores this wrapper's choice).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.errors import ConfigError
from fl_server._grid import ForwardingGrid

__all__ = ["NodeOrder", "SeededSampling"]

logger = logging.getLogger(__name__)

_WAIT_S = 1.0

NodeOrder = Callable[[Sequence[int]], list[int]]
"""Put a round's available node ids in a stable order."""


class _OnlyNodes(ForwardingGrid):
    """Forward to a Grid, but report only the chosen nodes as available."""

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        super().__init__(grid)
        self._nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        """Return the chosen nodes."""
        return list(self._nodes)


class SeededSampling(Strategy):
    """Let ``strategy`` sample only among nodes chosen by a seeded generator.

    Parameters
    ----------
    strategy
        The strategy to wrap; it must have ``fraction_train`` and ``min_train_nodes``
        (every ``flwr.serverapp.strategy`` mean, optimiser and robust rule has).
    seed
        The experiment's seed, >= 0.
    node_order
        Puts the available nodes in a stable order before the draw.

    Raises
    ------
    ConfigError
        If the seed is negative or the strategy does not say how many it samples.
    """

    def __init__(self, strategy: Strategy, *, seed: int, node_order: NodeOrder = sorted) -> None:
        super().__init__()
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        fraction = getattr(strategy, "fraction_train", None)
        least = getattr(strategy, "min_train_nodes", None)
        if not isinstance(fraction, (int, float)) or not isinstance(least, int):
            raise ConfigError(
                f"{type(strategy).__name__} has no fraction_train and min_train_nodes to sample by"
            )
        self._strategy = strategy
        self._seed = seed
        self._order = node_order
        self.fraction_train = float(fraction)
        self.min_train_nodes = least
        self.min_available_nodes = int(getattr(strategy, "min_available_nodes", least))
        # The wrapped strategy sees only the chosen nodes: it must not wait for more.
        # This wrapper waits for the fleet instead (configure_train).
        if hasattr(strategy, "min_available_nodes"):
            strategy.min_available_nodes = least

    def __repr__(self) -> str:
        """Name the wrapped strategy and the seed."""
        return f"SeededSampling({self._strategy!r}, seed={self._seed})"

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self._strategy.summary()

    def choose(self, server_round: int, available: Sequence[int]) -> list[int]:
        """Return the nodes of ``server_round``: a seeded draw from ``available`` in order."""
        ordered = self._order(list(available))
        size = min(len(ordered), max(int(len(ordered) * self.fraction_train), self.min_train_nodes))
        digest = hashlib.sha256(f"fedge-sampling:{self._seed}:{server_round}".encode()).digest()
        generator = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        picks = generator.permutation(len(ordered))[:size]
        return [ordered[i] for i in sorted(picks)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy configure the round on the chosen nodes only."""
        while len(available := list(grid.get_node_ids())) < self.min_available_nodes:
            logger.info(
                "waiting for nodes: %d of %d connected", len(available), self.min_available_nodes
            )
            time.sleep(_WAIT_S)
        chosen = self.choose(server_round, available)
        return self._strategy.configure_train(
            server_round, arrays, config, _OnlyNodes(grid, chosen)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate to the wrapped strategy."""
        return self._strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self._strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self._strategy.aggregate_evaluate(server_round, replies)
