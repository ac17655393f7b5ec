"""The ledger's sink: budget checks, run and participant rows, one audit event per round."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from fl_server.audit import AuditEventKind, AuditLog
from fl_server.ledger import RUN_SUBJECT, BudgetExceeded, PrivacyBudget, PrivacyLedger
from fl_server.spend import LedgerSink, SpendSink
from strategies.accounting import GaussianSteps, PrivacySpend

ROUND = PrivacySpend(
    mechanism="central-gaussian",
    gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1),
)


def test_a_round_is_recorded_for_the_run_each_participant_and_the_audit_log(
    engine: Engine,
) -> None:
    ledger, audit = PrivacyLedger(engine), AuditLog(engine)
    sink = LedgerSink(
        PrivacyBudget(ledger=ledger, epsilon=50.0, delta=1e-5), audit, "run-a", "central-gaussian"
    )
    assert isinstance(sink, SpendSink)

    sink.check(ROUND)
    sink.spent(1, ROUND, {"device-a": ROUND, "device-b": ROUND}, {"participants": 2})

    assert [e.server_round for e in ledger.entries("run-a", subject=RUN_SUBJECT)] == [1]
    assert [e.server_round for e in ledger.entries("run-a", subject="device-b")] == [1]
    assert ledger.spent("run-a", delta=1e-5) > 0
    [event] = [e for e in audit.iter(run_id="run-a") if e.kind is AuditEventKind.PRIVACY_SPENT]
    assert event.payload["clients_charged"] == 2 and event.payload["participants"] == 2
    assert event.payload["noise_multiplier"] == 1.0 and event.payload["sample_rate"] == 1.0


def test_a_round_past_the_budget_is_refused(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    sink = LedgerSink(
        PrivacyBudget(ledger=ledger, epsilon=0.5, delta=1e-5), AuditLog(engine), "run-a", "x"
    )

    with pytest.raises(BudgetExceeded, match="would take the run to epsilon"):
        sink.check(ROUND)


def test_participants_are_checked_against_their_lifetime_cap_only_when_there_is_one(
    engine: Engine,
) -> None:
    ledger, audit = PrivacyLedger(engine), AuditLog(engine)
    for run_id in ("run-a", "run-b"):
        ledger.record_many(run_id, 1, {"device-a": ROUND}, delta=1e-5)
    uncapped = LedgerSink(
        PrivacyBudget(ledger=ledger, epsilon=None, delta=1e-5), audit, "run-c", "x"
    )
    capped = LedgerSink(
        PrivacyBudget(ledger=ledger, epsilon=None, delta=1e-5, client_lifetime_epsilon=5.0),
        audit,
        "run-c",
        "x",
    )

    uncapped.check_participants(["device-a", "device-b"], ROUND)  # no cap: nothing to refuse
    capped.check_participants(["device-b"], ROUND)  # one round at z = 1 fits a cap of 5
    with pytest.raises(BudgetExceeded, match=r"take client device-a past the lifetime budget 5"):
        capped.check_participants(["device-b", "device-a"], ROUND)  # its third round does not
    assert ledger.entries("run-c") == []


def test_a_failed_audit_write_leaves_no_ledger_row(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The round's run row, participant rows and audit event are one transaction: a crash
    # (here, the audit write failing) must not leave spend without its event, or the reverse.
    ledger, audit = PrivacyLedger(engine), AuditLog(engine)
    sink = LedgerSink(
        PrivacyBudget(ledger=ledger, epsilon=50.0, delta=1e-5), audit, "run-a", "central-gaussian"
    )

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(audit, "append_in", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sink.spent(1, ROUND, {"device-a": ROUND}, {})

    assert ledger.entries("run-a") == []
    assert not [e for e in audit.iter(run_id="run-a")]
    monkeypatch.undo()
    sink.spent(1, ROUND, {"device-a": ROUND}, {})  # round 1 is still free
    assert [e.server_round for e in ledger.entries("run-a", subject="device-a")] == [1]


def test_participants_are_recorded_and_checked_under_their_enrolled_device_ids(
    engine: Engine,
) -> None:
    # A plain round names clients by Flower node id; the ledger keeps the device id, so
    # one id names a device in the server's ledger, the device's own and the audit trail.
    ledger, audit = PrivacyLedger(engine), AuditLog(engine)
    names = {"17": "dev-abc"}
    budget = PrivacyBudget(
        ledger=ledger,
        epsilon=None,
        delta=1e-5,
        client_lifetime_epsilon=1.0,
        subject_name=lambda s: names.get(s, s),
    )
    sink = LedgerSink(budget, audit, "run-a", "central-gaussian")

    sink.spent(1, ROUND, {"17": ROUND, "18": ROUND}, {})

    assert [e.server_round for e in ledger.entries("run-a", subject="dev-abc")] == [1]
    assert ledger.entries("run-a", subject="17") == []
    assert [e.server_round for e in ledger.entries("run-a", subject="18")] == [1]
    with pytest.raises(BudgetExceeded, match="dev-abc"):
        sink.check_participants(["17"], ROUND)
