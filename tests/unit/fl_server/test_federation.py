"""The ServerApp: its privacy hooks and the per-round counts of its audit events."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sqlalchemy import Engine

from fl_client.budget import BUDGET_ERROR_CODE
from fl_client.dp_mod import DP_ERROR_CODE
from fl_client.secagg_mod import SECAGG_ERROR_CODE
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.checkpoints import CheckpointDir
from fl_server.federation import (
    REFUSAL_CATEGORIES,
    Evaluation,
    FederationConfig,
    _privacy_hooks,
    _ReplyCounts,
    make_server_app,
)
from fl_server.ledger import BudgetExceeded, PrivacyBudget, PrivacyLedger, RoundSpend
from fl_server.secagg import SecAggConfig
from strategies.accounting import zcdp_epsilon
from tests.unit.fl_server.test_secagg_grid import CONFIG, NODES, App, InProcessGrid, _honest, _train

DELTA = 1e-5
RHO = 0.02


def test_the_guard_refuses_a_round_that_would_take_a_survivor_past_its_lifetime_cap(
    engine: Engine,
) -> None:
    ledger = PrivacyLedger(engine)
    # sim-device-3 took part in two rounds of earlier runs; a third would pass the cap.
    for run_id in ("run-a", "run-b"):
        ledger.record_many(
            run_id,
            1,
            {"sim-device-3": RoundSpend(mechanism="distributed-ddg", rho=RHO)},
            delta=DELTA,
        )
    budget = PrivacyBudget(
        ledger=ledger,
        epsilon=100.0,
        delta=DELTA,
        client_lifetime_epsilon=zcdp_epsilon(2.5 * RHO, delta=DELTA),
    )
    guard, _ = _privacy_hooks(budget, _ReplyCounts(), AuditLog(engine), "run-c", "distributed-ddg")
    assert guard is not None

    guard(RoundSpend(mechanism="distributed-ddg", rho=RHO), ["sim-device-1", "sim-device-2"])
    with pytest.raises(BudgetExceeded, match=r"take client sim-device-3 past the lifetime budget"):
        guard(RoundSpend(mechanism="distributed-ddg", rho=RHO), ["sim-device-1", "sim-device-3"])
    assert ledger.entries("run-c") == []


def test_the_guard_checks_the_runs_budget_and_no_cap_without_one(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    ledger.record_many(
        "run-a", 1, {"sim-device-3": RoundSpend(mechanism="distributed-ddg", rho=1.0)}, delta=DELTA
    )
    budget = PrivacyBudget(ledger=ledger, epsilon=zcdp_epsilon(0.5, delta=DELTA), delta=DELTA)
    guard, _ = _privacy_hooks(budget, _ReplyCounts(), AuditLog(engine), "run-c", "distributed-ddg")
    assert guard is not None

    # No lifetime cap: the device's earlier spend is not checked.
    guard(RoundSpend(mechanism="distributed-ddg", rho=RHO), ["sim-device-3"])
    with pytest.raises(BudgetExceeded, match="would take the run to epsilon"):
        guard(RoundSpend(mechanism="distributed-ddg", rho=1.0), ["sim-device-3"])
    assert _privacy_hooks(None, _ReplyCounts(), AuditLog(engine), "run-c", "x")[0] is None


@pytest.fixture
def _server_identity() -> Iterator[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_the_refusal_codes_are_the_devices_own() -> None:
    assert REFUSAL_CATEGORIES == {
        SECAGG_ERROR_CODE: "secure_aggregation",
        DP_ERROR_CODE: "differential_privacy",
        BUDGET_ERROR_CODE: "privacy_budget",
    }


def _refusing(code: int) -> App:
    def app(msg: Message, context: Context) -> Message:
        del context
        return Message(Error(code=code, reason="refused by the device policy"), reply_to=msg)

    return app


def _run(
    apps: dict[int, App],
    engine: Engine,
    tmp_path: Path,
    secure: SecAggConfig | None = None,
    rounds: int = 2,
) -> list[dict[str, object]]:
    audit = AuditLog(engine)
    app = make_server_app(
        FederationConfig(
            num_rounds=rounds, min_train_nodes=len(apps), min_available_nodes=len(apps)
        ),
        initial_arrays=ArrayRecord({"w": Array(np.ones(6, np.float32))}),
        train_config=ConfigRecord(),
        evaluate=lambda arrays: Evaluation(loss=0.5, accuracy=0.5),
        checkpoints=CheckpointDir(tmp_path),
        audit=audit,
        run_id="run-counts",
        secure=secure,
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(InProcessGrid(apps), context)
    return [dict(e.payload) for e in audit.iter() if e.kind is AuditEventKind.ROUND_COMPLETED]


@pytest.mark.usefixtures("_server_identity")
def test_a_plain_round_counts_sampled_completed_dropped_and_refused(
    engine: Engine, tmp_path: Path
) -> None:
    apps: dict[int, App] = {101: _train, 102: _train, 103: _train}
    apps[104] = _refusing(BUDGET_ERROR_CODE)
    apps[105] = _refusing(DP_ERROR_CODE)
    apps[106] = _refusing(BUDGET_ERROR_CODE)
    apps[107] = _refusing(2)  # Flower's "ClientApp raised an exception": a drop, not a refusal

    rounds = _run(apps, engine, tmp_path)

    assert len(rounds) == 2
    for payload in rounds:
        assert {k: payload[k] for k in ("sampled", "completed", "dropped", "refused")} == {
            "sampled": 7,
            "completed": 3,
            "dropped": 4,
            "refused": {"differential_privacy": 1, "privacy_budget": 2},
        }
        assert (payload["replies"], payload["failures"]) == (3, 4)  # the older keys stay
        assert payload["secure_aggregation"] is None


@pytest.mark.usefixtures("_server_identity")
def test_a_secure_round_counts_the_survivors_and_who_refused_at_setup(
    engine: Engine, tmp_path: Path
) -> None:
    apps: dict[int, App] = {n: _honest() for n in NODES}
    # One refusal only: with degree 4 and threshold 3 every node keeps enough holders.
    apps[NODES[0]] = _refusing(SECAGG_ERROR_CODE)

    (payload,) = _run(apps, engine, tmp_path, secure=CONFIG, rounds=1)

    assert {k: payload[k] for k in ("sampled", "completed", "dropped", "refused")} == {
        "sampled": 8,
        "completed": 7,
        "dropped": 1,
        "refused": {"secure_aggregation": 1},
    }
    summary = payload["secure_aggregation"]
    assert isinstance(summary, dict)
    assert (summary["sampled"], summary["survivors"]) == (8, 7)
    assert (payload["replies"], payload["failures"]) == (7, 1)
