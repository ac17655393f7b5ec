"""The secure Grid against clients run in-process: exact means, misbehaviour, aborts, config."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedge.errors import ConfigError
from fl_client.policy import DevicePolicy
from fl_client.secagg_mod import make_secagg_mod
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg.encoding import EncodingConfig
from secure_agg.envelope import VECTOR_KEY, VECTOR_RECORD_KEY
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from strategies.ddp import DistributedDpSettings

App = Callable[[Message, Context], Message]
NODES = list(range(101, 109))
# The devices of these tests: semi-honest rounds, 10 % corrupt assumed (1 of 8), small
# DP noise accepted, and distributed DP's fewest honest contributors as the server's
# default for 8 sampled at 25 % dropout (6 expected survivors, 1 corrupt: 5).
POLICY = DevicePolicy(
    protocol=ProtocolPolicy(threat_model=ThreatModel.SEMI_HONEST),
    min_noise_multiplier=0.01,
    min_honest_contributors=5,
)
_ids = itertools.count()


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid(Grid):
    """Deliver each message to a node's app function in this process."""

    def __init__(self, apps: dict[int, App]) -> None:
        self.apps = apps
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in apps
        }
        self.sent: list[Message] = []

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            metadata = Metadata(
                run_id=1,
                message_id=f"m{next(_ids)}",
                src_node_id=0,
                dst_node_id=node,
                reply_to_message_id="",
                group_id=message.metadata.group_id,
                created_at=0.0,
                ttl=600.0,
                message_type=message.metadata.message_type,
            )
            delivered = Message(metadata=metadata, content=message.content)  # type: ignore[call-overload]
            replies.append(self.apps[node](delivered, self.contexts[node]))
        return replies


def _delta(node: int) -> np.ndarray:
    return np.linspace(-0.3, 0.3, 6, dtype=np.float32) * ((node % 5) - 2) / 2


def _train(msg: Message, context: Context) -> Message:
    arrays = msg.content.array_records["arrays"]
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + _delta(context.node_id))})
    metrics = MetricRecord({"num-examples": context.node_id - 100, "loss": 1.0})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def _honest() -> App:
    mod = make_secagg_mod(policy=POLICY)
    return lambda msg, context: mod(msg, context, _train)


def _round(
    apps: dict[int, App], config: SecAggConfig
) -> tuple[ArrayRecord | None, list[Message], list[SecAggRoundStats]]:
    stats: list[SecAggRoundStats] = []
    grid = SecureAggregationGrid(InProcessGrid(apps), config, on_round=stats.append)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(apps))
    arrays = ArrayRecord({"w": Array(np.ones(6, np.float32))})
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages, timeout=10))
    aggregated, _ = strategy.aggregate_train(1, replies)
    return aggregated, replies, stats


CONFIG = SecAggConfig(clip_range=0.5, weight_cap=100, degree=4, threshold=3)


def _expected(nodes: list[int]) -> np.ndarray:
    weights = np.array([n - 100 for n in nodes], dtype=np.float64)
    total = np.sum([w * _delta(n) for n, w in zip(nodes, weights, strict=True)], axis=0)
    return np.asarray(1 + total / weights.sum())


def test_the_strategy_gets_the_weighted_mean_and_nothing_else() -> None:
    aggregated, replies, [stats] = _round({n: _honest() for n in NODES}, CONFIG)

    assert aggregated is not None
    bound = EncodingConfig(clip_range=0.5, max_clients=8, weight_cap=100).error_bound
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(NODES), atol=bound)
    assert len(replies) == 1
    assert stats.survivors == 8 and stats.total_weight == sum(n - 100 for n in NODES)
    assert (stats.degree, stats.threshold, stats.server_round) == (4, 3, 1)


def _bad_vector(node: int) -> App:
    mod = make_secagg_mod(policy=POLICY)

    def app(msg: Message, context: Context) -> Message:
        reply = mod(msg, context, _train)
        if VECTOR_RECORD_KEY in reply.content:
            reply.content[VECTOR_RECORD_KEY] = ArrayRecord(
                {VECTOR_KEY: Array(np.zeros(3, dtype=np.uint32))}
            )
        return reply

    return app


