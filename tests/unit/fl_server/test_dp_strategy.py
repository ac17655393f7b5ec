"""The DP wrapper around any Flower strategy: validation, server optimisers, secure replies,
each participant's lifetime cap checked before anything of the round is released."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    Strategy,
)
from sqlalchemy import Engine

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.dp_strategy import DifferentialPrivacy
from fl_server.ledger import BudgetExceeded, PrivacyBudget, PrivacyLedger
from fl_server.privacy import ServerDp
from fl_server.secagg_config import PARTICIPANTS_FIELD, PARTICIPANTS_RECORD_KEY
from fl_server.spend import LedgerSink
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import GaussianSteps, PrivacySpend
from strategies.central import (
    CDP_RECORD_KEY,
    SENSITIVITY_METRIC,
    CentralDpSettings,
    LocalDpSettings,
)
from strategies.sample_dp import SampleDpSettings
from tests.unit.fl_server.test_privacy import Sink
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    App,
    InProcessGrid,
    _server_identity,
)

NODES = list(range(301, 309))
SIZE = 2_000
CLIP, Z = 0.5, 1.0
CENTRAL = ServerDp(central=CentralDpSettings(l2_clip=CLIP, noise_multiplier=Z))
SECURE = ServerDp(central=CentralDpSettings(l2_clip=CLIP, noise_multiplier=Z), secure=True)


def _stepping(value: float) -> App:
    """Train by adding ``value`` to every weight; no device-side clipping (the server clips)."""

    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        local = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(value))})
        metrics = MetricRecord({"num-examples": 40})
        return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)

    return train


def _global() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.ones(SIZE, np.float32))})


def _round(strategy: Strategy, grid: InProcessGrid) -> np.ndarray:
    messages = strategy.configure_train(1, _global(), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, list(grid.send_and_receive(messages)))
    assert arrays is not None
    return arrays["w"].numpy().astype(np.float64)


def _wrap(strategy: Strategy, sink: Sink | None = None, seed: int = 7) -> DifferentialPrivacy:
    return DifferentialPrivacy(
        strategy, dp=CENTRAL, sink=sink or Sink(), rng=DeterministicRandom(seed)
    )


def _grid() -> InProcessGrid:
    return InProcessGrid({n: _stepping(0.01 * (n - 300)) for n in NODES})


def test_a_server_optimiser_takes_its_step_towards_the_noisy_mean() -> None:
    plain = _round(_wrap(FedAvg(fraction_evaluate=0.0, min_train_nodes=8)), _grid())
    momentum = _round(
        _wrap(FedAvgM(fraction_evaluate=0.0, min_train_nodes=8, server_learning_rate=0.5)),
        _grid(),
    )
    adam = _round(
        _wrap(FedAdam(fraction_evaluate=0.0, min_train_nodes=8, eta=0.1, tau=1e-3)), _grid()
    )

    # Same seed, same noise: FedAvg returns global + noisy mean update; the optimisers
    # take their step from the global model along that same noisy update.
    noisy_update = plain - 1.0
    assert np.std(noisy_update) == pytest.approx(Z * CLIP / len(NODES), rel=0.1)
    np.testing.assert_allclose(momentum - 1.0, 0.5 * noisy_update, rtol=1e-5, atol=1e-6)
    m_t, v_t = 0.1 * noisy_update, 0.01 * noisy_update**2
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    expected = 1.0 + eta_norm * m_t / (np.sqrt(v_t) + 1e-3)
    np.testing.assert_allclose(adam, expected, rtol=1e-5, atol=1e-6)


def test_start_runs_the_wrapped_optimiser_for_every_round() -> None:
    sink = Sink()
    strategy = _wrap(FedAdam(fraction_evaluate=0.0, min_train_nodes=8), sink)

    result = strategy.start(grid=_grid(), initial_arrays=_global(), num_rounds=2, timeout=10)

    assert [r for r, _, _ in sink.spends] == [1, 2]
    assert all(len(charged) == len(NODES) for _, _, charged in sink.spends)
    # Every update is positive: after two Adam steps every weight moved up.
    assert np.mean(result.arrays["w"].numpy()) > 1.0
    assert [h["round"] for h in strategy.history] == [1, 2]


def test_the_server_clips_a_plain_reply_whose_device_did_not() -> None:
    grid = InProcessGrid({n: _stepping(1.0) for n in NODES})

    update = _round(_wrap(FedAvg(fraction_evaluate=0.0, min_train_nodes=8)), grid) - 1.0

    # Each update (norm sqrt(SIZE) = 44.7) clipped to 0.5: 0.011 per coordinate, not 1.0.
    assert np.mean(update) == pytest.approx(CLIP / np.sqrt(SIZE), abs=0.005)


def _secure_reply(
    trained: ArrayRecord, survivors: int, subjects: list[str] | None, to: Message
) -> Message:
    # As the secure Grid reports it: the sum's size and each client's L2 sensitivity
    # (conditional rounding's bound; 1.0001 C for a narrow ring here).
    metrics = MetricRecord(
        {
            "num-examples": survivors,
            "secagg-survivors": survivors,
            SENSITIVITY_METRIC: CLIP * 1.0001,
        }
    )
    content = RecordDict({"arrays": trained, "metrics": metrics})
    if subjects is not None:
        content[PARTICIPANTS_RECORD_KEY] = ConfigRecord({PARTICIPANTS_FIELD: subjects})
    metadata = Metadata(
        run_id=1,
        message_id="aggregate",
        src_node_id=to.metadata.dst_node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    reply: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    return reply


def _configured(dp: ServerDp, sink: Sink) -> tuple[DifferentialPrivacy, list[Message]]:
    strategy = DifferentialPrivacy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=3),
        dp=dp,
        sink=sink,
        rng=DeterministicRandom(11),
    )
    grid = InProcessGrid({n: _stepping(0.0) for n in NODES[:3]})
    return strategy, list(strategy.configure_train(1, _global(), ConfigRecord(), grid))


def test_the_sink_charges_the_subjects_the_secure_aggregate_names() -> None:
    sink = Sink()
    strategy, messages = _configured(SECURE, sink)
    subjects = ["device-a", "device-b", "device-c"]
    mean = ArrayRecord({"w": Array(np.full(SIZE, 1.1, np.float32))})

    arrays, _ = strategy.aggregate_train(1, [_secure_reply(mean, 3, subjects, messages[0])])

    [(_, run_spend, charged)] = sink.spends
    assert sorted(charged) == subjects
    gaussian = GaussianSteps(noise_multiplier=Z, sample_rate=1.0, steps=1)
    assert all(spend.gaussian == gaussian for spend in charged.values())
    assert run_spend is not None and run_spend.gaussian == gaussian
    assert arrays is not None
    noise = arrays["w"].numpy().astype(np.float64) - 1.1
    assert np.std(noise) == pytest.approx(Z * CLIP * 1.0001 / 3, rel=0.1)
    assert strategy.history[-1]["l2_sensitivity"] == CLIP * 1.0001


@pytest.mark.parametrize(
    ("dp", "survivors", "subjects", "match"),
    [
        (SECURE, 3, None, "carries no 'fedge.secagg.participants' record"),
        (SECURE, 4, ["a", "b", "c"], "sums 4 clients but names 3"),
        (CENTRAL, 3, ["a", "b", "c"], "'secagg-survivors' but the run is not secure"),
    ],
)
def test_a_secure_aggregate_that_cannot_be_charged_is_refused(
    dp: ServerDp, survivors: int, subjects: list[str] | None, match: str
) -> None:
    sink = Sink()
    strategy, messages = _configured(dp, sink)
    reply = _secure_reply(_global(), survivors, subjects, messages[0])

    with pytest.raises(ConfigError, match=match):
        strategy.aggregate_train(1, [reply])
    assert sink.spends == []


def test_a_secure_run_takes_one_aggregate_and_never_plain_replies() -> None:
    strategy, messages = _configured(SECURE, Sink())
    reply = _secure_reply(_global(), 3, ["a", "b", "c"], messages[0])
    with pytest.raises(ConfigError, match="one aggregate reply, got 2"):
        strategy.aggregate_train(1, [reply, reply])
    plain = list(InProcessGrid({n: _stepping(0.1) for n in NODES[:3]}).send_and_receive(messages))
    with pytest.raises(ConfigError, match="is the Grid a SecureAggregationGrid"):
        strategy.aggregate_train(1, plain)


def test_a_round_aggregated_without_its_configuration_is_refused() -> None:
    strategy, messages = _configured(CENTRAL, Sink())
    replies = list(InProcessGrid({n: _stepping(0.1) for n in NODES[:3]}).send_and_receive(messages))
    with pytest.raises(ConfigError, match="round 2 was aggregated but never configured"):
        strategy.aggregate_train(2, replies)


def test_poisson_sampling_sends_the_wrapped_strategys_round_to_the_secret_sample() -> None:
    apps = {n: _stepping(0.01) for n in range(400, 500)}
    inner = FedAdam(fraction_train=0.3, fraction_evaluate=0.0, min_train_nodes=2)
    strategy = DifferentialPrivacy(
        inner,
        dp=ServerDp(
            central=CentralDpSettings(l2_clip=CLIP, noise_multiplier=Z), poisson_sampling=True
        ),
        sink=Sink(),
        rng=DeterministicRandom(5),
    )
    grid = InProcessGrid(apps)

    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))

    # Binomial(100, 0.3): 30 +- 4.6, not Flower's fixed 30 (nor 30 every round).
    assert 10 < len(messages) < 50
    assert len({m.metadata.dst_node_id for m in messages}) == len(messages)
    assert all(
        CDP_RECORD_KEY in m.content and "server-round" in m.content["config"] for m in messages
    )
    assert inner.current_arrays is not None and arrays is not None
    assert strategy.amplification.claimed and strategy.amplification.sample_rate == 0.3


class _NoFraction(Strategy):
    """A strategy that samples its own way (no fraction_train)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        return None


