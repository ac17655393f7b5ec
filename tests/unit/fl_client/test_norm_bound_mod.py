"""The device's norm-bound mod: bounds the update it hands outwards, never crashes the client."""

from __future__ import annotations

from collections.abc import Callable

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
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import FedAvg

from fedge.errors import ConfigError
from fl_client.norm_bound_mod import NORM_BOUND_ERROR_CODE, make_norm_bound_mod
from fl_client.secagg_mod import make_secagg_mod
from fl_server.secagg import SecAggConfig, SecureAggregationGrid
from tests.helpers import delivered
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    NODES,
    POLICY,
    InProcessGrid,
    _server_identity,
)

Handler = Callable[[Message, Context], Message]
GLOBAL = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)


def _message(
    message_type: str = MessageType.TRAIN, arrays: dict[str, ArrayRecord] | None = None
) -> Message:
    records = {"arrays": ArrayRecord({"w": Array(GLOBAL.copy())})} if arrays is None else arrays
    content = RecordDict({**records, "config": ConfigRecord({"server-round": 1})})
    return delivered(content, message_type)


def _context() -> Context:
    return Context(
        run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )


def _stepping(step: np.ndarray, **extra: ArrayRecord) -> Handler:
    """Train by adding ``step`` to the weights; reply with metrics (and any extra records)."""

    def train(msg: Message, context: Context) -> Message:
        del context
        arrays = msg.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        local = ArrayRecord({"w": Array(arrays["w"].numpy() + step.astype(np.float32))})
        metrics = MetricRecord({"num-examples": 50, "train-loss": 0.3})
        content = RecordDict({"arrays": local, "metrics": metrics, **extra})
        return Message(content=content, reply_to=msg)

    return train


def _weights(reply: Message) -> np.ndarray:
    arrays = reply.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    return arrays["w"].numpy()


def test_a_boosted_update_is_bounded_and_keeps_its_direction_and_metrics() -> None:
    step = np.array([30.0, -40.0, 0.0, 0.0])  # norm 50

    reply = make_norm_bound_mod(2.0)(_message(), _context(), _stepping(step))

    assert not reply.has_error()
    update = _weights(reply).astype(np.float64) - GLOBAL
    assert np.linalg.norm(update) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(update, step / 25.0, rtol=1e-6, atol=1e-6)
    assert _weights(reply).dtype == np.float32
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    assert dict(metrics) == {"num-examples": 50, "train-loss": 0.3}


def test_a_short_update_and_other_records_pass_unchanged() -> None:
    step = np.array([0.1, 0.0, -0.1, 0.0])
    extra = ArrayRecord({"b": Array(np.ones(2, dtype=np.float32))})
    mod = make_norm_bound_mod(2.0)

    reply = mod(_message(), _context(), _stepping(step))

    np.testing.assert_array_equal(_weights(reply), GLOBAL + step.astype(np.float32))
    assert list(reply.content.keys()) == ["arrays", "metrics"]
    # A reply with two ArrayRecords cannot be bounded: refused, never sent unbounded.
    refused = mod(_message(), _context(), _stepping(step, extra=extra))
    assert refused.has_error() and refused.error.code == NORM_BOUND_ERROR_CODE
    assert "the train reply must carry exactly one ArrayRecord, got 2" in str(refused.error.reason)


def test_messages_other_than_train_pass_through() -> None:
    seen: list[Message] = []

    def evaluate(msg: Message, context: Context) -> Message:
        seen.append(msg)
        metrics = MetricRecord({"num-examples": 5})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    msg = _message(MessageType.EVALUATE)
    reply = make_norm_bound_mod(0.5)(msg, _context(), evaluate)

    assert seen == [msg] and not reply.has_error()


def test_a_request_without_one_model_is_refused_before_training() -> None:
    trained: list[Message] = []

    def train(msg: Message, context: Context) -> Message:
        trained.append(msg)
        return _stepping(np.zeros(4))(msg, context)

    reply = make_norm_bound_mod(1.0)(_message(arrays={}), _context(), train)

    assert trained == []
    assert reply.has_error() and reply.error.code == NORM_BOUND_ERROR_CODE
    assert reply.error.reason == (
        "norm bound: the train message must carry exactly one ArrayRecord, got 0"
    )


