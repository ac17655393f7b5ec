"""A secure round's deadline is split among its stages; a stage past its share aborts the round."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg

from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    NODES,
    App,
    InProcessGrid,
    _honest,
    _server_identity,
)

CONFIG = SecAggConfig(clip_range=0.5, weight_cap=100, degree=4, threshold=3, masked_input_share=0.6)


class _Timed(InProcessGrid):
    """Record each stage's wait and its messages' TTL; optionally run slowly."""

    def __init__(self, apps: dict[int, App], *, delay_s: float = 0.0) -> None:
        super().__init__(apps)
        self.waits: list[float | None] = []
        self.ttls: list[float] = []
        self._delay_s = delay_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        outgoing = list(messages)
        self.waits.append(timeout)
        self.ttls.extend(m.metadata.ttl for m in outgoing)
        time.sleep(self._delay_s)
        return super().send_and_receive(outgoing, timeout=timeout)


def _run(grid: _Timed, timeout: float) -> tuple[ArrayRecord | None, list[SecAggRoundStats]]:
    stats: list[SecAggRoundStats] = []
    secure = SecureAggregationGrid(grid, CONFIG, on_round=stats.append)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(NODES))
    arrays = ArrayRecord({"w": Array(np.ones(6, np.float32))})
    messages = strategy.configure_train(1, arrays, ConfigRecord(), secure)
    replies = list(secure.send_and_receive(messages, timeout=timeout))
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated, stats


def test_each_stage_waits_only_until_its_share_of_the_deadline() -> None:
    grid = _Timed({n: _honest() for n in NODES})

    aggregated, [stats] = _run(grid, timeout=100.0)

    assert aggregated is not None and stats.aborted is None
    setup, share_keys, masked_input, unmask = grid.waits
    assert setup is not None and share_keys is not None
    assert masked_input is not None and unmask is not None
    # Semi-honest: four stages; masked input gets 60 %, the other three 40/3 % each,
    # so the cut-offs are at 13.3 %, 26.7 %, 86.7 % and 100 % of the round.
    assert 12.3 < setup <= 13.34
    assert 25.6 < share_keys <= 26.67
    assert 85.6 < masked_input <= 86.67
    assert 99.0 < unmask <= 100.0
    # Each stage's messages expire when the server stops waiting for them.
    assert max(grid.ttls) <= 100.0 and min(grid.ttls) <= 13.34


def test_a_stage_that_finds_its_time_spent_aborts_the_round() -> None:
    # Each exchange takes 0.3 s of a 1 s round: setup overruns its 13 %, share keys aborts.
    grid = _Timed({n: _honest() for n in NODES}, delay_s=0.3)

    aggregated, [stats] = _run(grid, timeout=1.0)

    assert aggregated is None
    assert stats.aborted is not None and "deadline" in stats.aborted


def test_without_a_share_every_stage_waits_the_whole_timeout() -> None:
    grid = _Timed({n: _honest() for n in NODES})
    stats: list[SecAggRoundStats] = []
    config = SecAggConfig(clip_range=0.5, weight_cap=100, degree=4, threshold=3)
    secure = SecureAggregationGrid(grid, config, on_round=stats.append)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(NODES))
    arrays = ArrayRecord({"w": Array(np.ones(6, np.float32))})
    messages = strategy.configure_train(1, arrays, ConfigRecord(), secure)

    list(secure.send_and_receive(messages, timeout=30.0))

    assert grid.waits == [30.0] * 4
