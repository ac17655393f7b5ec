from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog, canonical_json
from fl_server.audit.events import GENESIS_HASH, record_hash
from fl_server.db.schema import AuditHeadRow, AuditRecordRow


def _ticking_clock() -> Iterator[datetime]:
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    while True:
        yield moment
        moment += timedelta(seconds=1)


@pytest.fixture
def log(engine: Engine) -> AuditLog:
    ticks = _ticking_clock()
    return AuditLog(engine, clock=lambda: next(ticks))


def _fill(log: AuditLog, count: int = 5) -> None:
    for index in range(count):
        log.append(AuditEventKind.ROUND_COMPLETED, {"round": index + 1}, run_id="run-a")


def test_appended_events_chain_and_verify(log: AuditLog) -> None:
    first = log.append(AuditEventKind.RUN_STARTED, {"config": {"clients": 3}}, run_id="run-a")
    second = log.append(
        AuditEventKind.ROUND_COMPLETED, {"round": 1, "accuracy": 0.5}, run_id="run-a"
    )

    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.record_hash
    assert first.recorded_at == datetime(2026, 1, 1, tzinfo=UTC)
    report = log.verify()
    assert report.ok
    assert report.records_checked == 2
    assert report.head_hash == second.record_hash


def test_record_hash_covers_the_canonical_content(log: AuditLog) -> None:
    event = log.append(AuditEventKind.MODEL_SAVED, {"sha256": "ab", "round": 0}, run_id="r")

    expected = record_hash(
        seq=1,
        recorded_at="2026-01-01T00:00:00.000000+00:00",
        kind="model.saved",
        run_id="r",
        payload_json=canonical_json({"round": 0, "sha256": "ab"}),
        prev_hash=GENESIS_HASH,
    )
    assert event.record_hash == expected


def test_iter_returns_events_in_order_and_filters_by_run(log: AuditLog) -> None:
    _fill(log, 3)
    log.append(AuditEventKind.RUN_STARTED, {}, run_id="run-b")

    everything = list(log.iter(batch_size=2))
    only_b = list(log.iter(run_id="run-b"))

    assert [e.seq for e in everything] == [1, 2, 3, 4]
    assert [e.payload.get("round") for e in everything[:3]] == [1, 2, 3]
    assert [(e.seq, e.kind) for e in only_b] == [(4, AuditEventKind.RUN_STARTED)]


def test_an_empty_log_verifies(log: AuditLog) -> None:
    report = log.verify()

    assert report.ok
    assert report.records_checked == 0
    assert report.head_hash == GENESIS_HASH


def test_editing_a_payload_names_that_record(engine: Engine, log: AuditLog) -> None:
    _fill(log)
    with Session(engine) as session, session.begin():
        session.execute(
            update(AuditRecordRow).where(AuditRecordRow.seq == 3).values(payload='{"round":99}')
        )

    report = log.verify()

    assert not report.ok
    assert report.first_bad_seq == 3
    assert "record 3 was modified" in report.reason


def test_editing_the_timestamp_names_that_record(engine: Engine, log: AuditLog) -> None:
    _fill(log)
    with Session(engine) as session, session.begin():
        session.execute(
            update(AuditRecordRow)
            .where(AuditRecordRow.seq == 2)
            .values(recorded_at="2020-01-01T00:00:00.000000+00:00")
        )

    assert log.verify().first_bad_seq == 2


def test_deleting_a_middle_record_names_the_gap(engine: Engine, log: AuditLog) -> None:
    _fill(log)
    with Session(engine) as session, session.begin():
        session.execute(delete(AuditRecordRow).where(AuditRecordRow.seq == 2))

    report = log.verify()

    assert not report.ok
    assert report.first_bad_seq == 2
    assert "record 2 is missing" in report.reason


def test_deleting_the_newest_record_is_caught_by_the_head(engine: Engine, log: AuditLog) -> None:
    _fill(log)
    with Session(engine) as session, session.begin():
        session.execute(delete(AuditRecordRow).where(AuditRecordRow.seq == 5))

    report = log.verify()

    assert not report.ok
    assert report.first_bad_seq == 5
    assert "removed from the end" in report.reason