@pytest.mark.parametrize(
    ("local", "match"),
    [
        ({"v": Array(GLOBAL.copy())}, "the trained model's arrays differ from the global model's"),
        ({"w": Array(np.ones(3, dtype=np.float32))}, "array 'w' changed shape during training"),
        (
            {"w": Array(np.array([np.nan, 0, 0, 0], dtype=np.float32))},
            "NaN or infinite",
        ),
    ],
)
def test_a_reply_that_cannot_be_bounded_becomes_an_error_reply(
    local: dict[str, Array], match: str
) -> None:
    def train(msg: Message, context: Context) -> Message:
        content = RecordDict(
            {"arrays": ArrayRecord(local), "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(content=content, reply_to=msg)

    reply = make_norm_bound_mod(1.0)(_message(), _context(), train)

    assert reply.has_error() and reply.error.code == NORM_BOUND_ERROR_CODE
    assert match in str(reply.error.reason)


def test_an_error_reply_of_the_training_is_handed_on() -> None:
    def failing(msg: Message, context: Context) -> Message:
        return Message(Error(code=7, reason="out of memory"), reply_to=msg)

    reply = make_norm_bound_mod(1.0)(_message(), _context(), failing)

    assert reply.has_error() and reply.error.code == 7


@pytest.mark.parametrize(
    ("bound", "match"),
    [
        (0.0, r"^max_l2 must be a finite number > 0, got 0.0$"),
        (-1.0, r"^max_l2 must be a finite number > 0"),
        (float("inf"), r"^max_l2 must be a finite number > 0"),
        (float("nan"), r"^max_l2 must be a finite number > 0"),
        (True, r"^max_l2 must be a number, got bool$"),
        ("1", r"^max_l2 must be a number, got str$"),
    ],
)
def test_a_bad_bound_is_refused(bound: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_norm_bound_mod(bound)


def _secure_round(bound: float | None) -> np.ndarray:
    """Return the aggregate update of a secure round in which node 104 boosts its update."""
    apps: dict[int, Handler] = {}
    for node in NODES:
        step = np.full(6, 20.0) if node == 104 else np.full(6, 0.01 * (node - 100))
        mods = [make_secagg_mod(policy=POLICY)]
        if bound is not None:
            mods.append(make_norm_bound_mod(bound))  # below the secure mod: before masking
        apps[node] = _chain(mods, _stepping(step))
    # A wide clip range, so the encoding's own per-coordinate clip does not hide the attack.
    config = SecAggConfig(clip_range=64.0, weight_cap=100, degree=4, threshold=3)
    grid = SecureAggregationGrid(InProcessGrid(apps), config)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(NODES))
    start = ArrayRecord({"w": Array(np.zeros(6, np.float32))})
    replies = list(grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord(), grid)))
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    return aggregated["w"].numpy().astype(np.float64)


def _chain(mods: list[Mod], train: Handler) -> Handler:
    """Compose mods as Flower's ClientApp does: the first is outermost."""
    handler = train
    for mod in reversed(mods):
        handler = _wrap(mod, handler)
    return handler


def _wrap(mod: Mod, inner: Handler) -> Handler:
    return lambda msg, context: mod(msg, context, inner)


def test_the_bound_holds_under_secure_aggregation() -> None:
    honest = np.mean([0.01 * (n - 100) for n in NODES if n != 104])

    unbounded = _secure_round(None)
    bounded = _secure_round(1.0)

    # Equal weights (50 examples each): the booster moves the mean by its update / 8.
    assert np.all(unbounded - honest > 2.0)
    # Bounded to norm 1 it moves the mean by at most 1 / 8 (plus the honest 0.04 it lost).
    assert np.linalg.norm(bounded - honest) <= 1.0 / len(NODES) + 0.05