def test_a_client_sending_a_malformed_vector_is_left_out_and_reported() -> None:
    apps = {n: _honest() for n in NODES}
    apps[104] = _bad_vector(104)

    aggregated, replies, [stats] = _round(apps, CONFIG)

    assert aggregated is not None
    survivors = [n for n in NODES if n != 104]
    bound = EncodingConfig(clip_range=0.5, max_clients=8, weight_cap=100).error_bound
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(survivors), atol=bound)
    assert "wrong type or length" in stats.failures[104]
    assert sum(r.has_error() for r in replies) == 1


def _crashing(msg: Message, context: Context) -> Message:
    del context
    return Message(Error(code=1, reason="device crashed"), reply_to=msg)


def test_too_many_dropouts_abort_the_round_and_keep_the_model() -> None:
    apps: dict[int, App] = {n: _honest() for n in NODES}
    for node in NODES[:5]:
        apps[node] = _crashing

    aggregated, replies, [stats] = _round(apps, CONFIG)

    assert aggregated is None, "the strategy keeps the previous model"
    assert all(r.has_error() for r in replies) and len(replies) == len(NODES)
    assert stats.aborted is not None and "advertise-keys" in stats.aborted


def test_evaluate_messages_pass_through_untouched() -> None:
    inner = InProcessGrid({n: _train for n in NODES})
    grid = SecureAggregationGrid(inner, CONFIG)
    message = Message(
        content=RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(6, np.float32))})}),
        dst_node_id=101,
        message_type=MessageType.EVALUATE,
    )

    replies = list(grid.send_and_receive([message]))

    assert len(replies) == 1 and inner.sent == [message]


def test_a_round_below_the_minimum_is_refused() -> None:
    grid = SecureAggregationGrid(InProcessGrid({101: _honest()}), CONFIG)
    message = Message(
        content=RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(6, np.float32))})}),
        dst_node_id=101,
        message_type=MessageType.TRAIN,
    )

    with pytest.raises(ConfigError, match="at least 2 clients"):
        grid.send_and_receive([message])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"degree": 4}, "both degree and threshold"),
        ({"min_clients": 1}, "min_clients"),
        ({"threat_model": ThreatModel.ACTIVE}, "authority"),
        ({"dropout_fraction": 1.0}, "dropout_fraction"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"ring_bits": 8, "weight_cap": 1000}, "widen the ring"),
    ],
)
def test_invalid_configs_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecAggConfig(**kwargs)  # type: ignore[arg-type]


def _reshaping(msg: Message, context: Context) -> Message:
    del context
    local = ArrayRecord({"w": Array(np.zeros(7, np.float32))})
    metrics = MetricRecord({"num-examples": 3})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def test_clients_failing_in_training_drop_at_masked_input_and_are_recovered() -> None:
    apps = {n: _honest() for n in NODES}
    crash_mod, shape_mod = make_secagg_mod(policy=POLICY), make_secagg_mod(policy=POLICY)
    apps[102] = lambda msg, context: crash_mod(msg, context, _crashing)
    apps[106] = lambda msg, context: shape_mod(msg, context, _reshaping)

    # Six neighbours each, threshold 3: any two dropouts leave every survivor enough.
    config = SecAggConfig(clip_range=0.5, weight_cap=100, degree=6, threshold=3)
    aggregated, _, [stats] = _round(apps, config)

    assert aggregated is not None
    survivors = [n for n in NODES if n not in (102, 106)]
    bound = EncodingConfig(clip_range=0.5, max_clients=8, weight_cap=100).error_bound
    np.testing.assert_allclose(aggregated["w"].numpy(), _expected(survivors), atol=bound)
    assert stats.failures[102].startswith("masked-input: device crashed")
    assert "changed shape" in stats.failures[106]


