"""The model store on SQLite and PostgreSQL: versions, lineage, aliases, verification, GC."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from edge_runtime.manifest import ArtefactFormat, Precision, verify_manifest
from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact, VersionInfo


@pytest.fixture
def store(engine: Engine, tmp_path: Path) -> ModelStore:
    return ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())


def _weights(tag: bytes) -> NewArtefact:
    return NewArtefact(name="weights.npz", data=b"weights-" + tag)


def test_versions_are_numbered_signed_and_carry_their_lineage(store: ModelStore) -> None:
    first = store.publish("cnn", [_weights(b"1")], info=VersionInfo(run_id="r1", server_round=1))
    second = store.publish(
        "cnn",
        [
            _weights(b"2"),
            NewArtefact(
                name="model-int8.onnx",
                data=b"onnx-int8",
                format=ArtefactFormat.ONNX,
                precision=Precision.INT8,
                quality={"accuracy": 0.81},
            ),
        ],
        parent=1,
        info=VersionInfo(dp_epsilon=2.5, dp_delta=1e-5, participants=10, metrics={"acc": 0.8}),
    )
    third = store.publish("cnn", [_weights(b"2")], parent=2)

    assert [v.manifest.version for v in (first, second, third)] == [1, 2, 3]
    assert store.ancestors("cnn", 3) == [2, 1]
    # Identical bytes are stored once.
    assert third.manifest.artefacts[0].digest == second.manifest.artefacts[0].digest
    loaded = store.get("cnn", 2)
    assert loaded.manifest == second.manifest
    assert loaded.manifest.metadata["dp_epsilon"] == 2.5
    assert loaded.quality["model-int8.onnx"] == {"accuracy": 0.81}
    assert verify_manifest(loaded.signed, store.public_key) == loaded.manifest
    assert store.verify("cnn", 2).ok
    assert store.get("cnn").manifest.version == 3
    assert [v.manifest.version for v in store.versions("cnn")] == [1, 2, 3]


def test_a_rejected_variant_is_recorded_but_never_offered(store: ModelStore) -> None:
    version = store.publish(
        "cnn",
        [
            _weights(b"x"),
            NewArtefact(
                name="model-int4.onnx",
                data=b"int4",
                format=ArtefactFormat.ONNX,
                precision=Precision.INT4,
                quality={"accuracy": 0.2},
                rejected=True,
            ),
        ],
    )
    stored = store.get("cnn", version.manifest.version)
    assert [a.name for a in stored.offered()] == ["weights.npz"]
    assert stored.statuses["model-int4.onnx"] == "rejected"


def test_aliases_move_atomically_and_resolve(store: ModelStore) -> None:
    store.publish("cnn", [_weights(b"1")])
    store.publish("cnn", [_weights(b"2")])

    assert store.tag("cnn", "production", 1) is None
    assert store.tag("cnn", "production", 2) == 1
    assert store.resolve("cnn", "production") == 2
    assert store.aliases("cnn") == {"production": 2}
    with pytest.raises(ConfigError, match="no version 9"):
        store.tag("cnn", "canary", 9)
    with pytest.raises(ConfigError, match="alias"):
        store.tag("cnn", "../prod", 1)
    with pytest.raises(ConfigError, match="no alias"):
        store.resolve("cnn", "canary")


def test_verify_reports_a_corrupt_or_missing_object(store: ModelStore, tmp_path: Path) -> None:
    version = store.publish("cnn", [_weights(b"1"), NewArtefact(name="b.npz", data=b"bee")])
    entries = {a.name: a.digest for a in version.manifest.artefacts}
    objects = tmp_path / "blobs" / "objects"
    corrupt = objects / entries["weights.npz"][:2] / entries["weights.npz"]
    corrupt.chmod(0o644)
    corrupt.write_bytes(b"tampered")
    missing = objects / entries["b.npz"][:2] / entries["b.npz"]
    missing.chmod(0o644)
    missing.unlink()

    report = store.verify("cnn", 1)

    assert not report.ok and report.signature_ok
    assert report.artefacts == {"weights.npz": "corrupt", "b.npz": "missing"}


def test_a_manifest_signed_by_another_key_fails_verification(
    engine: Engine, tmp_path: Path
) -> None:
    blobs = FileBlobStore(tmp_path / "blobs")
    ModelStore(engine, blobs, StoreKey.generate()).publish("cnn", [_weights(b"1")])

    report = ModelStore(engine, blobs, StoreKey.generate()).verify("cnn", 1)

    assert not report.signature_ok and not report.ok


def test_gc_keeps_the_last_versions_and_aliased_ones(store: ModelStore) -> None:
    for tag in (b"1", b"2", b"3", b"4"):
        store.publish("cnn", [_weights(tag)])
    store.tag("cnn", "production", 1)
    orphan = store.blobs.put(b"never referenced")

    # A fresh unreferenced object may be an in-flight publish: it stays by default.
    assert store.gc(keep_last=2, dry_run=True) == {
        "versions_deleted": 1,
        "objects_deleted": 0,
        "temporaries_deleted": 0,
    }
    counts = store.gc(keep_last=2, min_age_s=0)

    assert counts == {"versions_deleted": 1, "objects_deleted": 2, "temporaries_deleted": 0}
    assert [v.manifest.version for v in store.versions("cnn")] == [1, 3, 4]
    assert not store.blobs.exists(orphan.digest)
    assert all(store.verify("cnn", v).ok for v in (1, 3, 4))
    # Numbers are never reused after GC.
    assert store.publish("cnn", [_weights(b"5")]).manifest.version == 5


def test_bad_input_is_refused_and_nothing_is_stored(store: ModelStore) -> None:
    with pytest.raises(ConfigError):
        store.publish("../cnn", [_weights(b"1")])
    with pytest.raises(ConfigError):
        store.publish("cnn", [NewArtefact(name="../../etc/passwd", data=b"x")])
    with pytest.raises(ConfigError, match="parent"):
        store.publish("cnn", [_weights(b"1")], parent=3)
    with pytest.raises(ConfigError):
        store.publish("cnn", [])
    assert store.versions() == []


def test_diff_names_what_changed_between_versions(store: ModelStore) -> None:
    store.publish("cnn", [_weights(b"1")], info=VersionInfo(server_round=1, metrics={"a": 0.5}))
    store.publish(
        "cnn",
        [_weights(b"2"), NewArtefact(name="extra.npz", data=b"e")],
        parent=1,
        info=VersionInfo(server_round=2, metrics={"a": 0.5}),
    )

    diff = store.diff("cnn", 1, 2)

    assert diff["metadata"] == {"server_round": [1, 2]}
    assert set(diff["artefacts"]) == {"weights.npz", "extra.npz"}
    assert diff["artefacts"]["extra.npz"][0] is None
    assert store.diff("cnn", 2, 2) == {"metadata": {}, "artefacts": {}}


def test_a_non_finite_quality_is_refused_before_anything_is_written(store: ModelStore) -> None:
    bad = NewArtefact(name="m.onnx", data=b"m", quality={"accuracy": float("nan")})
    with pytest.raises(ConfigError, match="finite"):
        store.publish("cnn", [bad])
    assert list(store.blobs.digests()) == [] and store.versions() == []


def test_publish_tag_and_gc_are_audited_in_their_own_transaction(
    engine: Engine, tmp_path: Path
) -> None:
    audit = AuditLog(engine)
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate(), audit=audit)
    first = store.publish("cnn", [_weights(b"1")], info=VersionInfo(run_id="run-a"))
    store.publish("cnn", [_weights(b"2")], parent=1)
    store.tag("cnn", "production", 2)
    store.gc(keep_last=1, min_age_s=0)

    events = list(audit.iter())
    assert [e.kind for e in events] == [
        AuditEventKind.MODEL_PUBLISHED,
        AuditEventKind.MODEL_PUBLISHED,
        AuditEventKind.ALIAS_MOVED,
        AuditEventKind.STORE_GC,
    ]
    assert events[0].run_id == "run-a"
    assert events[0].payload["artefacts"] == {"weights.npz": first.manifest.artefacts[0].digest}
    assert events[2].payload == {
        "model": "cnn",
        "alias": "production",
        "version": 2,
        "previous": None,
    }
    assert events[3].payload == {
        "keep_last": 1,
        "versions_deleted": 1,
        "objects_deleted": 1,
        "temporaries_deleted": 0,
    }
    assert audit.verify().ok


def test_a_publish_whose_audit_record_fails_leaves_no_version(
    engine: Engine, tmp_path: Path
) -> None:
    # A naive clock makes the audit append fail inside the publish transaction.
    broken = AuditLog(engine, clock=lambda: datetime(2026, 1, 1))
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate(), audit=broken)

    with pytest.raises(ConfigError, match="timezone"):
        store.publish("cnn", [_weights(b"1")])

    assert store.versions() == []
    assert list(AuditLog(engine).iter()) == []
    # The next publish still gets number 1: the failed one left nothing behind.
    fine = ModelStore(engine, store.blobs, StoreKey.generate(), audit=AuditLog(engine))
    assert fine.publish("cnn", [_weights(b"1")]).manifest.version == 1


def test_the_audit_log_must_share_the_store_database(engine: Engine, tmp_path: Path) -> None:
    other = open_database(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        with pytest.raises(ConfigError, match="own database"):
            ModelStore(
                engine, FileBlobStore(tmp_path / "b"), StoreKey.generate(), audit=AuditLog(other)
            )
    finally:
        other.dispose()


def test_republished_bytes_are_protected_by_the_gc_grace_period(
    engine: Engine, tmp_path: Path
) -> None:
    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())
    old = store.blobs.put(b"republished later")
    path = tmp_path / "blobs" / "objects" / old.digest[:2] / old.digest
    os.utime(path, (1_000_000_000, 1_000_000_000))  # an object stored long ago
    assert store.gc(keep_last=1, dry_run=True)["objects_deleted"] == 1

    store.blobs.put(b"republished later")  # a publish in flight stores the same bytes again

    assert store.gc(keep_last=1)["objects_deleted"] == 0
    assert store.blobs.exists(old.digest)


def test_a_created_store_key_is_audited_once_by_its_public_names(
    engine: Engine, tmp_path: Path
) -> None:
    audit = AuditLog(engine)
    path = tmp_path / "keys" / "store-key.pem"

    key = StoreKey.load_or_create(path, audit=audit, created_by="test")
    again = StoreKey.load_or_create(path, audit=audit, created_by="test")

    assert again.key_id == key.key_id
    (event,) = list(audit.iter())
    assert event.kind is AuditEventKind.KEY_CREATED
    assert dict(event.payload) == {
        "purpose": "store_signing",
        "algorithm": "ed25519",
        "key_id": key.key_id,
        "public_key": key.public_key_bytes().hex(),
        "fingerprint_sha256": None,
        "not_after": None,
        "created_by": "test",
    }
    assert path.read_text(encoding="ascii").split("-----")[2].strip() not in str(event.payload)


def test_a_store_key_that_cannot_be_audited_is_kept_and_named(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(engine)

    def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("database down")

    monkeypatch.setattr(audit, "append", broken)
    path = tmp_path / "store-key.pem"

    with pytest.raises(StorageError, match=r"created store signing key [0-9a-f]{16} but could not"):
        StoreKey.load_or_create(path, audit=audit)
    assert StoreKey.load_or_create(path, audit=audit).key_id  # kept; loading records nothing


def test_a_version_row_holding_another_versions_signed_manifest_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    from sqlalchemy import select, update
    from sqlalchemy.orm import Session

    from fl_server.db.schema import ModelVersionRow

    store = ModelStore(engine, FileBlobStore(tmp_path / "blobs"), StoreKey.generate())
    store.publish("cnn", [_weights(b"1")])
    store.publish("cnn", [_weights(b"2")], parent=1)
    with Session(engine) as session, session.begin():
        old = session.scalars(
            select(ModelVersionRow.manifest).where(ModelVersionRow.version == 1)
        ).one()
        session.execute(
            update(ModelVersionRow).where(ModelVersionRow.version == 2).values(manifest=old)
        )

    with pytest.raises(StorageError, match="cnn v2 holds the signed manifest of cnn v1"):
        store.get("cnn", "latest")
    report = store.verify("cnn", 2)
    assert not report.ok and "tampered" in (report.problem or "")
    assert store.get("cnn", 1).manifest.version == 1
