"""The store's database edited by hand: what a device or a release manager acts on is signed.

Status (offered or rejected), measured quality, version number and searchable
columns live inside the signed manifest; an index that disagrees with it is
refused with one clear line, never served, listed or exported.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edge_runtime.manifest import (
    OFFER_KEY,
    ArtefactFormat,
    Manifest,
    Precision,
    SignedManifest,
    offer_of,
    offered_names,
)
from fedge.errors import ConfigError
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.store import ModelStore, NewArtefact, StoreTampered, VersionInfo
from tests.unit.fedge.test_cli_errors import assert_one_error_line, run_cli


def _publish(root: Path) -> tuple[ModelStore, dict[str, str]]:
    url = f"sqlite:///{root / 'fedge.db'}"
    store = ModelStore(
        open_database(url),
        FileBlobStore(root / "store"),
        StoreKey.load_or_create(root / "store" / "store-key.pem"),
    )
    store.publish(
        "cnn",
        [
            NewArtefact(name="weights.npz", data=b"w1"),
            NewArtefact(
                name="model-int8-static.onnx",
                data=b"int8",
                format=ArtefactFormat.ONNX,
                precision=Precision.INT8,
                quality={"accuracy": 0.13},
            ),
            NewArtefact(
                name="model-int4.onnx",
                data=b"int4",
                format=ArtefactFormat.ONNX,
                precision=Precision.INT4,
                quality={"accuracy": 0.1},
                rejected=True,
            ),
        ],
        info=VersionInfo(run_id="run-1", server_round=3, dp_epsilon=3.0, dp_delta=1e-5),
    )
    return store, {"--db-url": url, "--store-dir": str(root / "store")}


def _sql(root: Path, statement: str, *args: object) -> None:
    with sqlite3.connect(root / "fedge.db") as connection:
        assert connection.execute(statement, args).rowcount >= 1


def _options(env: dict[str, str]) -> list[str]:
    return [part for item in env.items() for part in item]


def test_statuses_and_quality_are_inside_the_signature(tmp_path: Path) -> None:
    store, _ = _publish(tmp_path)
    version = store.get("cnn", 1)
    assert offered_names(version.manifest) == ["weights.npz", "model-int8-static.onnx"]
    offers = offer_of(version.manifest)
    assert offers is not None and offers["model-int8-static.onnx"].quality == {"accuracy": 0.13}
    assert version.statuses_signed
    assert store.is_offered(version.manifest.artefacts[1].digest)
    assert not store.is_offered(version.manifest.artefacts[2].digest)


TAMPERING = {
    "status flipped to rejected": (
        "UPDATE model_artefacts SET status='rejected' WHERE name='model-int8-static.onnx'",
        "status or quality of model-int8-static.onnx",
    ),
    "rejected flipped to offered": (
        "UPDATE model_artefacts SET status='offered' WHERE name='model-int4.onnx'",
        "status or quality of model-int4.onnx",
    ),
    "accuracy dressed up": (
        """UPDATE model_artefacts SET quality='{"accuracy": 0.99}'
           WHERE name='model-int8-static.onnx'""",
        "status or quality of model-int8-static.onnx",
    ),
    "artefact row deleted": (
        "DELETE FROM model_artefacts WHERE name='model-int8-static.onnx'",
        r"missing \['model-int8-static.onnx'\]",
    ),
    "digest swapped": (
        """UPDATE model_artefacts SET digest=(SELECT digest FROM model_artefacts
           WHERE name='model-int4.onnx') WHERE name='model-int8-static.onnx'""",
        "row of model-int8-static.onnx differs",
    ),
    "epsilon column edited": (
        "UPDATE model_versions SET dp_epsilon=0.5",
        r"dp_epsilon=0.5 but the signed manifest says 3.0",
    ),
    "run column edited": (
        "UPDATE model_versions SET run_id='another-run'",
        "run_id='another-run'",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_an_index_edit_is_refused_everywhere(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, env = _publish(tmp_path)
    digests = [a.digest for a in store.get("cnn", 1).manifest.artefacts]
    statement, message = TAMPERING[case]
    _sql(tmp_path, statement)

    with pytest.raises(StoreTampered, match=message):
        store.get("cnn", 1)
    # Nothing of a tampered version is handed to a device.
    assert not any(store.is_offered(digest) for digest in digests)
    report = store.verify("cnn", 1)
    assert not report.ok and report.problem is not None
    for command in (["list"], ["variants", "cnn", "1"], ["show", "cnn", "1"]):
        code, _, err = run_cli(capsys, "store", *command, *_options(env))
        assert code == 1, command
        assert_one_error_line(err, "tampered")
    out = tmp_path / "bundle"
    code, _, err = run_cli(capsys, "store", "export", "cnn", "1", str(out), *_options(env))
    assert code == 1
    assert_one_error_line(err, "tampered")
    assert not out.exists() or not any(out.iterdir())
    code, stdout, _ = run_cli(capsys, "store", "verify", "cnn", "1", *_options(env))
    assert code == 1 and "tampered" in stdout


def test_a_forged_manifest_is_never_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, env = _publish(tmp_path)
    genuine = store.get("cnn", 1).signed
    forged = SignedManifest(genuine.manifest, bytes(64), genuine.key_id)
    _sql(tmp_path, "UPDATE model_versions SET manifest=?", json.dumps(forged.to_json()))

    out = tmp_path / "bundle"
    code, _, err = run_cli(capsys, "store", "export", "cnn", "1", str(out), *_options(env))

    assert code == 1
    assert_one_error_line(err, "signature does not verify")
    assert not out.exists() or not any(out.iterdir())
    report = store.verify("cnn", 1)
    assert not report.signature_ok


def test_a_legacy_manifest_without_signed_statuses_is_read_from_the_database(
    tmp_path: Path,
) -> None:
    store, _ = _publish(tmp_path)
    genuine = store.get("cnn", 1).manifest
    metadata = {k: v for k, v in genuine.to_json()["metadata"].items() if k != OFFER_KEY}
    legacy = Manifest.from_json({**genuine.to_json(), "metadata": metadata})
    key = StoreKey.load_or_create(tmp_path / "store" / "store-key.pem")
    _sql(tmp_path, "UPDATE model_versions SET manifest=?", json.dumps(key.sign(legacy).to_json()))

    version = store.get("cnn", 1)

    assert not version.statuses_signed
    assert offered_names(version.manifest) is None
    assert version.statuses["model-int4.onnx"] == "rejected"


@pytest.mark.parametrize(
    ("offer", "message"),
    [
        ({"a.npz": {"status": "offered", "quality": {}}}, "must name exactly the artefacts"),
        ({"w.npz": {"status": "maybe", "quality": {}}}, "offered or rejected"),
        ({"w.npz": {"status": "offered"}}, "exactly the keys"),
        ({"w.npz": {"status": "offered", "quality": {"acc": "high"}}}, "map names to numbers"),
        ([], "must name exactly the artefacts"),
    ],
)
def test_a_malformed_offer_is_refused_by_the_parser(offer: object, message: str) -> None:
    raw = {
        "model": "cnn",
        "version": 1,
        "parent": None,
        "artefacts": [
            {"name": "w.npz", "digest": "a" * 64, "size": 1, "format": "npz", "precision": "fp32"}
        ],
        "metadata": {OFFER_KEY: offer},
        "created_at": "2026-12-02T12:00:00Z",
    }
    with pytest.raises(ConfigError, match=message):
        Manifest.from_json(raw)


def test_a_rotten_object_stops_an_export_before_any_file_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, env = _publish(tmp_path)
    last = store.get("cnn", 1).manifest.artefacts[1]
    path = tmp_path / "store" / "objects" / last.digest[:2] / last.digest
    path.chmod(0o644)
    path.write_bytes(b"rotten")

    out = tmp_path / "bundle"
    code, _, err = run_cli(capsys, "store", "export", "cnn", "1", str(out), *_options(env))

    assert code == 1
    assert_one_error_line(err, "corrupt.*nothing exported")
    assert not out.exists() or not any(out.iterdir())