def test_inserting_a_forged_record_breaks_the_next_link(engine: Engine, log: AuditLog) -> None:
    _fill(log)
    # Make room at seq 3 and insert a self-consistent forgery chained to record 2.
    with Session(engine) as session, session.begin():
        rows = list(
            session.execute(select(AuditRecordRow).order_by(AuditRecordRow.seq.desc())).scalars()
        )
        for row in rows:
            if row.seq >= 3:
                row.seq += 1
                session.flush()
        predecessor = session.get(AuditRecordRow, 2)
        assert predecessor is not None
        forged_payload = canonical_json({"round": 2.5})
        recorded_at = "2026-01-01T00:00:01.500000+00:00"
        session.add(
            AuditRecordRow(
                seq=3,
                recorded_at=recorded_at,
                kind="round.completed",
                run_id="run-a",
                payload=forged_payload,
                prev_hash=predecessor.record_hash,
                record_hash=record_hash(
                    seq=3,
                    recorded_at=recorded_at,
                    kind="round.completed",
                    run_id="run-a",
                    payload_json=forged_payload,
                    prev_hash=predecessor.record_hash,
                ),
            )
        )

    report = log.verify()

    assert not report.ok
    # The forgery itself is consistent; the record after it no longer is.
    assert report.first_bad_seq == 4
    assert report.records_checked == 3


def test_reordering_two_records_names_the_first(engine: Engine, log: AuditLog) -> None:
    _fill(log)
    with Session(engine) as session, session.begin():
        session.execute(update(AuditRecordRow).where(AuditRecordRow.seq == 2).values(seq=-2))
        session.execute(update(AuditRecordRow).where(AuditRecordRow.seq == 4).values(seq=2))
        session.execute(update(AuditRecordRow).where(AuditRecordRow.seq == -2).values(seq=4))

    report = log.verify()

    assert not report.ok
    assert report.first_bad_seq == 2


def test_a_tampered_head_is_reported(engine: Engine, log: AuditLog) -> None:
    _fill(log, 2)
    with Session(engine) as session, session.begin():
        session.execute(update(AuditHeadRow).values(record_hash="f" * 64))

    report = log.verify()

    assert not report.ok
    assert "head" in report.reason


def test_appending_continues_the_chain_after_reopening(db_url: str, log: AuditLog) -> None:
    from fl_server.db import open_database

    _fill(log, 2)
    reopened = open_database(db_url)
    try:
        event = AuditLog(reopened).append(
            AuditEventKind.RUN_COMPLETED, {"rounds": 2}, run_id="run-a"
        )
        assert event.seq == 3
        assert AuditLog(reopened).verify().ok
    finally:
        reopened.dispose()


def test_concurrent_appenders_never_fork_the_chain(engine: Engine) -> None:
    log = AuditLog(engine)
    errors: list[BaseException] = []

    def _worker(worker: int) -> None:
        try:
            for index in range(10):
                log.append(AuditEventKind.ROUND_COMPLETED, {"worker": worker, "i": index})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=_worker, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    events = list(log.iter())
    assert [e.seq for e in events] == list(range(1, 41))
    assert log.verify().ok


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"loss": float("nan")}, r"\$\.loss is nan"),
        ({"nested": {"bad": {1, 2}}}, r"\$\.nested\.bad has type set"),
        ({"key": {3: "x"}}, r"non-string key 3"),
    ],
)
def test_payloads_that_are_not_json_are_refused(
    log: AuditLog, payload: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        log.append(AuditEventKind.RUN_STARTED, payload)  # type: ignore[arg-type]
    assert list(log.iter()) == []


def test_kind_must_be_an_enum_member(log: AuditLog) -> None:
    with pytest.raises(ConfigError, match="AuditEventKind"):
        log.append("run.started", {})  # type: ignore[arg-type]


def test_naive_clock_is_refused(engine: Engine) -> None:
    log = AuditLog(engine, clock=lambda: datetime(2026, 1, 1))

    with pytest.raises(ConfigError, match="timezone-aware"):
        log.append(AuditEventKind.RUN_STARTED, {})


def test_overlong_run_id_is_refused(log: AuditLog) -> None:
    with pytest.raises(ConfigError, match=r"run_id must have 1\.\.64 characters"):
        log.append(AuditEventKind.RUN_STARTED, {}, run_id="x" * 65)


def test_latest_returns_the_newest_events_oldest_first(log: AuditLog) -> None:
    _fill(log, 5)
    log.append(AuditEventKind.RUN_STARTED, {}, run_id="run-b")

    assert [e.seq for e in log.latest(3)] == [4, 5, 6]
    assert [e.seq for e in log.latest(3, run_id="run-a")] == [3, 4, 5]
    with pytest.raises(ConfigError, match="count must be >= 1, got 0"):
        log.latest(0)
