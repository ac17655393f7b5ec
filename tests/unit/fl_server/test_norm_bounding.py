"""Server-side norm bounding around any strategy, and Flower's robust rules on fedge replies."""

from __future__ import annotations

import logging
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
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedge.errors import ConfigError
from fl_server.norm_bounding import NormBounding, NormBoundingRound
from fl_server.secagg_config import PARTICIPANTS_FIELD, PARTICIPANTS_RECORD_KEY
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    InProcessGrid,
    _server_identity,
)

App = Callable[[Message, Context], Message]
HONEST = 6
BYZANTINE_NODE = 7
# The honest clients' mean update: every weight moves by about this much.
STEP = {"w": np.full((3, 2), 0.1), "b": np.array([-0.2, 0.05])}


def _global() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.ones((3, 2), np.float32)), "b": Array(np.zeros(2, np.float32))}
    )


def _update(node: int) -> dict[str, np.ndarray]:
    """Honest nodes: STEP plus a small, node-specific wobble; the Byzantine node: -50 STEP."""
    if node == BYZANTINE_NODE:
        return {k: -50.0 * v for k, v in STEP.items()}
    wobble = 0.01 * (node - HONEST / 2)
    return {k: v + wobble for k, v in STEP.items()}


def _honest_model() -> dict[str, np.ndarray]:
    start = _global()
    return {
        k: start[k].numpy() + np.mean([_update(n)[k] for n in range(HONEST)], axis=0) for k in STEP
    }


def _request(node: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    message: Message = Message(metadata=metadata, content=RecordDict())  # type: ignore[call-overload]
    return message


def _reply(node: int, arrays: ArrayRecord | None = None) -> Message:
    """A fedge train reply: one "arrays" ArrayRecord, one "metrics" MetricRecord."""
    if arrays is None:
        start = _global()
        arrays = ArrayRecord(
            {k: Array((start[k].numpy() + u).astype(np.float32)) for k, u in _update(node).items()}
        )
    metrics = MetricRecord({"num-examples": 40, "train-loss": 0.5})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=_request(node))


def _replies() -> list[Message]:
    return [_reply(n) for n in [*range(HONEST), BYZANTINE_NODE]]


def _distance(arrays: ArrayRecord | None, model: dict[str, np.ndarray]) -> float:
    assert arrays is not None
    return float(np.sqrt(sum(np.sum((arrays[k].numpy() - model[k]) ** 2) for k in model)))


def _configured(strategy: Strategy) -> Strategy:
    grid = InProcessGrid({n: _train for n in range(HONEST)})
    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), grid))
    assert messages
    return strategy


def _train(msg: Message, context: Context) -> Message:
    return _reply(context.node_id)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedTrimmedAvg(beta=0.2),
        FedMedian,
        lambda: Krum(num_malicious_nodes=1),
        lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
        lambda: Bulyan(num_malicious_nodes=1),
        lambda: _configured(NormBounding(FedAvg(), 0.5)),
        lambda: _configured(NormBounding(FedAvg(), 10.0, median_factor=1.5)),
    ],
    ids=["trimmed-mean", "median", "krum", "multikrum", "bulyan", "bound", "median-bound"],
)
def test_a_robust_rule_lands_near_the_honest_mean_where_fedavg_does_not(
    make: Callable[[], Strategy],
) -> None:
    honest = _honest_model()
    # The rules take arrays out of the replies they read: each gets its own.
    plain, _ = FedAvg().aggregate_train(1, _replies())

    robust, metrics = make().aggregate_train(1, _replies())

    assert _distance(plain, honest) > 1.0  # the scaled reply drags the mean away
    assert _distance(robust, honest) < 0.2
    assert metrics is not None and metrics["train-loss"] == pytest.approx(0.5)


def test_every_update_is_bounded_relative_to_the_round_s_global_model() -> None:
    strategy = _configured(NormBounding(FedAvg(), 0.5))
    assert isinstance(strategy, NormBounding)
    replies = _replies()

    arrays, _ = strategy.aggregate_train(1, replies)

    [record] = strategy.history
    assert record == NormBoundingRound(server_round=1, bound=0.5, bounded=7, clipped=1, left_out=0)
    # The Byzantine update -50 STEP keeps its direction at norm 0.5; FedAvg (equal weights)
    # averages it with the six honest updates, relative to the round's global model.
    norm = np.sqrt(sum(np.sum(v**2) for v in STEP.values()))
    assert arrays is not None and list(arrays.keys()) == ["w", "b"]
    for key, step in STEP.items():
        honest = np.sum([_update(n)[key] for n in range(HONEST)], axis=0)
        expected = _global()[key].numpy() + (honest - 0.5 * step / norm) / 7
        np.testing.assert_allclose(arrays[key].numpy(), expected, atol=1e-6)
        assert arrays[key].numpy().dtype == np.float32
    # The replies the caller holds are left alone.
    sent = replies[-1].content.array_records["arrays"]
    assert sent["w"].numpy()[0, 0] == pytest.approx(1 - 5.0)