POISSON = ServerDp(local=LocalDpSettings(l2_clip=1.0, noise_multiplier=1.0), poisson_sampling=True)


@pytest.mark.parametrize(
    ("strategy", "kwargs", "match"),
    [
        (object(), {}, "^strategy must be a flwr.serverapp.strategy.Strategy, got object$"),
        (
            DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 2),
            {},
            "DifferentialPrivacyServerSideFixedClipping already adds differential privacy",
        ),
        (None, {}, "DifferentialPrivacy already adds differential privacy"),
        (FedAvg(), {"dp": "central"}, "^dp must be a ServerDp, got str$"),
        (
            FedAvg(),
            {"sink": object()},
            r"^sink must be a SpendSink \(with check, check_participants and spent\)$",
        ),
        (FedAvg(), {"on_replies": 3}, "^on_replies must be callable or None$"),
        (FedAvg(), {"rng": object()}, r"^rng must be a RandomSource \(with random_bytes\)$"),
        (_NoFraction(), {"dp": POISSON}, "fraction_train, and _NoFraction has none$"),
        (FedAvg(fraction_train=0.0), {"dp": POISSON}, r"fraction_train in \(0, 1\], got 0.0$"),
        (FedAvg(fraction_train=1.5), {"dp": POISSON}, r"fraction_train in \(0, 1\], got 1.5$"),
    ],
)
def test_arguments_are_checked_on_construction(
    strategy: object, kwargs: dict[str, object], match: str
) -> None:
    if strategy is None:
        strategy = _wrap(FedAvg())
    arguments: dict[str, object] = {"dp": CENTRAL, "sink": Sink(), **kwargs}
    with pytest.raises(ConfigError, match=match):
        DifferentialPrivacy(strategy, **arguments)  # type: ignore[arg-type]


