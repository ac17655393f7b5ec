"""The privacy ledger on SQLite and PostgreSQL: totals, budgets, once per round, no drift,
and each client's lifetime total across runs with its cap."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from fedge.errors import ConfigError, StorageError
from fl_server.ledger import BudgetExceeded, PrivacyBudget, PrivacyLedger, RoundSpend
from strategies.accounting import GaussianSteps, composed_epsilon, spent_epsilon, zcdp_epsilon

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


CENTRAL = RoundSpend(
    mechanism="central-gaussian",
    gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1),
)


def test_a_clients_lifetime_total_composes_its_rows_of_every_run(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    ledger.record_many("run-a", 1, {"sim-device-3": DDG, "sim-device-4": DDG}, delta=DELTA)
    ledger.record_many("run-a", 2, {"sim-device-3": DDG}, delta=DELTA)
    ledger.record("run-a", 2, DDG, delta=DELTA)
    run_b = ledger.record_many("run-b", 1, {"sim-device-3": CENTRAL}, delta=DELTA)

    lifetime = ledger.lifetime_spent("sim-device-3", delta=DELTA)

    # All three rows, of both runs, in the order they were recorded.
    assert lifetime == spent_epsilon([DDG, DDG, CENTRAL], delta=DELTA)
    assert ledger.lifetime_spent("sim-device-4", delta=DELTA) == spent_epsilon([DDG], delta=DELTA)
    assert ledger.lifetime_spent("never-seen", delta=DELTA) == 0.0
    # The stored totals stay per run: run-b starts the device at zero.
    assert run_b["sim-device-3"] == spent_epsilon([CENTRAL], delta=DELTA)
    assert ledger.spent("run-b", delta=DELTA, subject="sim-device-3") == run_b["sim-device-3"]
    assert [(e.run_id, e.server_round) for e in ledger.lifetime_entries("sim-device-3")] == [
        ("run-a", 1),
        ("run-a", 2),
        ("run-b", 1),
    ]


def test_check_lifetime_projects_every_client_with_the_rounds_spend(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    ledger.record_many("run-a", 1, {"a": DDG}, delta=DELTA)

    projected = ledger.check_lifetime(["a", "b", "a"], DDG, budget=100.0, delta=DELTA)

    assert projected == {
        "a": spent_epsilon([DDG, DDG], delta=DELTA),
        "b": spent_epsilon([DDG], delta=DELTA),
    }
    assert ledger.check_lifetime([], DDG, budget=100.0, delta=DELTA) == {}
    assert ledger.entries("run-a", subject="b") == []  # a check records nothing


def test_check_lifetime_refuses_naming_the_client_and_records_nothing(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    ledger.record_many("run-a", 1, {"device-7": DDG, "device-8": DDG}, delta=DELTA)
    ledger.record_many("run-b", 1, {"device-7": DDG}, delta=DELTA)
    # Room for two rounds of rho 0.02 over a lifetime, not three: device-7 spent two,
    # in two different runs; device-8 one.
    budget = zcdp_epsilon(0.05, delta=DELTA)

    with pytest.raises(
        BudgetExceeded,
        match=r"^the next round would take client device-7 past the lifetime budget "
        r"[0-9.]+: epsilon up to [0-9.]+ \(delta 1e-05\)$",
    ):
        ledger.check_lifetime(["device-8", "device-7"], DDG, budget=budget, delta=DELTA)

    assert [e.run_id for e in ledger.lifetime_entries("device-7")] == ["run-a", "run-b"]
    assert len(ledger.lifetime_entries("device-8")) == 1
    assert ledger.check_lifetime(["device-8"], DDG, budget=budget, delta=DELTA)["device-8"] < budget


def test_a_refusal_names_the_five_worst_clients_then_how_many_more(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    subjects = [f"d{i:02d}" for i in range(8)]
    ledger.record_many("run-a", 1, dict.fromkeys(subjects, DDG), delta=DELTA)
    ledger.record_many("run-b", 1, {"d07": DDG}, delta=DELTA)  # d07 is the worst
    budget = zcdp_epsilon(0.03, delta=DELTA)

    with pytest.raises(
        BudgetExceeded, match=r"take clients d07, d00, d01, d02, d03 and 3 more past the"
    ):
        ledger.check_lifetime(subjects, DDG, budget=budget, delta=DELTA)


@pytest.mark.parametrize(
    ("subjects", "spend", "budget", "delta", "match"),
    [
        (
            ["a"],
            DDG,
            0.0,
            DELTA,
            r"^the lifetime epsilon budget must be a finite number > 0, got 0.0$",
        ),
        (["a"], DDG, float("inf"), DELTA, "lifetime epsilon budget must be a finite number > 0"),
        (["a"], DDG, float("nan"), DELTA, "lifetime epsilon budget must be a finite number > 0"),
        (["a"], DDG, 1.0, 1.0, r"^delta must be in \(0, 1\), got 1.0$"),
        (["a"], "ddg", 1.0, DELTA, r"^spend must be a PrivacySpend, got str$"),
        (
            "abc",
            DDG,
            1.0,
            DELTA,
            r"^subjects must be a sequence of client subjects, not one string$",
        ),
        (["a", ""], DDG, 1.0, DELTA, r"^a ledger subject has 1..128 characters$"),
        (["x" * 129], DDG, 1.0, DELTA, r"^a ledger subject has 1..128 characters$"),
        (["a", "run"], DDG, 1.0, DELTA, r"^'run' is the run-level subject: a lifetime total"),
    ],
)
def test_check_lifetime_refuses_invalid_arguments(
    engine: Engine, subjects: object, spend: object, budget: float, delta: float, match: str
) -> None:
    ledger = PrivacyLedger(engine)

    with pytest.raises(ConfigError, match=match):
        ledger.check_lifetime(subjects, spend, budget=budget, delta=delta)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("subject", "delta", "match"),
    [
        ("run", DELTA, r"^'run' is the run-level subject: a lifetime total belongs to a client$"),
        ("", DELTA, r"^a ledger subject has 1..128 characters$"),
        ("a", 0.0, r"^delta must be in \(0, 1\), got 0.0$"),
    ],
)
def test_lifetime_spent_refuses_the_run_subject_and_invalid_arguments(
    engine: Engine, subject: str, delta: float, match: str
) -> None:
    ledger = PrivacyLedger(engine)

    with pytest.raises(ConfigError, match=match):
        ledger.lifetime_spent(subject, delta=delta)
    if subject == "run":
        with pytest.raises(ConfigError, match=match):
            ledger.lifetime_entries(subject)


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), float("nan")])
def test_a_budget_refuses_an_invalid_client_lifetime_epsilon(engine: Engine, cap: float) -> None:
    with pytest.raises(
        ConfigError, match=r"^the client lifetime epsilon must be a finite number > 0, got"
    ):
        PrivacyBudget(
            ledger=PrivacyLedger(engine), epsilon=None, delta=DELTA, client_lifetime_epsilon=cap
        )


def test_a_runs_epsilon_is_its_own_spend_else_its_worst_participants(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    spend = RoundSpend(
        mechanism="dp-sgd", gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    )
    assert ledger.run_epsilon("run-a", delta=1e-5) is None
    # Sample-level DP: only participants are charged; the worst stands for the run.
    totals = ledger.record_many("run-a", 1, {"dev-1": spend, "dev-2": spend}, delta=1e-5)
    assert ledger.run_epsilon("run-a", delta=1e-5) == max(totals.values())
    # Client-level DP: the run's own row is its epsilon.
    central = RoundSpend(
        mechanism="central-gaussian",
        gaussian=GaussianSteps(noise_multiplier=1.0, sample_rate=1.0, steps=1),
    )
    entry = ledger.record("run-b", 1, central, delta=1e-5)
    assert ledger.run_epsilon("run-b", delta=1e-5) == pytest.approx(entry.epsilon)


def test_rounds_recorded_while_another_process_appends_events_all_land_bound(
    engine: Engine,
) -> None:
    # The gateway audits refusals while the coordinator records rounds: one database, two
    # writers. Every round must land with its event, and the whole trail must verify.
    import threading

    from fl_server.audit import AuditEventKind, AuditLog
    from fl_server.audit.verify import verify_trail

    stop = threading.Event()
    other = AuditLog(engine)

    def gateway() -> None:
        while not stop.is_set():
            other.append(AuditEventKind.ENROLMENT_REFUSED, {"reason": "unknown_token"})

    writer = threading.Thread(target=gateway)
    writer.start()
    ledger = PrivacyLedger(engine)
    try:
        for server_round in range(1, 9):
            ledger.record_many("run-c", server_round, {"run": DDG, "dev-a": DDG}, delta=1e-5)
            # Verifying a live trail judges the chain up to the head it read, no further.
            live = verify_trail(engine)
            assert live.ok, live.problems
    finally:
        stop.set()
        writer.join()

    result = verify_trail(engine)
    assert result.ok, result.problems
    assert result.ledger_rows_checked == 16 and result.spent_events_checked == 8
    assert len(ledger.entries("run-c")) == 16