def test_the_median_bound_follows_the_honest_norms_and_max_l2_caps_it() -> None:
    honest_norms = [
        float(np.sqrt(sum(np.sum(u**2) for u in _update(n).values()))) for n in range(HONEST)
    ]
    adaptive = _configured(NormBounding(FedAvg(), 10.0, median_factor=2.0))
    capped = _configured(NormBounding(FedAvg(), 0.1, median_factor=2.0))
    assert isinstance(adaptive, NormBounding) and isinstance(capped, NormBounding)

    adaptive.aggregate_train(1, _replies())
    capped.aggregate_train(1, _replies())

    median = float(
        np.median([*honest_norms, 50 * np.sqrt(sum(np.sum(v**2) for v in STEP.values()))])
    )
    assert adaptive.history[0].bound == pytest.approx(2.0 * median, rel=1e-5)
    assert adaptive.history[0].clipped == 1
    assert capped.history[0].bound == 0.1 and capped.history[0].clipped == 7


def test_replies_that_cannot_be_bounded_are_left_out_and_errors_handed_on() -> None:
    strategy = _configured(NormBounding(FedAvg(), 0.5))
    assert isinstance(strategy, NormBounding)
    reshaped = ArrayRecord({"w": Array(np.ones((2, 3), np.float32)), "b": Array(np.zeros(2))})
    nan = ArrayRecord(
        {"w": Array(np.full((3, 2), np.nan, np.float32)), "b": Array(np.zeros(2, np.float32))}
    )
    two = _reply(2)
    two.content["extra"] = ArrayRecord({"x": Array(np.ones(1))})
    failed = Message(Error(code=9, reason="crashed"), reply_to=_request(5))

    arrays, _ = strategy.aggregate_train(
        1, [_reply(0), _reply(1, reshaped), _reply(3, nan), two, failed, _reply(4)]
    )

    assert arrays is not None
    assert strategy.history[0].bounded == 2 and strategy.history[0].left_out == 3


def test_a_secure_aggregate_is_refused() -> None:
    strategy = _configured(NormBounding(FedAvg(), 0.5))
    aggregate = _reply(0)
    aggregate.content[PARTICIPANTS_RECORD_KEY] = ConfigRecord({PARTICIPANTS_FIELD: ["a", "b"]})

    with pytest.raises(ConfigError, match="bound on the device instead"):
        strategy.aggregate_train(1, [aggregate])


def test_a_round_aggregated_without_its_configuration_is_refused() -> None:
    strategy = _configured(NormBounding(FedAvg(), 0.5))

    with pytest.raises(ConfigError, match=r"^round 2 was aggregated but never configured$"):
        strategy.aggregate_train(2, _replies())


def test_evaluation_and_summary_are_delegated(caplog: pytest.LogCaptureFixture) -> None:
    inner = FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=2, min_available_nodes=2)
    strategy = NormBounding(inner, 0.5, median_factor=1.5)
    grid = InProcessGrid({n: _train for n in range(3)})
    evaluations = list(strategy.configure_evaluate(1, _global(), ConfigRecord(), grid))
    replies = [
        Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": a})}),
            reply_to=_request(n),
        )
        for n, a in enumerate([0.2, 0.4])
    ]

    metrics = strategy.aggregate_evaluate(1, replies)
    with caplog.at_level(logging.INFO, logger="fl_server.norm_bounding"):
        strategy.summary()

    assert len(evaluations) == 3
    assert metrics is not None and metrics["accuracy"] == pytest.approx(0.3)
    assert strategy.strategy is inner
    assert "norm bound: L2 min(0.5, 1.5 x median)" in caplog.text
    assert repr(strategy).startswith("NormBounding(") and "median x1.5" in repr(strategy)


@pytest.mark.parametrize(
    ("strategy", "max_l2", "median_factor", "match"),
    [
        (object(), 1.0, None, r"^strategy must be a flwr.serverapp.strategy.Strategy, got object$"),
        (NormBounding(FedAvg(), 1.0), 1.0, None, "already bounds update norms"),
        (FedAvg(), 0.0, None, r"^max_l2 must be a finite number > 0, got 0.0$"),
        (FedAvg(), float("inf"), None, r"^max_l2 must be a finite number > 0"),
        (FedAvg(), True, None, r"^max_l2 must be a number, got bool$"),
        (FedAvg(), 1.0, -1.0, r"^median_factor must be a finite number > 0, got -1.0$"),
        (FedAvg(), 1.0, "2", r"^median_factor must be a number, got str$"),
    ],
)
def test_bad_arguments_are_refused(
    strategy: object, max_l2: float, median_factor: float | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        NormBounding(strategy, max_l2, median_factor=median_factor)  # type: ignore[arg-type]
