"""build_strategy: each rule is Flower's own class with the run's sampling and options."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedProx, FedTrimmedAvg

from fl_client.messages import decode_train_instruction
from fl_server.strategy_factory import build_strategy, strategy_class
from strategies.rules import AggregationRule, StrategySpec
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    _server_identity,
)

_SAMPLING = {
    "fraction_train": 1.0,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 2,
    "min_available_nodes": 2,
}


@pytest.mark.parametrize("rule", list(AggregationRule))
def test_every_rule_builds_with_the_run_sampling(rule: AggregationRule) -> None:
    strategy = build_strategy(StrategySpec(rule=rule), **_SAMPLING)

    assert type(strategy) is strategy_class(rule)
    assert strategy.min_train_nodes == 2


def test_options_reach_the_flower_strategy() -> None:
    adam = build_strategy(
        StrategySpec(rule=AggregationRule.FEDADAM, options=(("eta", 0.05),)), **_SAMPLING
    )
    trimmed = build_strategy(
        StrategySpec(rule=AggregationRule.TRIMMED_MEAN, options=(("beta", 0.3),)), **_SAMPLING
    )

    assert isinstance(adam, FedAdam) and adam.eta == 0.05
    assert isinstance(trimmed, FedTrimmedAvg) and trimmed.beta == 0.3


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [11, 12]


def test_fedprox_sends_its_mu_and_the_device_decodes_it() -> None:
    strategy = build_strategy(
        StrategySpec(rule=AggregationRule.FEDPROX, options=(("proximal_mu", 0.25),)), **_SAMPLING
    )
    assert isinstance(strategy, FedProx)
    arrays = ArrayRecord([np.zeros(3, dtype=np.float32)])

    messages = list(
        strategy.configure_train(1, arrays, ConfigRecord({"batch-size": 8}), _Grid())  # type: ignore[arg-type]
    )

    assert len(messages) == 2
    instruction = decode_train_instruction(messages[0].content)
    assert instruction.config.proximal_mu == 0.25
    assert instruction.config.batch_size == 8


def test_a_server_optimiser_steps_towards_the_mean() -> None:
    strategy = build_strategy(
        StrategySpec(rule=AggregationRule.FEDADAM, options=(("eta", 0.1),)), **_SAMPLING
    )
    start = ArrayRecord([np.zeros(4, dtype=np.float32)])
    list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))  # type: ignore[arg-type]
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([np.full(4, value, dtype=np.float32)]),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            dst_node_id=0,
            message_type="train",
        )
        for value in (1.0, 3.0)
    ]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    step = arrays.to_numpy_ndarrays()[0]
    assert np.all(step > 0) and np.all(step < 2.0)  # towards the mean 2.0, by Adam's step
