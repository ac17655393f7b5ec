"""The privacy ledger on SQLite and PostgreSQL: totals, budgets, once per round, no drift."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from fedge.errors import ConfigError, StorageError
from fl_server.ledger import BudgetExceeded, PrivacyLedger, RoundSpend
from strategies.accounting import GaussianSteps, composed_epsilon, zcdp_epsilon

DELTA = 1e-5
DDG = RoundSpend(mechanism="distributed-ddg", rho=0.02)


def test_each_round_stores_the_composed_total(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)

    entries = [ledger.record("run-a", r, DDG, delta=DELTA) for r in range(1, 4)]

    assert [e.epsilon for e in entries] == pytest.approx(
        [zcdp_epsilon(0.02 * r, delta=DELTA) for r in range(1, 4)], rel=0.01
    )
    assert entries[0].epsilon < entries[1].epsilon < entries[2].epsilon
    assert ledger.spent("run-a", delta=DELTA) == pytest.approx(entries[-1].epsilon)
    assert ledger.spent("run-b", delta=DELTA) == 0.0
    assert [e.server_round for e in ledger.entries("run-a")] == [1, 2, 3]


def test_a_round_that_would_exceed_the_budget_is_refused(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    budget = zcdp_epsilon(0.05, delta=DELTA)  # room for two rounds of rho 0.02, not three
    spent = []
    for server_round in range(1, 10):
        try:
            ledger.check("run-a", DDG, budget=budget, delta=DELTA)
        except BudgetExceeded as exc:
            assert "would take the run to epsilon" in str(exc)
            break
        spent.append(ledger.record("run-a", server_round, DDG, delta=DELTA))

    assert len(spent) == 2
    assert spent[-1].epsilon <= budget


def test_clients_have_their_own_totals_and_mechanisms_compose(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    sgd = GaussianSteps(noise_multiplier=1.1, sample_rate=0.02, steps=100)
    local = RoundSpend(mechanism="dp-sgd", gaussian=sgd)

    ledger.record("run-a", 1, DDG, delta=DELTA)
    ledger.record("run-a", 1, local, delta=DELTA, subject="device-7")
    entry = ledger.record("run-a", 2, DDG, delta=DELTA, subject="device-7")

    assert entry.epsilon == pytest.approx(
        composed_epsilon(rho=0.02, gaussian=[sgd], delta=DELTA), rel=1e-9
    )
    assert ledger.spent("run-a", delta=DELTA) == pytest.approx(
        zcdp_epsilon(0.02, delta=DELTA), rel=0.01
    )
    assert {e.subject for e in ledger.entries("run-a")} == {"run", "device-7"}


def test_a_round_is_recorded_once_per_subject(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    ledger.record("run-a", 1, DDG, delta=DELTA)

    with pytest.raises(StorageError, match="already in the ledger"):
        ledger.record("run-a", 1, DDG, delta=DELTA)
    assert len(ledger.entries("run-a")) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mechanism": "", "rho": 0.1}, "mechanism"),
        ({"mechanism": "x", "rho": -0.1}, "rho"),
        ({"mechanism": "x"}, "needs a rho"),
    ],
)
def test_invalid_spends_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RoundSpend(**kwargs)  # type: ignore[arg-type]


def test_invalid_budgets_and_subjects_are_refused(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)

    with pytest.raises(ConfigError, match="budget"):
        ledger.check("run-a", DDG, budget=0.0, delta=DELTA)
    with pytest.raises(ConfigError, match="invalid run id"):
        ledger.record("run-a", 1, DDG, delta=DELTA, subject="")


def test_many_clients_of_a_round_are_charged_in_one_transaction(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    central = RoundSpend(
        mechanism="central-gaussian",
        gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1),
    )
    first = ledger.record_many("run-a", 1, {"11": central, "12": central}, delta=DELTA)
    second = ledger.record_many("run-a", 2, {"11": central}, delta=DELTA)

    # Client 11 took part twice, client 12 once: only participations are charged.
    assert second["11"] > first["11"] == first["12"]
    assert second["11"] == pytest.approx(ledger.spent("run-a", delta=DELTA, subject="11"))
    worst = ledger.max_subject_epsilon("run-a")
    assert worst is not None and worst[0] == "11"
    assert worst[1] == pytest.approx(second["11"])
    assert ledger.spent("run-a", delta=DELTA) == 0.0  # the run subject is separate
    with pytest.raises(StorageError, match="already in the ledger"):
        ledger.record_many("run-a", 2, {"12": central, "11": central}, delta=DELTA)
    # The failed transaction stored nothing, not even client 12's row.
    assert len(ledger.entries("run-a", subject="12")) == 1
    assert ledger.max_subject_epsilon("run-b") is None