def _zero_update(msg: Message, context: Context) -> Message:
    del context
    arrays = msg.content.array_records["arrays"]
    metrics = MetricRecord({"num-examples": 1})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _ddp_round(
    apps: dict[int, App], settings: DistributedDpSettings, size: int
) -> tuple[np.ndarray, SecAggRoundStats]:
    stats: list[SecAggRoundStats] = []
    config = SecAggConfig(degree=6, threshold=3, distributed_dp=settings, dropout_fraction=0.25)
    grid = SecureAggregationGrid(InProcessGrid(apps), config, on_round=stats.append)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(apps))
    arrays = ArrayRecord({"w": Array(np.ones(size, np.float32))})
    replies = list(grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    return aggregated["w"].numpy().astype(np.float64) - 1.0, stats[0]


def _ddp_app(train: App) -> App:
    mod = make_secagg_mod(policy=POLICY)
    return lambda msg, context: mod(msg, context, train)


def test_distributed_dp_gives_the_unweighted_mean_plus_little_noise() -> None:
    settings = DistributedDpSettings(l2_clip=1.0, noise_multiplier=0.01)

    mean_update, stats = _ddp_round({n: _ddp_app(_train) for n in NODES}, settings, 6)

    expected = np.mean([_delta(n) for n in NODES], axis=0)
    # Noise of the mean: z c / sqrt(6 expected) * sqrt(8) / 8 = 0.0014 per coordinate.
    np.testing.assert_allclose(mean_update, expected, atol=0.01)
    assert stats.dp is not None and stats.dp["rho"] > 0
    assert stats.total_weight == len(NODES)


def test_noise_that_drowns_the_mean_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    apps = {n: _ddp_app(_zero_update) for n in NODES}
    # z c = 0.01 over 6 values: the mean's noise is a sliver of the clip, no warning.
    _ddp_round(apps, DistributedDpSettings(l2_clip=1.0, noise_multiplier=0.01), 6)
    assert "expect slow or no learning" not in caplog.text
    # z c = 1 over 16,384 values and 8 clients (each adding z c / sqrt(5)): noise of norm
    # ~20 clips on the mean, in each of two rounds of one run; warned about once.
    settings = DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0)
    config = SecAggConfig(degree=6, threshold=3, distributed_dp=settings, dropout_fraction=0.25)
    grid = SecureAggregationGrid(InProcessGrid(apps), config)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(apps))
    arrays = ArrayRecord({"w": Array(np.ones(16_384, np.float32))})
    for server_round in (1, 2):
        list(
            grid.send_and_receive(
                strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            )
        )
    warnings = [r for r in caplog.records if "expect slow or no learning" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert "8 clients, 16384 parameters" in warnings[0].getMessage()


def test_the_plan_is_checked_for_drowning_noise_before_any_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0)
    config = SecAggConfig(degree=6, threshold=3, distributed_dp=settings, dropout_fraction=0.25)
    apps = {n: _ddp_app(_zero_update) for n in NODES}

    # 8 clients, 5 honest: each adds 1 / sqrt(5); the mean's noise is sqrt(8 / 5) sqrt(d) / 8.
    quiet = SecureAggregationGrid(InProcessGrid(apps), config)
    quiet.check_plan(clients=8, parameters=1_000)  # ~5 clips: no warning
    SecureAggregationGrid(InProcessGrid(apps), SecAggConfig(degree=6, threshold=3)).check_plan(
        clients=8, parameters=10_000_000
    )  # no distributed DP: nothing to say
    assert "expect slow or no learning" not in caplog.text

    grid = SecureAggregationGrid(InProcessGrid(apps), config)
    grid.check_plan(clients=8, parameters=16_384)
    warnings = [r for r in caplog.records if "expect slow or no learning" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    expected = (8 / 5) ** 0.5 * 16_384**0.5 / 8
    assert f"~{expected:.3g}" in warnings[0].getMessage()
    assert "8 clients a round" in warnings[0].getMessage()
    # The run's rounds then do not repeat it.
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(apps))
    arrays = ArrayRecord({"w": Array(np.ones(16_384, np.float32))})
    list(grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
    assert len([r for r in caplog.records if "expect slow" in r.getMessage()]) == 1


def test_distributed_dp_with_dropouts_carries_the_configured_noise_and_no_more() -> None:
    settings = DistributedDpSettings(l2_clip=1.0, noise_multiplier=1.0)
    apps = {n: _ddp_app(_zero_update) for n in NODES}
    apps[102] = _ddp_app(_crashing)
    apps[106] = _ddp_app(_crashing)

    noise, stats = _ddp_round(apps, settings, 4096)

    # 8 sampled, 25 % dropout expected, 1 corrupt assumed: each client adds z c / sqrt(5),
    # so the 5 honest clients the devices count on carry exactly z c = 1. 6 survive: the
    # sum carries sqrt(6 / 5) and the mean sqrt(6 / 5) / 6 (float32 weights round a little).
    assert stats.survivors == 6
    assert stats.dp is not None
    assert stats.dp["honest_noise_std_of_sum"] == pytest.approx(1.0)
    assert stats.dp["noise_std_of_sum"] == pytest.approx((6 / 5) ** 0.5)
    assert noise.std() == pytest.approx((6 / 5) ** 0.5 / 6, rel=0.06)
    assert abs(noise.mean()) < 5 * (1 / 6) / 64