def test_a_strategy_without_a_fraction_claims_no_amplification() -> None:
    strategy = DifferentialPrivacy(_NoFraction(), dp=CENTRAL, sink=Sink())

    assert not strategy.amplification.claimed
    assert strategy.amplification.sample_rate == 1.0
    assert "_NoFraction samples its own way" in strategy.amplification.reason


class _SpyFedAvg(FedAvg):
    """FedAvg that counts what it was asked to aggregate."""

    def __init__(self) -> None:
        super().__init__(fraction_evaluate=0.0, min_train_nodes=3)
        self.aggregated = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.aggregated += 1
        return super().aggregate_train(server_round, replies)


def _charged(noise_multiplier: float) -> PrivacySpend:
    event = GaussianSteps(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    return PrivacySpend(mechanism="central-gaussian", gaussian=event)


def test_a_participant_past_its_lifetime_cap_stops_the_round_with_nothing_recorded(
    engine: Engine,
) -> None:
    ledger, audit = PrivacyLedger(engine), AuditLog(engine)
    # device-b took part in three rounds of an earlier run; device-a and device-c never did.
    for server_round in (1, 2, 3):
        ledger.record_many("run-old", server_round, {"device-b": _charged(Z)}, delta=1e-5)
    cap = ledger.lifetime_spent("device-b", delta=1e-5) + 0.01
    budget = PrivacyBudget(ledger=ledger, epsilon=None, delta=1e-5, client_lifetime_epsilon=cap)
    inner = _SpyFedAvg()
    strategy = DifferentialPrivacy(
        inner,
        dp=SECURE,
        sink=LedgerSink(budget, audit, "run-new", "central-gaussian"),
        rng=DeterministicRandom(11),
    )
    grid = InProcessGrid({n: _stepping(0.0) for n in NODES[:3]})
    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), grid))
    reply = _secure_reply(_global(), 3, ["device-a", "device-b", "device-c"], messages[0])

    with pytest.raises(BudgetExceeded, match=r"take client device-b past the lifetime budget"):
        strategy.aggregate_train(1, [reply])

    # Nothing of the round was aggregated, handed on or recorded.
    assert inner.aggregated == 0 and strategy.history == []
    assert ledger.entries("run-new") == []
    assert [e.run_id for e in ledger.lifetime_entries("device-b")] == ["run-old"] * 3
    assert not [e for e in audit.iter(run_id="run-new") if e.kind is AuditEventKind.PRIVACY_SPENT]


