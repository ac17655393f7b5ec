"""Order simulated nodes by partition, so a seeded sampler picks the same devices every run.

Flower's simulation engine draws fresh random node ids for every run; the
partition a node serves (``node_config["partition-id"]``) is what stays the
same. :class:`PartitionOrder` asks every node once, with a ``query.partition``
message (answered by :func:`fl_client.make_client_app` with
``answer_partition=True``), and orders node ids by partition from then on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fl_client.app import PARTITION_ID_METRIC, PARTITION_QUERY

__all__ = ["PartitionOrder"]

logger = logging.getLogger(__name__)

_QUERY_TIMEOUT_S = 120.0


class PartitionOrder:
    """A :data:`fl_server.sampling.NodeOrder` for simulations: node ids by partition id.

    Bind the simulation's Grid (:meth:`bind`) before the first call. A node that
    does not answer sorts after every node that did (by id), so a broken node
    never stops a run; it only loses the determinism of the draw.
    """

    def __init__(self) -> None:
        self._grid: Grid | None = None
        self._partition: dict[int, int] = {}

    def bind(self, grid: Grid) -> None:
        """Use ``grid`` to ask nodes for their partition."""
        self._grid = grid

    @property
    def partitions(self) -> dict[int, int]:
        """The partition id of every node that answered."""
        return dict(self._partition)

    def __call__(self, node_ids: Sequence[int]) -> list[int]:
        """Return ``node_ids`` ordered by partition id (asking new nodes first)."""
        unknown = [node for node in node_ids if node not in self._partition]
        if unknown and self._grid is not None:
            self._ask(self._grid, unknown)
        return sorted(node_ids, key=lambda node: (self._partition.get(node, math.inf), node))

    def _ask(self, grid: Grid, nodes: list[int]) -> None:
        messages = [
            Message(
                content=RecordDict(),
                dst_node_id=node,
                message_type=f"query.{PARTITION_QUERY}",
            )
            for node in nodes
        ]
        for reply in grid.send_and_receive(messages, timeout=_QUERY_TIMEOUT_S):
            node = reply.metadata.src_node_id
            if reply.has_error() or not reply.content.metric_records:
                continue
            record = next(iter(reply.content.metric_records.values()))
            value = record.get(PARTITION_ID_METRIC)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                self._partition[node] = value
        missing = len(nodes) - sum(node in self._partition for node in nodes)
        if missing:
            logger.warning("%d simulated nodes did not say their partition", missing)
