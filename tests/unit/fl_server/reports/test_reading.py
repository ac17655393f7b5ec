"""audit.reading.checked_records: every record as stored, damage named instead of raised."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Engine

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.reading import checked_records
from fl_server.db import open_database


@pytest.fixture
def trail(tmp_path: Path) -> tuple[Engine, Path]:
    path = tmp_path / "fedge.db"
    engine = open_database(f"sqlite:///{path}")
    log = AuditLog(engine)
    for index in range(5):
        log.append(AuditEventKind.MODEL_SAVED, {"round": index}, run_id="r1" if index % 2 else "r2")
    return engine, path


def test_intact_records_come_in_order_with_no_problem(trail: tuple[Engine, Path]) -> None:
    engine, _ = trail
    records = checked_records(engine)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert all(r.intact for r in records)
    assert [r.seq for r in checked_records(engine, run_id="r1")] == [2, 4]
    assert [r.seq for r in checked_records(engine, last=2)] == [4, 5]
    assert records[0].payload == {"round": 0}
    with pytest.raises(ConfigError, match="last must be >= 1"):
        checked_records(engine, last=0)


def test_damage_is_named_not_raised(trail: tuple[Engine, Path]) -> None:
    engine, path = trail
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE audit_events SET payload = '{\"round\": 9}' WHERE seq = 2")
        connection.execute("UPDATE audit_events SET payload = '{\"round\":7}' WHERE seq = 3")
        connection.execute("UPDATE audit_events SET kind = 'never.heard.of' WHERE seq = 5")
        connection.execute("DELETE FROM audit_events WHERE seq = 4")
    problems = {r.seq: r.problem for r in checked_records(engine)}
    assert problems[1] is None
    assert problems[2] is not None and "not canonical JSON" in problems[2]
    assert problems[3] == "its content does not match its hash"
    assert problems[5] == "its content does not match its hash"
    assert 4 not in problems
    with sqlite3.connect(path) as connection:  # restore 5's kind: now only its link is broken
        connection.execute("UPDATE audit_events SET kind = 'model.saved' WHERE seq = 5")
    assert checked_records(engine)[-1].problem == "its predecessor (record 4) is missing"
    engine.dispose()
