"""Flower's in-memory LinkState with the messages awaiting delivery indexed by node.

Flower 1.42's simulation engine polls ``LinkState.get_message_ins(node_id, limit=1)``
for every simulated node ten times a second
(``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``), and the in-memory
LinkState answers each call by scanning every stored message, checking each one's
expiry and federation on the way. One poll of the population therefore costs
O(nodes x messages in flight): 10,000 nodes with 1,000 messages of a round in flight
is ten million checks, some tens of seconds of CPU under the GIL, and every stage of
a round (SecAgg+ has four) waits for it (``python -m benchmarks.scale --linkstate
flower`` measures it; docs/scenarios.md, "Scale and Ray clusters").

:class:`IndexedLinkState` keeps, per destination node, the ids of the messages it
stored that are not delivered yet, oldest first, and answers ``get_message_ins`` from
that list: the same messages in the same order, the same expiry and federation checks
on each candidate, O(its own messages) a call. Everything else is Flower's.
:func:`indexed_linkstate` installs it for the simulations started inside it.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Message
from flwr.server.superlink.linkstate import linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

__all__ = ["IndexedLinkState", "indexed_linkstate"]


class IndexedLinkState(InMemoryLinkState):
    """``InMemoryLinkState`` whose ``get_message_ins`` reads a per-node index."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting: defaultdict[int, deque[str]] = defaultdict(deque)

    def store_message_ins(self, message: Message) -> str | None:
        """Store one Message (Flower's checks) and index it under its destination."""
        with self.lock:
            known = message.metadata.message_id in self.message_ins_store
            message_id = super().store_message_ins(message)
            if message_id is not None and not known:
                self._waiting[message.metadata.dst_node_id].append(message_id)
        return message_id

    def get_message_ins(
        self, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Message]:
        """Return (and mark delivered) up to ``limit`` undelivered Messages for ``node_id``."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with self.lock:
            waiting = self._waiting.get(node_id)
            if not waiting:
                return found
            other_runs: list[str] = []
            while waiting and not (limit and len(found) == limit):
                message_id = waiting.popleft()
                # Flower's own check: an expired message, or one between nodes no longer
                # in the same federation, is deleted here.
                self._check_stored_messages({message_id})
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    continue  # deleted or delivered since: nothing to keep
                if run_id is not None and message.metadata.run_id != run_id:
                    other_runs.append(message_id)
                    continue
                found.append(message)
            waiting.extendleft(reversed(other_runs))
            if not waiting:
                del self._waiting[node_id]
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
        return found


@contextmanager
def indexed_linkstate() -> Iterator[None]:
    """Make Flower's LinkStateFactory build :class:`IndexedLinkState` for in-memory state."""
    original = vars(linkstate_factory)["InMemoryLinkState"]
    setattr(linkstate_factory, "InMemoryLinkState", IndexedLinkState)  # noqa: B010
    try:
        yield
    finally:
        setattr(linkstate_factory, "InMemoryLinkState", original)  # noqa: B010
