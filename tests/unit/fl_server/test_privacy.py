"""Server-side DP around FedAvg: central noise of the configured size, adaptive clipping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedge.errors import ConfigError
from fl_client.dp_mod import make_dp_mod
from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from fl_server.dp_strategy import DifferentialPrivacy
from fl_server.privacy import PrivacyMechanism, ServerDp, amplification
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom
from strategies.accounting import GaussianSteps, PrivacySpend
from strategies.central import (
    CDP_RECORD_KEY,
    UNCLIPPED_METRIC,
    AdaptiveClipping,
    CentralDpSettings,
    LocalDpSettings,
)
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    App,
    InProcessGrid,
    _server_identity,
)

NODES = list(range(201, 209))
POLICY = DevicePolicy(
    protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST),
    max_l2_clip=1000.0,
    min_noise_multiplier=0.5,
)


class Sink:
    def __init__(self, refuse_after: int | None = None) -> None:
        self.checked: list[PrivacySpend] = []
        self.participants_checked: list[tuple[list[str], PrivacySpend]] = []
        self.spends: list[tuple[int, PrivacySpend | None, dict[str, PrivacySpend]]] = []
        self.refuse_after = refuse_after

    def check(self, spend: PrivacySpend) -> None:
        if self.refuse_after is not None and len(self.checked) >= self.refuse_after:
            raise RuntimeError("over budget")
        self.checked.append(spend)

    def check_participants(self, subjects: Sequence[str], spend: PrivacySpend) -> None:
        self.participants_checked.append((list(subjects), spend))

    def spent(
        self,
        server_round: int,
        spend: PrivacySpend | None,
        participants: Mapping[str, PrivacySpend],
        details: dict[str, Any],
    ) -> None:
        self.spends.append((server_round, spend, dict(participants)))


def _big_step(size: int, value: float) -> App:
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        local = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(value))})
        metrics = MetricRecord({"num-examples": 40, "train-loss": 0.1})
        return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)

    del size
    return train


def _with_mods(train: App, *, secure: bool) -> App:
    dp = make_dp_mod(policy=POLICY, rng_factory=lambda: DeterministicRandom(9))
    if not secure:
        return lambda msg, context: dp(msg, context, train)
    secagg = make_secagg_mod(policy=POLICY)
    return lambda msg, context: secagg(msg, context, lambda m, c: dp(m, c, train))


def _one_round(
    strategy: DifferentialPrivacy, grid: Any, size: int, server_round: int = 1
) -> np.ndarray:
    arrays = ArrayRecord({"w": Array(np.ones(size, np.float32))})
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages, timeout=10))
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return aggregated["w"].numpy().astype(np.float64) - 1.0


def test_central_dp_averages_clipped_updates_unweighted_and_adds_z_c_over_n() -> None:
    size, clip, z = 20_000, 0.5, 2.0
    apps = {n: _with_mods(_big_step(size, 0.01 * (n - 200)), secure=False) for n in NODES}
    sink = Sink()
    dp = ServerDp(central=CentralDpSettings(l2_clip=clip, noise_multiplier=z))
    strategy = DifferentialPrivacy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=8),
        dp=dp,
        sink=sink,
        rng=DeterministicRandom(1),
    )
    grid = InProcessGrid(apps)

    update = _one_round(strategy, grid, size)

    # Each client's update (0.01 k per coordinate, norm 1.41 k) is clipped to 0.5:
    # every coordinate becomes 0.5 / sqrt(size), whatever k; the unweighted mean too.
    expected = clip / np.sqrt(size)
    noise = update - expected
    assert noise.std() == pytest.approx(z * clip / len(NODES), rel=0.02)
    assert abs(noise.mean()) < 4 * z * clip / len(NODES) / np.sqrt(size)
    assert all(CDP_RECORD_KEY in m.content for m in grid.sent)
    [(round_no, event, participants)] = sink.spends
    assert round_no == 1 and event is not None
    assert event.gaussian == GaussianSteps(noise_multiplier=z, sample_rate=1.0, steps=1)
    assert sorted(participants) == sorted(str(n) for n in NODES)


def _secure_strategy(
    sink: Sink, adaptive: AdaptiveClipping
) -> tuple[DifferentialPrivacy, list[SecAggRoundStats]]:
    stats: list[SecAggRoundStats] = []
    dp = ServerDp(
        central=CentralDpSettings(l2_clip=0.2, noise_multiplier=1.0, adaptive=adaptive),
        secure=True,
    )
    strategy = DifferentialPrivacy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=len(NODES)),
        dp=dp,
        sink=sink,
        rng=DeterministicRandom(2),
    )
    return strategy, stats


def test_adaptive_clipping_moves_the_clip_with_a_securely_summed_bit_count() -> None:
    size = 64
    apps = {n: _with_mods(_big_step(size, 0.1), secure=True) for n in NODES}  # norm 0.8
    sink = Sink()
    adaptive = AdaptiveClipping(count_noise_std=0.6, learning_rate=0.5)
    strategy, stats = _secure_strategy(sink, adaptive)
    inner = InProcessGrid(apps)
    grid = SecureAggregationGrid(inner, SecAggConfig(degree=6, threshold=4), on_round=stats.append)

    update = _one_round(strategy, grid, size)

    # Every update (norm 0.8) was clipped to 0.2: the mean is 0.2 / 8 per coordinate (plus noise).
    assert np.mean(update) == pytest.approx(0.2 / 8, abs=0.02)
    history = strategy.history[-1]
    # No bit was 1: the centred sum is -8 / 2, the noisy fraction 0 +- 0.6 / 8, and the
    # clip grows towards the norms.
    assert abs(history["noisy_unclipped_fraction"]) < 4 * 0.6 / 8
    # 32-bit ring: conditional rounding costs next to nothing over the clip.
    assert 0.2 <= history["l2_sensitivity"] < 0.2 * 1.0001
    assert strategy.clip > 0.2 and history["next_l2_clip"] == strategy.clip
    # The bits only ever travelled inside masked vectors: no reply carried metrics.
    assert stats[-1].survivors == 8
    assert sorted(sink.spends[0][2]) == sorted(str(n) for n in NODES)
    second = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    assert second[0].content.config_records[CDP_RECORD_KEY]["l2-clip"] == strategy.clip


def test_adaptive_clipping_is_refused_without_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="secure aggregation"):
        ServerDp(
            central=CentralDpSettings(
                l2_clip=1.0, noise_multiplier=1.0, adaptive=AdaptiveClipping()
            )
        )
    with pytest.raises(ConfigError, match="exactly one"):
        ServerDp()


def test_a_round_over_budget_is_refused_before_any_message_is_sent() -> None:
    apps = {n: _with_mods(_big_step(4, 0.1), secure=False) for n in NODES}
    grid = InProcessGrid(apps)
    strategy = DifferentialPrivacy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=8),
        dp=ServerDp(local=LocalDpSettings(l2_clip=1.0, noise_multiplier=1.0)),
        sink=Sink(refuse_after=0),
    )
    with pytest.raises(RuntimeError, match="over budget"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert grid.sent == []


def test_poisson_sampling_draws_each_node_independently() -> None:
    apps: dict[int, App] = {n: _big_step(1, 0.0) for n in range(1000)}
    strategy = DifferentialPrivacy(
        FedAvg(
            fraction_train=0.1, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=1000
        ),
        dp=ServerDp(
            central=CentralDpSettings(l2_clip=1.0, noise_multiplier=1.0), poisson_sampling=True
        ),
        sink=Sink(),
        rng=DeterministicRandom(3),
    )
    grid = InProcessGrid(apps)
    first = {
        m.metadata.dst_node_id
        for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    }
    second = {
        m.metadata.dst_node_id
        for m in strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
    }
    # Binomial(1000, 0.1): 100 +- 9.5; 5 standard deviations either way.
    assert 52 < len(first) < 148 and 52 < len(second) < 148
    assert first != second
    assert strategy.amplification.claimed and strategy.amplification.sample_rate == 0.1


def test_each_mechanism_says_which_amplification_it_may_claim() -> None:
    central = PrivacyMechanism.CENTRAL
    assert amplification(central, poisson_sampling=True, fraction=0.1).claimed
    plain = amplification(central, poisson_sampling=False, fraction=0.1)
    assert not plain.claimed and plain.sample_rate == 1.0 and "random.sample" in plain.reason
    assert not amplification(central, poisson_sampling=True, fraction=1.0).claimed
    ddp = amplification(PrivacyMechanism.DISTRIBUTED, poisson_sampling=True, fraction=0.1)
    assert not ddp.claimed and "knows" in ddp.reason
    assert not amplification(PrivacyMechanism.LOCAL, poisson_sampling=True, fraction=0.1).claimed
    # DP-SGD amplifies by each device's own batch rate, never by the client fraction.
    sgd = amplification(PrivacyMechanism.SAMPLE, poisson_sampling=True, fraction=0.1)
    assert sgd.sample_rate is None and "own Poisson batch sampling rate" in sgd.reason
    assert sgd.to_json()["sample_rate"] is None
    assert UNCLIPPED_METRIC == "fedge-unclipped"


def _failing(msg: Message, context: Context) -> Message:
    from flwr.app import Error

    del context
    return Message(Error(code=1, reason="device went offline"), reply_to=msg)


def test_a_round_with_failed_clients_updates_the_model_and_charges_only_survivors() -> None:
    size, clip, z = 10_000, 0.5, 1.0
    apps = {n: _with_mods(_big_step(size, 0.01), secure=False) for n in NODES}
    apps[203] = _failing
    apps[207] = _failing
    sink = Sink()
    counted: list[tuple[int, int, int]] = []
    strategy = DifferentialPrivacy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=8),
        dp=ServerDp(central=CentralDpSettings(l2_clip=clip, noise_multiplier=z)),
        sink=sink,
        on_replies=lambda r, ok, failed: counted.append((r, ok, failed)),
        rng=DeterministicRandom(5),
    )

    update = _one_round(strategy, InProcessGrid(apps), size)

    # Six survivors: the noise on their mean is z C / 6, and only they are charged.
    assert counted == [(1, 6, 2)]
    assert (update - clip / np.sqrt(size)).std() == pytest.approx(z * clip / 6, rel=0.03)
    [(_, event, participants)] = sink.spends
    assert event is not None and sorted(participants) == sorted(
        str(n) for n in NODES if n not in (203, 207)
    )


def test_each_dp_mode_names_one_mechanism_and_off_names_none() -> None:
    from fl_server.privacy import PrivacyMechanism
    from strategies.dp_mode import DpMode

    named = {mode: PrivacyMechanism.of(mode) for mode in DpMode if mode is not DpMode.OFF}
    assert len(set(named.values())) == len(named) == len(PrivacyMechanism)
    assert named[DpMode.DISTRIBUTED] is PrivacyMechanism.DISTRIBUTED
    with pytest.raises(ConfigError, match="no privacy mechanism"):
        PrivacyMechanism.of(DpMode.OFF)
