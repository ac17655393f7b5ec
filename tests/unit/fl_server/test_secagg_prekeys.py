"""Rounds keyed in advance over the secure Grid: fewer trips, and every failure case recovers.

The devices are the real client mod in this process; the server is the real
:class:`SecureAggregationGrid` with ``prekeys`` on. Each round's exchanges are
recorded by stage, so a test sees how many full-fleet trips a round took.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedge.errors import ConfigError
from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import RECORD_KEY, Envelope
from secure_agg.identity import EnrolmentAuthority
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    NODES,
    POLICY,
    App,
    InProcessGrid,
    _crashing,
    _expected,
    _server_identity,
    _train,
)

CONFIG = SecAggConfig(clip_range=0.5, weight_cap=100, degree=4, threshold=3, prekeys=True)
BOUND = EncodingConfig(clip_range=0.5, max_clients=8, weight_cap=100).error_bound
AUTHORITY = EnrolmentAuthority.generate(DeterministicRandom(31))
IDENTITIES = {n: AUTHORITY.enrol(f"device-{n}", DeterministicRandom(n)) for n in NODES}
ACTIVE_POLICY = DevicePolicy(
    protocol=ProtocolPolicy(
        threat_model=ThreatModel.ACTIVE, authority_public_key=AUTHORITY.public_key
    ),
    min_noise_multiplier=0.01,
)
ACTIVE_CONFIG = SecAggConfig(
    clip_range=0.5,
    weight_cap=100,
    degree=6,
    threshold=5,
    threat_model=ThreatModel.ACTIVE,
    authority_public_key=AUTHORITY.public_key,
    prekeys=True,
)


class _Recording(InProcessGrid):
    """Record, for each exchange, its stage and the nodes it went to."""

    def __init__(self, apps: dict[int, App]) -> None:
        super().__init__(apps)
        self.trips: list[tuple[str, tuple[int, ...]]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        outgoing = list(messages)
        fields = outgoing[0].content.config_records[RECORD_KEY]
        stage = Envelope.from_fields(fields).stage.value
        self.trips.append((stage, tuple(sorted(m.metadata.dst_node_id for m in outgoing))))
        return super().send_and_receive(outgoing, timeout=timeout)


def _honest(policy: DevicePolicy = POLICY) -> App:
    mod = make_secagg_mod(policy=policy, identities=lambda context: IDENTITIES.get(context.node_id))
    return lambda msg, context: mod(msg, context, _train)


class _Run:
    """A run of several rounds on one secure Grid (the server keeps its pre-key store)."""

    def __init__(self, apps: dict[int, App], config: SecAggConfig = CONFIG) -> None:
        self.grid = _Recording(apps)
        self.stats: list[SecAggRoundStats] = []
        self.secure = SecureAggregationGrid(self.grid, config, on_round=self.stats.append)
        self.strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(apps))

    def round(self, nodes: list[int] | None = None) -> tuple[ArrayRecord | None, list[str]]:
        """Run one round with ``nodes`` (all by default); return the model and its stages."""
        before = len(self.grid.trips)
        arrays = ArrayRecord({"w": Array(np.ones(6, np.float32))})
        messages = list(self.strategy.configure_train(1, arrays, ConfigRecord(), self.secure))
        if nodes is not None:
            messages = [m for m in messages if m.metadata.dst_node_id in nodes]
        replies = list(self.secure.send_and_receive(messages, timeout=10))
        aggregated, _ = self.strategy.aggregate_train(1, replies)
        return aggregated, [stage for stage, _ in self.grid.trips[before:]]


@pytest.fixture
def honest_run() -> Iterator[_Run]:
    yield _Run({n: _honest() for n in NODES})


def test_after_the_first_round_a_round_needs_three_trips_not_four(honest_run: _Run) -> None:
    first, first_stages = honest_run.round()
    second, second_stages = honest_run.round()
    third, third_stages = honest_run.round()

    assert first_stages == ["prekey", "prekeyed-setup", "masked-input", "unmask"]
    assert second_stages == third_stages == ["prekeyed-setup", "masked-input", "unmask"]
    for aggregated in (first, second, third):
        assert aggregated is not None
        np.testing.assert_allclose(aggregated["w"].numpy(), _expected(NODES), atol=BOUND)
    assert [s.survivors for s in honest_run.stats] == [8, 8, 8]


def test_active_model_rounds_keyed_in_advance_give_the_exact_mean() -> None:
    run = _Run({n: _honest(ACTIVE_POLICY) for n in NODES}, ACTIVE_CONFIG)

    run.round()
    aggregated, stages = run.round()

    assert stages == ["prekeyed-setup", "masked-input", "consistency", "unmask"]
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(NODES), atol=BOUND)


def test_a_device_that_missed_rounds_uses_its_pending_key_later(honest_run: _Run) -> None:
    absent = NODES[2]
    honest_run.round()
    others = [n for n in NODES if n != absent]
    honest_run.round(others)
    honest_run.round(others)

    aggregated, stages = honest_run.round()

    # Its key from round 1 waited on the device: no pre-key trip, and it is in the sum.
    assert stages == ["prekeyed-setup", "masked-input", "unmask"]
    assert aggregated is not None and honest_run.stats[-1].survivors == 8
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(NODES), atol=BOUND)


def test_a_device_that_lost_its_state_is_dropped_once_then_asked_for_a_key(
    honest_run: _Run,
) -> None:
    wiped = NODES[5]
    honest_run.round()
    honest_run.grid.contexts[wiped] = Context(
        run_id=1, node_id=wiped, node_config={}, state=RecordDict(), run_config={}
    )

    aggregated, _ = honest_run.round()
    again, stages = honest_run.round()

    # Round 2: the server relayed a key the device no longer holds; it refuses, the
    # others' sum is exact. Round 3: only that device is asked for a fresh key.
    assert aggregated is not None
    others = [n for n in NODES if n != wiped]
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(others), atol=BOUND)
    assert "holds no pre-key" in honest_run.stats[1].failures[wiped]
    assert honest_run.grid.trips[-4] == ("prekey", (wiped,))
    assert stages == ["prekey", "prekeyed-setup", "masked-input", "unmask"]
    assert again is not None
    np.testing.assert_allclose(again["w"].numpy(), _expected(NODES), atol=BOUND)


def test_a_device_that_dropped_mid_round_rejoins_through_a_pre_key_trip() -> None:
    flaky = NODES[1]
    state = {"crash": True}
    flaky_mod = make_secagg_mod(policy=POLICY)

    def flaky_app(msg: Message, context: Context) -> Message:
        handler = _crashing if state["crash"] else _train
        return flaky_mod(msg, context, handler)

    run = _Run({**{n: _honest() for n in NODES}, flaky: flaky_app})
    run.round()
    dropped, _ = run.round()  # it crashes in training: a masked-input dropout
    state["crash"] = False

    back, stages = run.round()

    others = [n for n in NODES if n != flaky]
    assert dropped is not None
    np.testing.assert_allclose(dropped["w"].numpy(), _expected(others), atol=BOUND)
    # Its key was used in round 2 and it sent no next one: round 3 asks it alone.
    assert stages[0] == "prekey" and run.grid.trips[-4] == ("prekey", (flaky,))
    assert back is not None
    np.testing.assert_allclose(back["w"].numpy(), _expected(NODES), atol=BOUND)


def test_a_device_that_never_announces_a_key_leaves_before_the_round_starts() -> None:
    silent = NODES[7]
    run = _Run({**{n: _honest() for n in NODES}, silent: _crashing})

    aggregated, stages = run.round()

    others = [n for n in NODES if n != silent]
    assert stages == ["prekey", "prekeyed-setup", "masked-input", "unmask"]
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(others), atol=BOUND)
    stats = run.stats[0]
    assert stats.failures[silent].startswith("prekey: device crashed")
    assert stats.survivors == 7 and stats.sampled == 8
    # The round was sized for the seven (the prekeyed setup went to them only).
    assert run.grid.trips[1] == ("prekeyed-setup", tuple(others))


def test_a_device_whose_policy_refuses_pre_keys_is_left_out_and_named() -> None:
    classic = DevicePolicy(
        protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, accept_prekeys=False),
        min_noise_multiplier=0.01,
        min_honest_contributors=5,
    )
    run = _Run({**{n: _honest() for n in NODES}, NODES[0]: _honest(classic)})

    aggregated, _ = run.round()

    assert aggregated is not None and run.stats[0].survivors == 7
    assert "keyed in advance" in run.stats[0].failures[NODES[0]]


# ---------------------------------------------------------------- a server-drawn graph (two trips)

GRAPH_POLICY = DevicePolicy(
    protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST, accept_server_graph=True),
    min_noise_multiplier=0.01,
    min_honest_contributors=5,
)
GRAPH_CONFIG = SecAggConfig(
    clip_range=0.5, weight_cap=100, degree=4, threshold=3, prekeys=True, server_graph=True
)


def _unmask_crash(policy: DevicePolicy = GRAPH_POLICY) -> App:
    """A device that trains and masks, then falls silent at unmask."""
    mod = make_secagg_mod(policy=policy)

    def app(msg: Message, context: Context) -> Message:
        fields = msg.content.config_records.get(RECORD_KEY)
        if fields is not None and Envelope.from_fields(fields).stage.value == "unmask":
            return Message(Error(code=1, reason="device crashed"), reply_to=msg)
        return mod(msg, context, _train)

    return app


def test_on_a_server_drawn_graph_a_round_takes_two_trips() -> None:
    run = _Run({n: _honest(GRAPH_POLICY) for n in NODES}, GRAPH_CONFIG)

    first, first_stages = run.round()
    second, second_stages = run.round()

    assert first_stages == ["prekey", "keyed-masked-input", "unmask"]
    assert second_stages == ["keyed-masked-input", "unmask"]
    for aggregated in (first, second):
        assert aggregated is not None
        np.testing.assert_allclose(aggregated["w"].numpy(), _expected(NODES), atol=BOUND)
    assert [s.survivors for s in run.stats] == [8, 8]
    assert set(run.stats[1].stage_seconds) == {"keyed-masked-input", "unmask"}


def test_on_a_server_drawn_graph_dropouts_in_either_trip_leave_the_survivors_exact_mean() -> None:
    # One device crashes in training (silent in the first trip); two more mask and then
    # fall silent at unmask: their seeds with the first come from their holders' shares.
    apps: dict[int, App] = {n: _honest(GRAPH_POLICY) for n in NODES}
    # k 6, t 3: every device keeps t live holders whichever three fall silent.
    run = _Run(apps, replace(GRAPH_CONFIG, degree=6, threshold=3))
    run.round()
    trainer_crash = make_secagg_mod(policy=GRAPH_POLICY)
    apps[NODES[0]] = lambda msg, context: trainer_crash(msg, context, _crashing)
    apps[NODES[3]] = _unmask_crash()
    apps[NODES[6]] = _unmask_crash()

    aggregated, stages = run.round()

    assert stages == ["keyed-masked-input", "unmask"]
    survivors = [n for n in NODES if n != NODES[0]]
    assert aggregated is not None and run.stats[-1].survivors == 7
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(survivors), atol=BOUND)
    assert "device crashed" in run.stats[-1].failures[NODES[0]]


def test_a_device_whose_policy_keeps_its_own_draw_refuses_a_server_drawn_graph() -> None:
    strict = NODES[4]
    run = _Run({**{n: _honest(GRAPH_POLICY) for n in NODES}, strict: _honest()}, GRAPH_CONFIG)

    aggregated, _ = run.round()

    others = [n for n in NODES if n != strict]
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(others), atol=BOUND)
    assert "does not let the server draw the holders" in run.stats[-1].failures[strict]


def test_a_server_graph_is_refused_outside_the_semi_honest_model() -> None:
    with pytest.raises(ConfigError, match="semi-honest"):
        SecAggConfig(
            clip_range=0.5,
            threat_model=ThreatModel.ACTIVE,
            authority_public_key=AUTHORITY.public_key,
            prekeys=True,
            server_graph=True,
        )
    with pytest.raises(ConfigError, match="prekeys"):
        SecAggConfig(clip_range=0.5, server_graph=True)
