"""A Flower Grid that forwards everything to the Grid it wraps: the base of fedge's wrappers."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["ForwardingGrid"]


class ForwardingGrid(Grid):
    """Forward every Grid call to ``grid``; subclasses override what they change."""

    def __init__(self, grid: Grid) -> None:
        self._inner = grid

    def set_run(self, run: Run) -> None:
        """Set the run on the wrapped Grid."""
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped Grid's run."""
        return self._inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message through the wrapped Grid."""
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the connected nodes."""
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages unchanged (fedge's rounds use send_and_receive)."""
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies unchanged."""
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send through the wrapped Grid."""
        return self._inner.send_and_receive(messages, timeout=timeout)
