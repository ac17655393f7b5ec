"""``store gc`` removes the temporary files of abandoned writes, never a write in progress."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from fl_server.store import cli, serve
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact

DAY = 86_400


def _home(tmp_path: Path) -> Path:
    """A fedge home holding a store with one version."""
    home = tmp_path / "home"
    engine = open_database(f"sqlite:///{home / 'fedge.db'}")
    try:
        store = ModelStore(
            engine,
            FileBlobStore(home / "store"),
            StoreKey.load_or_create(home / "store" / "store-key.pem"),
            audit=AuditLog(engine),
        )
        store.publish("cnn", [NewArtefact(name="weights.npz", data=b"weights")])
    finally:
        engine.dispose()
    return home


def _temporary(store_dir: Path, name: str, *, age_s: float) -> Path:
    path = store_dir / "tmp" / name
    path.write_bytes(b"half an object")
    moment = time.time() - age_s
    os.utime(path, (moment, moment))
    return path


def test_gc_removes_stale_temporaries_and_keeps_a_write_in_progress(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
    audit = AuditLog(engine)
    store = ModelStore(engine, FileBlobStore(tmp_path / "store"), StoreKey.generate(), audit=audit)
    store.publish("cnn", [NewArtefact(name="weights.npz", data=b"weights")])
    stale = _temporary(tmp_path / "store", "123-deadbeef.tmp", age_s=DAY)
    in_progress = _temporary(tmp_path / "store", "456-cafe.tmp", age_s=1)
    unrelated = _temporary(tmp_path / "store", "notes.txt", age_s=DAY)

    dry = store.gc(keep_last=5, dry_run=True)
    assert dry["temporaries_deleted"] == 1 and stale.exists()
    counts = store.gc(keep_last=5)

    assert counts == {"versions_deleted": 0, "objects_deleted": 0, "temporaries_deleted": 1}
    assert not stale.exists() and in_progress.exists() and unrelated.exists()
    (event,) = [e for e in audit.iter() if e.kind is AuditEventKind.STORE_GC]
    assert event.payload == {"keep_last": 5, **counts}
    assert store.verify("cnn").ok
    engine.dispose()


def test_fedge_store_gc_reports_the_temporaries(tmp_path: Path) -> None:
    home = _home(tmp_path)
    stale = _temporary(home / "store", "9-feed.tmp", age_s=DAY)
    runner = CliRunner()

    dry = runner.invoke(cli.store_app, ["gc", "--dry-run", "--home", str(home)])
    assert dry.exit_code == 0, dry.output
    assert dry.output.strip() == "would delete 0 versions, 0 objects and 1 stale temporary files"
    assert stale.exists()
    done = runner.invoke(cli.store_app, ["gc", "--home", str(home)])
    assert done.output.strip() == "deleted 0 versions, 0 objects and 1 stale temporary files"
    assert not stale.exists()


class _FakeServer:
    seen: ClassVar[dict[str, Any]] = {}

    def __init__(self, store: ModelStore, **options: Any) -> None:
        _FakeServer.seen = options
        self.port = 1

    def __enter__(self) -> _FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _stop_at_once(seconds: float) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("explicit", [False, True])
def test_fedge_store_serve_appends_its_access_log_in_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, explicit: bool
) -> None:
    from tests.helpers import self_signed_certificate

    home = _home(tmp_path)
    cert, key = self_signed_certificate(tmp_path / "tls")
    monkeypatch.setattr(serve, "StoreServer", _FakeServer)
    monkeypatch.setattr("fl_server.store.cli.time.sleep", _stop_at_once)
    chosen = tmp_path / "elsewhere" / "access.log"
    arguments = ["serve", "--tls-cert", str(cert), "--tls-key", str(key)]
    arguments += ["--authority-key", "ab" * 32, "--home", str(home)]

    result = CliRunner().invoke(
        cli.store_app, arguments + (["--access-log", str(chosen)] if explicit else [])
    )

    assert result.exit_code == 0, result.output
    expected = chosen if explicit else home / "logs" / "store-access.log"
    assert _FakeServer.seen["access_log"] == expected
    assert f"access log {expected}" in result.output


def test_fedge_store_serve_refuses_an_access_log_it_cannot_write(tmp_path: Path) -> None:
    from tests.helpers import self_signed_certificate

    home = _home(tmp_path)
    cert, key = self_signed_certificate(tmp_path / "tls")
    arguments = ["serve", "--tls-cert", str(cert), "--tls-key", str(key)]
    arguments += ["--authority-key", "ab" * 32, "--home", str(home), "--access-log", str(home)]

    result = CliRunner().invoke(cli.store_app, arguments)

    assert result.exit_code != 0
    assert "is a directory" in str(result.exception)
