"""The ClientApp's DP-SGD rounds with a target epsilon: one noise search per device and run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from edge_runtime.model_spec import ModelSpec
from edge_runtime.models import InputEncoding
from fl_client import dp_sgd
from fl_client.app import make_client_app
from fl_client.budget import BUDGET_ERROR_CODE, ClientBudget
from fl_client.noise_plan import NOISE_PLAN_STATE_KEY
from fl_client.policy import DevicePolicy
from strategies.accounting import AccountantKind
from strategies.sample_dp import DPSGD_RECORD_KEY, SampleDpSettings
from tests.helpers import delivered

SPEC = ModelSpec(
    import_path="simulations.tabular:SensorMLP",
    kwargs=(("hidden_units", (8,)), ("in_features", 5), ("num_classes", 3)),
    encoding=InputEncoding.FLOAT32,
)
POLICY = DevicePolicy(protocol=None)
SIGMA = 1.7  # what the stand-in search answers
ROUNDS = 3


class Features:
    """A picklable provider of float feature rows, 24 or 40 a partition (two sample rates)."""

    def __call__(self, partition_id: int, num_partitions: int) -> tuple[Any, Any]:
        size = 24 if partition_id % 2 == 0 else 40
        rng = np.random.default_rng(partition_id)
        return rng.normal(size=(size, 5)).astype(np.float32), np.arange(size) % 3


@pytest.fixture
def searches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Count Opacus' noise searches (behind the per-process memo, which starts and ends empty)."""
    calls: list[dict[str, Any]] = []

    def search(**kwargs: Any) -> float:
        calls.append(kwargs)
        return SIGMA

    dp_sgd._cached_noise_multiplier.cache_clear()
    monkeypatch.setattr(dp_sgd, "get_noise_multiplier", search)
    yield calls
    dp_sgd._cached_noise_multiplier.cache_clear()


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )


def _round(server_round: int) -> Message:
    settings = SampleDpSettings(target_epsilon=3.0, total_epochs=ROUNDS)
    content = RecordDict(
        {
            "arrays": ArrayRecord(SPEC.build(seed=0).state_dict()),
            "config": ConfigRecord(
                {"server-round": server_round, "batch-size": 8, "learning-rate": 0.05}
            ),
            DPSGD_RECORD_KEY: ConfigRecord(dict(settings.to_fields())),
        }
    )
    return delivered(content)


def _budget(directory: Path, epsilon: float) -> ClientBudget:
    return ClientBudget(directory=directory, epsilon=epsilon, accountant=AccountantKind.PRV)


def test_a_device_searches_its_noise_once_per_run(
    searches: list[dict[str, Any]], tmp_path: Path
) -> None:
    app = make_client_app(Features(), model=SPEC, budget=_budget(tmp_path, 50.0), policy=POLICY)
    context = _context(0)

    replies = []
    for server_round in range(1, ROUNDS + 1):
        # Each round from a fresh process, as Flower's simulation may serve it:
        # only the device's Context goes along.
        dp_sgd._cached_noise_multiplier.cache_clear()
        replies.append(app(_round(server_round), context))

    assert not any(reply.has_error() for reply in replies)
    assert [r.content.metric_records["metrics"]["dp-noise-multiplier"] for r in replies] == [
        SIGMA
    ] * ROUNDS
    # 24 examples, batches of 8: q = 1/3, 3 steps a round, the target over the run's 3 rounds.
    assert searches == [
        {
            "target_epsilon": 3.0,
            "target_delta": 1e-5,
            "sample_rate": 1 / 3,
            "steps": 3 * ROUNDS,
            "accountant": "prv",
        }
    ]
    assert NOISE_PLAN_STATE_KEY in context.state


def test_devices_with_other_partitions_search_their_own_noise(
    searches: list[dict[str, Any]], tmp_path: Path
) -> None:
    app = make_client_app(Features(), model=SPEC, budget=_budget(tmp_path, 50.0), policy=POLICY)
    contexts = [_context(0), _context(1)]

    for server_round in (1, 2):
        for context in contexts:
            dp_sgd._cached_noise_multiplier.cache_clear()
            assert not app(_round(server_round), context).has_error()

    assert [(call["sample_rate"], call["steps"]) for call in searches] == [
        (8 / 24, 3 * ROUNDS),
        (8 / 40, 5 * ROUNDS),
    ]


def test_a_declining_device_searches_once_and_keeps_its_plan(
    searches: list[dict[str, Any]], tmp_path: Path
) -> None:
    # Whether a round fits a budget depends on its noise: the search comes first, and a
    # device that declines keeps the plan for the rest of the run all the same.
    budget = _budget(tmp_path, 0.01)
    context = _context(0)
    app = make_client_app(Features(), model=SPEC, budget=budget, policy=POLICY)

    replies = []
    for server_round in (1, 2):
        dp_sgd._cached_noise_multiplier.cache_clear()
        replies.append(app(_round(server_round), context))

    for reply in replies:
        assert reply.has_error()
        assert reply.error.code == BUDGET_ERROR_CODE
        assert "this round would take the device to epsilon" in str(reply.error.reason)
    assert len(searches) == 1
    assert budget.ledger_for(context).entries() == []


def test_noise_derived_from_a_target_below_the_policy_floor_is_declined(
    searches: list[dict[str, Any]], tmp_path: Path
) -> None:
    # The stand-in search answers sigma 1.7; this device never trains with less than 2.
    strict = DevicePolicy(protocol=None, min_noise_multiplier=2.0)
    budget = _budget(tmp_path, 50.0)
    context = _context(0)
    app = make_client_app(Features(), model=SPEC, budget=budget, policy=strict)

    reply = app(_round(1), context)

    assert reply.has_error()
    assert "noise multiplier 1.7 is below the device policy's 2" in str(reply.error.reason)
    assert len(searches) == 1
    assert budget.ledger_for(context).entries() == []


def test_a_target_no_noise_reaches_is_declined(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def unreachable(**kwargs: Any) -> float:
        raise ValueError("The privacy budget is too low.")

    dp_sgd._cached_noise_multiplier.cache_clear()
    monkeypatch.setattr(dp_sgd, "get_noise_multiplier", unreachable)
    budget = _budget(tmp_path, 50.0)
    context = _context(0)
    app = make_client_app(Features(), model=SPEC, budget=budget, policy=POLICY)

    reply = app(_round(1), context)

    dp_sgd._cached_noise_multiplier.cache_clear()
    assert reply.has_error()
    assert "no noise multiplier reaches epsilon 3.0" in str(reply.error.reason)
    assert budget.ledger_for(context).entries() == []
