"""The indexed LinkState hands out exactly what Flower's in-memory one does, per node."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_FLWR_AID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from simulations.linkstate import IndexedLinkState, indexed_linkstate

RUN_ID = 7


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    # The Grid stamps messages with the ServerApp's task identity, as in a simulation.
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, RUN_ID + 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _grid(indexed: bool) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    installed: AbstractContextManager[None] = indexed_linkstate() if indexed else nullcontext()
    with installed:
        state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    # As flwr.simulation.run_simulation registers its run.
    run = Run.create_empty(run_id=RUN_ID)
    run.federation_id = NOOP_FEDERATION_ID
    run.primary_task_id = RUN_ID + 1
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[RUN_ID + 1] = Task(task_id=RUN_ID + 1, run_id=RUN_ID)
    nodes = []
    for _ in range(4):
        node = state.create_node(
            NOOP_FLWR_AID, "sim", secrets.token_bytes(32), heartbeat_interval=HEARTBEAT_INTERVAL_INF
        )
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return state, grid, nodes


def _push(grid: InMemoryGrid, node: int, tag: int, ttl: float | None = None) -> str:
    content = RecordDict({"tag": ConfigRecord({"tag": tag})})
    message = grid.create_message(content, MessageType.TRAIN, node, "g", ttl=ttl)
    (message_id,) = grid.push_messages([message])
    return message_id


def _tags(messages: list[Message]) -> list[int]:
    return [int(str(m.content.config_records["tag"]["tag"])) for m in messages]


def _script(indexed: bool) -> list[list[int]]:
    """The same pushes and polls on either LinkState; what each poll returned."""
    state, grid, nodes = _grid(indexed)
    assert isinstance(state, IndexedLinkState) is indexed
    seen: list[list[int]] = []
    for tag in range(12):
        _push(grid, nodes[tag % 3], tag)  # the fourth node gets nothing
    for node in nodes:
        seen.append(_tags(state.get_message_ins(node, limit=1)))
    seen.append(_tags(state.get_message_ins(nodes[0], limit=None)))
    seen.append(_tags(state.get_message_ins(nodes[0], limit=None)))  # all delivered now
    seen.append(_tags(state.get_message_ins(nodes[1], limit=2, run_id=RUN_ID)))
    seen.append(_tags(state.get_message_ins(nodes[2], limit=5, run_id=RUN_ID + 1)))
    # A message stored twice is indexed once; an expired one is dropped, not delivered.
    message_id = _push(grid, nodes[3], 100)
    again = state.message_ins_store[message_id]
    assert state.store_message_ins(again) == message_id
    expired = _push(grid, nodes[3], 101, ttl=0.2)
    time.sleep(0.3)
    seen.append(_tags(state.get_message_ins(nodes[3], limit=None)))
    assert expired not in state.message_ins_store
    # Deleted before delivery (the ServerApp gave up on it): never handed out.
    gone = _push(grid, nodes[2], 200)
    state.delete_messages({gone})
    seen.append(_tags(state.get_message_ins(nodes[2], limit=None)))
    return seen


def test_the_indexed_state_hands_out_what_flowers_does() -> None:
    flower = _script(indexed=False)

    assert _script(indexed=True) == flower
    assert flower[:4] == [[0], [1], [2], []]
    assert flower[4] == [3, 6, 9]
    assert flower[5] == []
    assert flower[8] == [100]


def test_limits_below_one_are_refused_as_flower_does() -> None:
    state, _, nodes = _grid(indexed=True)
    with pytest.raises(AssertionError, match="limit"):
        state.get_message_ins(nodes[0], limit=0)


def test_the_factory_is_restored_after_the_block() -> None:
    with indexed_linkstate():
        pass
    state, _, _ = _grid(indexed=False)
    assert type(state) is InMemoryLinkState