def test_every_participant_is_checked_before_the_round_with_the_spend_it_is_charged() -> None:
    for dp, expected in (
        (CENTRAL, Z),
        (ServerDp(local=LocalDpSettings(l2_clip=CLIP, noise_multiplier=2.0)), 1.0),
    ):
        sink = Sink()
        strategy = DifferentialPrivacy(_SpyFedAvg(), dp=dp, sink=sink, rng=DeterministicRandom(3))
        grid = InProcessGrid({n: _stepping(0.01) for n in NODES[:3]})

        messages = strategy.configure_train(1, _global(), ConfigRecord(), grid)
        strategy.aggregate_train(1, list(grid.send_and_receive(messages)))

        [(subjects, spend)] = sink.participants_checked
        [(_, _, charged)] = sink.spends
        assert sorted(subjects) == [str(n) for n in NODES[:3]] == sorted(charged)
        assert spend.gaussian is not None and spend.gaussian.noise_multiplier == expected
        assert all(each == spend for each in charged.values())


def _reporting_dpsgd(noise_multiplier: float) -> App:
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        metrics = MetricRecord(
            {
                "num-examples": 40,
                "dp-noise-multiplier": noise_multiplier,
                "dp-sample-rate": 0.05,
                "dp-steps": 20,
            }
        )
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return train


def test_dp_sgd_devices_are_checked_with_the_spends_they_reported() -> None:
    sink = Sink()
    strategy = DifferentialPrivacy(
        _SpyFedAvg(), dp=ServerDp(sample=SampleDpSettings(noise_multiplier=1.0)), sink=sink
    )
    noise = {NODES[0]: 1.0, NODES[1]: 1.5, NODES[2]: 1.0}
    grid = InProcessGrid({n: _reporting_dpsgd(z) for n, z in noise.items()})

    messages = strategy.configure_train(1, _global(), ConfigRecord(), grid)
    strategy.aggregate_train(1, list(grid.send_and_receive(messages)))

    checked = {
        spend.gaussian.noise_multiplier: sorted(subjects)
        for subjects, spend in sink.participants_checked
        if spend.gaussian is not None
    }
    assert checked == {1.0: [str(NODES[0]), str(NODES[2])], 1.5: [str(NODES[1])]}
    [(_, run_spend, charged)] = sink.spends
    assert run_spend is None and sorted(charged) == sorted(str(n) for n in noise)
