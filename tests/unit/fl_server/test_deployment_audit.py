"""config.loaded at every start, config.changed when the configuration differs; no secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from fedge.errors import FedgeError
from fl_server import server_runtime
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from fl_server.db.schema import AuditRecordRow
from fl_server.deployment import (
    DeploymentConfig,
    DeploymentLayout,
    FederationSection,
    ServerSection,
    load_config,
)
from fl_server.deployment_audit import record_config, recorded_config
from fl_server.deployment_init import init_deployment
from tests.helpers import stripes

PASSWORD = "hunter2-not-in-the-trail"
URL = f"postgresql://fedge:{PASSWORD}@db.internal:5432/fedge"


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


def _with(config: DeploymentConfig, **server: object) -> DeploymentConfig:
    return replace(config, server=replace(config.server, **server))  # type: ignore[arg-type]


def test_every_start_records_the_configuration_and_its_hash(audit: AuditLog) -> None:
    config = DeploymentConfig()

    (first,) = record_config(audit, config, run_id="run-1")
    (second,) = record_config(audit, config, run_id="run-2")

    assert first.kind is second.kind is AuditEventKind.CONFIG_LOADED
    assert first.run_id == "run-1"
    expected = recorded_config(config)
    assert dict(first.payload) == {"config_sha256": expected.sha256, "config": expected.values}
    assert first.payload == second.payload
    values = expected.values
    assert values["federation"]["model"] == "cnn"
    assert values["server"]["sans"] == ["localhost", "127.0.0.1"]


def test_a_changed_configuration_records_which_keys_changed(audit: AuditLog) -> None:
    before = DeploymentConfig()
    after = replace(
        _with(before, metrics_address="127.0.0.1:9500"),
        federation=FederationSection(rounds=7),
    )
    (loaded,) = record_config(audit, before)

    changed, loaded_again = record_config(audit, after)

    assert (changed.kind, loaded_again.kind) == (
        AuditEventKind.CONFIG_CHANGED,
        AuditEventKind.CONFIG_LOADED,
    )
    assert dict(changed.payload) == {
        "previous_sha256": loaded.payload["config_sha256"],
        "config_sha256": recorded_config(after).sha256,
        "previous_seq": loaded.seq,
        "changed_sections": ["federation", "server"],
        "changed_keys": ["federation.rounds", "server.metrics_address"],
    }
    assert loaded_again.payload["config_sha256"] == recorded_config(after).sha256
    # Back to the first: a change again, against the newest record.
    changed_back, _ = record_config(audit, before)
    assert changed_back.payload["previous_seq"] == loaded_again.seq


def test_the_database_password_never_reaches_the_trail(audit: AuditLog) -> None:
    config = _with(DeploymentConfig(), database_url=URL)
    record_config(audit, config)

    # A new password alone is not a change: its hash would be a brute-force target.
    same = record_config(audit, _with(config, database_url=URL.replace(PASSWORD, "other")))
    moved = record_config(audit, _with(config, database_url=URL.replace("db.internal", "db2")))

    assert [e.kind for e in same] == [AuditEventKind.CONFIG_LOADED]
    assert moved[0].payload["changed_keys"] == ["server.database_url"]
    trail = json.dumps([dict(e.payload) for e in audit.iter()])
    assert PASSWORD not in trail
    assert "other" not in trail
    assert "postgresql://fedge:***@db.internal:5432/fedge" in trail


@pytest.mark.parametrize(
    ("url", "recorded"),
    [
        ("", ""),
        ("sqlite:////srv/fedge/fedge.db", "sqlite:////srv/fedge/fedge.db"),
        ("postgresql://fedge@db/fedge", "postgresql://fedge@db/fedge"),
        ("not a url :: with secret", "***"),
        (
            "postgresql://u:p@db/fedge?sslmode=require&sslpassword=s3",
            "postgresql://u:***@db/fedge?sslmode=require&sslpassword=%2A%2A%2A",
        ),
    ],
)
def test_database_urls_are_recorded_without_their_password(url: str, recorded: str) -> None:
    values = recorded_config(_with(DeploymentConfig(), database_url=url)).values

    assert values["server"]["database_url"] == recorded


def test_a_damaged_previous_record_is_not_compared(engine: Engine, audit: AuditLog) -> None:
    (loaded,) = record_config(audit, DeploymentConfig())
    with Session(engine) as session, session.begin():
        session.execute(
            update(AuditRecordRow).where(AuditRecordRow.seq == loaded.seq).values(payload="{ bad")
        )

    events = record_config(audit, DeploymentConfig(server=ServerSection(superlink_port=9999)))

    assert [e.kind for e in events] == [AuditEventKind.CONFIG_LOADED]


def test_server_start_records_the_configuration_before_it_starts_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = init_deployment(tmp_path / "dep", now=datetime(2026, 3, 1, tzinfo=UTC))
    images, labels = stripes(12, seed=3)
    np.savez(layout.root / "eval.npz", images=images, labels=labels)

    @contextmanager
    def no_processes(layout: DeploymentLayout, config: DeploymentConfig) -> Iterator[None]:
        raise FedgeError("not starting processes in a unit test")
        yield

    monkeypatch.setattr(server_runtime, "supervised_processes", no_processes)
    config = load_config(layout.config)

    for _ in range(2):
        with pytest.raises(FedgeError, match="not starting processes"):
            server_runtime.serve_deployment(layout.root, run_id="run-start")

    engine = open_database(layout.database_url(config), create=False)
    try:
        loaded = [e for e in AuditLog(engine).iter() if e.kind is AuditEventKind.CONFIG_LOADED]
    finally:
        engine.dispose()
    assert [e.payload["config_sha256"] for e in loaded] == [recorded_config(config).sha256] * 2
    assert {e.run_id for e in loaded} == {"run-start"}
