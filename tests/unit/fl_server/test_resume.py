"""The pieces a resumed run rests on, without Flower's runtime: the round loop from any
round, the ledger's per-round spends, the summary's JSON, the publisher's lineage."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from sqlalchemy import Engine

from fedge.errors import ConfigError
from fl_server.federation import RoundReport
from fl_server.ledger import RUN_SUBJECT, PrivacyLedger, RoundSpend
from fl_server.rounds import run_rounds
from fl_server.run_summary import RunStatus, RunSummary
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.publisher import RoundPublisher
from fl_server.store.store import ModelStore
from strategies.accounting import GaussianSteps


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord([np.full(3, value, dtype=np.float32)])


class FakeStrategy:
    """Records what the loop asks; round r aggregates to the arrays filled with r."""

    def __init__(self, log: list[tuple[Any, ...]], *, skip: Iterable[int] = ()) -> None:
        self.log = log
        self.skip = set(skip)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[str]:
        self.log.append(("configure", server_round, arrays, config, grid))
        return [f"message of round {server_round}"]

    def aggregate_train(
        self, server_round: int, replies: list[str]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.log.append(("aggregate", server_round, replies))
        if server_round in self.skip:
            return None, None
        return _arrays(float(server_round)), MetricRecord({"loss": 0.0})


class FakeGrid:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def send_and_receive(self, *, messages: list[str], timeout: float) -> list[str]:
        self.log.append(("send", messages, timeout))
        return [m.replace("message", "reply") for m in messages]


def _run(
    first_round: int, last_round: int, *, skip: Iterable[int] = ()
) -> tuple[ArrayRecord, list[tuple[Any, ...]], ArrayRecord, FakeGrid]:
    log: list[tuple[Any, ...]] = []
    grid = FakeGrid(log)
    initial = _arrays(-1.0)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        log.append(("evaluate", server_round, arrays))
        return None

    final = run_rounds(
        cast("Strategy", FakeStrategy(log, skip=skip)),
        cast("Grid", grid),
        initial_arrays=initial,
        first_round=first_round,
        last_round=last_round,
        timeout=12.5,
        train_config=ConfigRecord({"lr": 0.1}),
        evaluate_fn=evaluate,
    )
    return final, log, initial, grid


def _value(arrays: ArrayRecord) -> float:
    return float(arrays.to_numpy_ndarrays()[0][0])


def test_a_resumed_loop_keeps_its_round_numbers() -> None:
    final, log, initial, _grid = _run(4, 6)

    assert [entry[:2] for entry in log] == [
        ("evaluate", 3),
        ("configure", 4),
        ("send", ["message of round 4"]),
        ("aggregate", 4),
        ("evaluate", 4),
        ("configure", 5),
        ("send", ["message of round 5"]),
        ("aggregate", 5),
        ("evaluate", 5),
        ("configure", 6),
        ("send", ["message of round 6"]),
        ("aggregate", 6),
        ("evaluate", 6),
    ]
    assert log[0][2] is initial
    assert _value(final) == 6.0


def test_the_loop_passes_the_model_config_grid_and_timeout_through() -> None:
    _final, log, initial, grid = _run(1, 2)

    configures = [entry for entry in log if entry[0] == "configure"]
    sends = [entry for entry in log if entry[0] == "send"]
    aggregates = [entry for entry in log if entry[0] == "aggregate"]
    assert configures[0][2] is initial
    assert _value(configures[1][2]) == 1.0  # round 2 trains the model round 1 made
    assert all(entry[3] == ConfigRecord({"lr": 0.1}) for entry in configures)
    assert all(entry[4] is grid for entry in configures)
    assert {entry[2] for entry in sends} == {12.5}
    assert [entry[2] for entry in aggregates] == [["reply of round 1"], ["reply of round 2"]]


def test_a_round_without_an_aggregate_keeps_the_previous_model() -> None:
    final, log, _initial, _grid = _run(1, 2, skip={2})

    evaluations = [entry for entry in log if entry[0] == "evaluate"]
    assert [entry[1] for entry in evaluations] == [0, 1, 2]
    assert _value(evaluations[2][2]) == 1.0
    assert _value(final) == 1.0


def test_a_round_without_any_aggregate_returns_the_initial_model() -> None:
    final, _log, initial, _grid = _run(3, 3, skip={3})

    assert final is initial


@pytest.mark.parametrize(
    ("first_round", "last_round", "match"),
    [(3, 2, r"^cannot run rounds 3\.\.2$"), (0, 2, r"^cannot run rounds 0\.\.2$")],
)
def test_an_empty_or_invalid_range_is_refused_before_anything_runs(
    first_round: int, last_round: int, match: str
) -> None:
    log: list[tuple[Any, ...]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        log.append(("evaluate", server_round))
        return None

    with pytest.raises(ConfigError, match=match):
        run_rounds(
            cast("Strategy", FakeStrategy(log)),
            cast("Grid", FakeGrid(log)),
            initial_arrays=_arrays(0.0),
            first_round=first_round,
            last_round=last_round,
            timeout=1.0,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate,
        )

    assert log == []


# ------------------------------------------------------------------ ledger


def test_round_spends_returns_what_each_subject_was_charged(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    sgd = GaussianSteps(noise_multiplier=1.1, sample_rate=0.05, steps=20)
    round_two = {
        RUN_SUBJECT: RoundSpend(mechanism="distributed-ddg", rho=0.03),
        "dev-0123456789abcdef": RoundSpend(mechanism="dp-sgd", gaussian=sgd),
        "dev-fedcba9876543210": RoundSpend(mechanism="central-gaussian", rho=0.01, gaussian=sgd),
    }
    ledger.record_many("run-a", 1, {RUN_SUBJECT: RoundSpend(mechanism="x", rho=0.5)}, delta=1e-5)
    ledger.record_many("run-a", 2, round_two, delta=1e-5)
    ledger.record_many("run-b", 2, {RUN_SUBJECT: RoundSpend(mechanism="y", rho=0.7)}, delta=1e-5)

    assert ledger.round_spends("run-a", 2) == round_two
    assert ledger.round_spends("run-a", 1) == {RUN_SUBJECT: RoundSpend(mechanism="x", rho=0.5)}
    assert ledger.round_spends("run-a", 3) == {}
    assert ledger.round_spends("run-c", 2) == {}


def test_a_round_charged_again_from_its_spends_composes_like_the_original(engine: Engine) -> None:
    ledger = PrivacyLedger(engine)
    spend = {RUN_SUBJECT: RoundSpend(mechanism="distributed-ddg", rho=0.04)}
    ledger.record_many("run-a", 1, spend, delta=1e-5)
    before = ledger.spent("run-a", delta=1e-5)

    # The resume charges the abandoned round 2 as much as round 1 cost.
    ledger.record_many("run-a", 2, ledger.round_spends("run-a", 1), delta=1e-5)

    twice = PrivacyLedger(engine)
    twice.record_many("run-z", 1, {RUN_SUBJECT: RoundSpend(mechanism="d", rho=0.08)}, delta=1e-5)
    assert ledger.spent("run-a", delta=1e-5) > before
    assert ledger.spent("run-a", delta=1e-5) == pytest.approx(twice.spent("run-z", delta=1e-5))


# ----------------------------------------------------------------- summary


def _summary() -> RunSummary:
    return RunSummary(
        run_id="run-20260301-abc",
        config={"federation": {"rounds": 3}, "privacy": {"mode": "distributed"}},
        config_sha256="ab" * 32,
        data={"evaluation_examples": 200},
        db_url="sqlite:///fedge.db",
        status=RunStatus.INTERRUPTED,
        initial_accuracy=0.1,
        rounds=[{"round": 1, "accuracy": 0.4}, {"round": 2, "accuracy": 0.6}],
        wall_seconds=12.345,
        audit_head="cd" * 32,
        error=None,
        privacy={"epsilon": 1.5, "delta": 1e-5},
    )


def test_the_summary_round_trips_through_its_json() -> None:
    summary = _summary()

    loaded = RunSummary.from_json(summary.to_json())

    assert loaded == summary
    assert loaded.final_accuracy == 0.6


def test_a_fresh_summary_round_trips() -> None:
    summary = RunSummary(run_id="r", config={}, config_sha256="", data={}, db_url="")

    assert RunSummary.from_json(summary.to_json()) == summary


def _without(key: str) -> dict[str, Any]:
    document = _summary().to_json()
    del document[key]
    return document


def _with(key: str, value: object) -> dict[str, Any]:
    document = _summary().to_json()
    document[key] = value
    return document


@pytest.mark.parametrize(
    ("document", "match"),
    [
        (_without("run_id"), r"^not a fedge run summary: 'run_id'$"),
        (_without("audit"), r"^not a fedge run summary: 'audit'$"),
        (_without("privacy"), r"^not a fedge run summary: 'privacy'$"),
        (_with("rounds", {"1": {}}), r"rounds must be a list of objects"),
        (_with("rounds", [1, 2]), r"rounds must be a list of objects"),
        (_with("audit", "sqlite:///x"), r"^not a fedge run summary: "),
        (_with("wall_seconds", "soon"), r"^not a fedge run summary: could not convert"),
        (_with("config", 3), r"^not a fedge run summary: "),
        ([], r"^not a fedge run summary: "),
    ],
)
def test_a_malformed_summary_is_refused(document: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunSummary.from_json(document)


# --------------------------------------------------------------- publisher


def _report(tmp_path: Path, server_round: int) -> RoundReport:
    path = tmp_path / f"round-{server_round}.npz"
    path.write_bytes(f"weights of round {server_round}".encode())
    return RoundReport(
        server_round=server_round,
        loss=1.0,
        accuracy=0.1 * server_round,
        seconds=0.1,
        num_replies=3,
        num_failures=0,
        model_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        model_path=str(path),
    )


def test_a_resumed_publisher_continues_the_lineage(engine: Engine, tmp_path: Path) -> None:
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())
    first = RoundPublisher(store, model="cnn", run_id="run-1")
    for server_round in range(3):
        first.on_round(_report(tmp_path, server_round))
    # Another run's version in between: the parent is still this run's last version.
    RoundPublisher(store, model="cnn", run_id="run-0").on_round(_report(tmp_path, 9))
    saved = dict(reversed(list(first.versions.items())))  # order must not matter

    second = RoundPublisher(store, model="cnn", run_id="run-1")
    second.resume(saved)
    second.on_round(_report(tmp_path, 3))

    assert first.versions == {0: 1, 1: 2, 2: 3}
    assert second.versions == {0: 1, 1: 2, 2: 3, 3: 5}
    stored = store.get("cnn", 5)
    assert stored.manifest.parent == 3
    assert stored.manifest.metadata["server_round"] == 3


def test_resuming_from_no_versions_starts_a_new_lineage(engine: Engine, tmp_path: Path) -> None:
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())
    publisher = RoundPublisher(store, model="cnn", run_id="run-1")

    publisher.resume({})
    publisher.on_round(_report(tmp_path, 1))

    assert publisher.versions == {1: 1}
    assert store.get("cnn", 1).manifest.parent is None


def test_a_run_whose_every_secure_round_aborted_is_not_called_completed() -> None:
    from fl_server.coordinator import _every_round_aborted

    def summary(*aborted: str | None) -> RunSummary:
        rounds = [
            {"round": i + 1, "secure_aggregation": {"aborted": reason}}
            for i, reason in enumerate(aborted)
        ]
        return RunSummary(
            run_id="r", config={}, config_sha256="x", data={}, db_url="", rounds=rounds
        )

    assert _every_round_aborted(summary("too few survivors", "too few survivors")) == (
        "too few survivors"
    )
    assert _every_round_aborted(summary("too few survivors", None)) is None
    assert _every_round_aborted(summary()) is None
    plain = RunSummary(
        run_id="r", config={}, config_sha256="x", data={}, db_url="", rounds=[{"round": 1}]
    )
    assert _every_round_aborted(plain) is None
