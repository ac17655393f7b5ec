"""The ServerApp's privacy hooks: the secure Grid's guard checks the run and each survivor."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from fl_server.audit import AuditLog
from fl_server.federation import _privacy_hooks, _ReplyCounts
from fl_server.ledger import BudgetExceeded, PrivacyBudget, PrivacyLedger, RoundSpend
from strategies.accounting import zcdp_epsilon

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
    guard, _ = _privacy_hooks(budget, _ReplyCounts(), AuditLog(engine), "run-c")
    assert guard is not None

    guard(RHO, ["sim-device-1", "sim-device-2"])
    with pytest.raises(BudgetExceeded, match=r"take client sim-device-3 past the lifetime budget"):
        guard(RHO, ["sim-device-1", "sim-device-3"])
    assert ledger.entries("run-c") == []


def test_the_guard_checks_the_runs_budget_and_no_cap_without_one(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    ledger.record_many(
        "run-a", 1, {"sim-device-3": RoundSpend(mechanism="distributed-ddg", rho=1.0)}, delta=DELTA
    )
    budget = PrivacyBudget(ledger=ledger, epsilon=zcdp_epsilon(0.5, delta=DELTA), delta=DELTA)
    guard, _ = _privacy_hooks(budget, _ReplyCounts(), AuditLog(engine), "run-c")
    assert guard is not None

    guard(RHO, ["sim-device-3"])  # no lifetime cap: the device's earlier spend is not checked
    with pytest.raises(BudgetExceeded, match="would take the run to epsilon"):
        guard(1.0, ["sim-device-3"])
    assert _privacy_hooks(None, _ReplyCounts(), AuditLog(engine), "run-c")[0] is None
