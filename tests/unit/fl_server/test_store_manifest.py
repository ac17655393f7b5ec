from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.manifest import (
    ArtefactEntry,
    ArtefactFormat,
    Manifest,
    ManifestInvalid,
    Precision,
    SignedManifest,
    key_id_for,
    verify_manifest,
)
from fedge.errors import ConfigError, FedgeError, StorageError
from fl_server.store.keys import StoreKey

DIGEST = hashlib.sha256(b"weights").hexdigest()
OTHER_DIGEST = hashlib.sha256(b"onnx").hexdigest()
CREATED_AT = "2026-01-31T12:00:00Z"


def entry(name: str = "weights.npz", **changes: Any) -> ArtefactEntry:
    values: dict[str, Any] = {
        "name": name,
        "digest": DIGEST,
        "size": 1234,
        "format": ArtefactFormat.NPZ,
        "precision": Precision.FP32,
    }
    return ArtefactEntry(**(values | changes))


def manifest(**changes: Any) -> Manifest:
    values: dict[str, Any] = {
        "model": "fashion-cnn",
        "version": 3,
        "parent": 2,
        "artefacts": (
            entry(),
            entry(
                "model.int8.onnx",
                digest=OTHER_DIGEST,
                format=ArtefactFormat.ONNX,
                precision=Precision.INT8,
            ),
        ),
        "metadata": {"accuracy": 0.91, "rounds": [1, 2, 3], "dp": {"epsilon": 3.0}},
        "created_at": CREATED_AT,
    }
    return Manifest(**(values | changes))


def seeded_key(seed: int) -> StoreKey:
    return StoreKey.generate(lambda size: bytes([seed]) * size)


def test_canonical_bytes_are_sorted_compact_json() -> None:
    raw = manifest().canonical_bytes()

    decoded = json.loads(raw)
    assert raw == json.dumps(decoded, sort_keys=True, separators=(",", ":")).encode("ascii")
    assert decoded["artefacts"][1]["format"] == "onnx"
    assert decoded["artefacts"][1]["precision"] == "int8"


def test_canonical_bytes_ignore_metadata_insertion_order() -> None:
    forward = manifest(metadata={"a": 1, "b": {"x": 1, "y": 2}})
    backward = manifest(metadata={"b": {"y": 2, "x": 1}, "a": 1})

    assert forward.canonical_bytes() == backward.canonical_bytes()
    assert forward == backward


def test_canonical_bytes_are_ascii_only() -> None:
    raw = manifest(metadata={"note": "Zürich ✓"}).canonical_bytes()

    assert raw.isascii()
    assert json.loads(raw)["metadata"]["note"] == "Zürich ✓"


def test_json_round_trip_gives_an_equal_manifest() -> None:
    original = manifest()

    parsed = Manifest.from_json(json.loads(json.dumps(original.to_json())))

    assert parsed == original
    assert parsed.canonical_bytes() == original.canonical_bytes()
    assert hash(parsed) == hash(original)


def test_metadata_is_frozen_against_later_changes() -> None:
    metadata: dict[str, Any] = {"tags": ["a"]}
    built = manifest(metadata=metadata)
    before = built.canonical_bytes()

    metadata["tags"].append("b")
    metadata["new"] = 1

    assert built.canonical_bytes() == before
    with pytest.raises(TypeError):
        built.metadata["x"] = 1  # type: ignore[index]


def test_replace_keeps_frozen_metadata_valid() -> None:
    original = manifest()

    bumped = dataclasses.replace(original, version=4, parent=3)

    assert bumped.metadata == original.metadata


def test_sign_then_verify() -> None:
    key = seeded_key(1)
    signed = key.sign(manifest())

    assert signed.key_id == key.key_id == key_id_for(key.public_key_bytes())
    assert len(key.public_key_bytes()) == 32
    assert verify_manifest(signed, key.public_key_bytes()) == manifest()


def test_signed_manifest_survives_json() -> None:
    key = seeded_key(1)
    signed = key.sign(manifest())

    parsed = SignedManifest.from_json(json.loads(json.dumps(signed.to_json())))

    assert parsed == signed
    assert verify_manifest(parsed, key.public_key_bytes()) == manifest()


def test_key_id_is_a_prefix_of_the_public_key_hash() -> None:
    key = seeded_key(2)

    assert key.key_id == hashlib.sha256(key.public_key_bytes()).hexdigest()[:16]


@pytest.mark.parametrize(
    "tamper",
    [
        {"version": 4},
        {"parent": 1},
        {"model": "other-model"},
        {"created_at": "2026-01-31T12:00:01Z"},
        {"metadata": {"accuracy": 0.99}},
        {"artefacts": (entry(size=1235),)},
    ],
    ids=["version", "parent", "model", "created_at", "metadata", "artefacts"],
)
def test_a_tampered_manifest_is_refused(tamper: dict[str, Any]) -> None:
    key = seeded_key(1)
    signed = key.sign(manifest())
    forged = dataclasses.replace(signed, manifest=dataclasses.replace(signed.manifest, **tamper))

    with pytest.raises(ManifestInvalid, match="signature does not verify"):
        verify_manifest(forged, key.public_key_bytes())


def test_a_tampered_json_document_is_refused() -> None:
    key = seeded_key(1)
    document = key.sign(manifest()).to_json()
    document["manifest"]["artefacts"][0]["digest"] = "f" * 64

    with pytest.raises(ManifestInvalid):
        verify_manifest(SignedManifest.from_json(document), key.public_key_bytes())


def test_a_wrong_key_is_refused() -> None:
    signed = seeded_key(1).sign(manifest())
    other = seeded_key(2)

    with pytest.raises(ManifestInvalid, match="signed by key"):
        verify_manifest(signed, other.public_key_bytes())
    relabelled = dataclasses.replace(signed, key_id=other.key_id)
    with pytest.raises(ManifestInvalid, match="signature does not verify"):
        verify_manifest(relabelled, other.public_key_bytes())


@pytest.mark.parametrize("cut", [0, 1, 32, 63])
def test_a_truncated_signature_is_refused(cut: int) -> None:
    key = seeded_key(1)
    signed = key.sign(manifest())

    with pytest.raises(ManifestInvalid, match="signature does not verify"):
        verify_manifest(
            dataclasses.replace(signed, signature=signed.signature[:cut]),
            key.public_key_bytes(),
        )


def test_a_wrong_key_id_is_refused() -> None:
    key = seeded_key(1)
    signed = dataclasses.replace(key.sign(manifest()), key_id="0" * 16)

    with pytest.raises(ManifestInvalid, match="signed by key 0000000000000000"):
        verify_manifest(signed, key.public_key_bytes())


def test_manifest_invalid_is_not_an_os_error() -> None:
    assert issubclass(ManifestInvalid, FedgeError)
    assert not issubclass(ManifestInvalid, OSError)


def test_a_malformed_public_key_is_a_config_error() -> None:
    signed = seeded_key(1).sign(manifest())

    with pytest.raises(ConfigError, match="32 raw bytes"):
        verify_manifest(signed, b"\x01" * 31)


def as_json(**changes: Any) -> dict[str, Any]:
    return manifest().to_json() | changes


def artefact_json(**changes: Any) -> dict[str, Any]:
    return entry().to_json() | changes


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (as_json(model="../x"), "model name must match"),
        (as_json(model=""), "model name must match"),
        (as_json(model="m" * 65), "model name must match"),
        (as_json(model=".."), "model name must match"),
        (as_json(model=7), "model name must match"),
        (as_json(version=0), "version must be an int >= 1"),
        (as_json(version=True), "version must be an int >= 1"),
        (as_json(version="3"), "version must be an int >= 1"),
        (as_json(parent=3), "parent 3 must be < version 3"),
        (as_json(parent=5), "parent 5 must be < version 3"),
        (as_json(parent=0), "parent must be an int >= 1"),
        (as_json(artefacts=[]), "non-empty tuple"),
        (as_json(artefacts={"a": 1}), "artefacts must be a JSON array"),
        (as_json(artefacts=[artefact_json(), artefact_json()]), "names must be unique"),
        (as_json(artefacts=[artefact_json(name="../w")]), "artefact name must match"),
        (as_json(artefacts=[artefact_json(name=".")]), "artefact name must match"),
        (as_json(artefacts=[artefact_json(name="a/b")]), "artefact name must match"),
        (as_json(artefacts=[artefact_json(digest="../etc")]), "64 lowercase hex"),
        (as_json(artefacts=[artefact_json(digest=DIGEST.upper())]), "64 lowercase hex"),
        (as_json(artefacts=[artefact_json(size=-1)]), "artefact size must be an int >= 0"),
        (as_json(artefacts=[artefact_json(size=1.5)]), "artefact size must be an int >= 0"),
        (as_json(artefacts=[artefact_json(format="pt")]), "ArtefactFormat must be one of"),
        (as_json(artefacts=[artefact_json(precision="fp8")]), "Precision must be one of"),
        (as_json(artefacts=[artefact_json(extra=1)]), "exactly the keys"),
        (as_json(artefacts=["x"]), "an artefact must be a JSON object"),
        (as_json(metadata={"loss": math.nan}), "finite, plain JSON"),
        (as_json(metadata={"loss": math.inf}), "finite, plain JSON"),
        (as_json(metadata={"nested": [{"x": -math.inf}]}), "finite, plain JSON"),
        (as_json(metadata={1: "int key"}), "plain JSON"),
        (as_json(metadata={"set": {1, 2}}), "finite, plain JSON"),
        (as_json(metadata=[1, 2]), "metadata must be a mapping"),
        (as_json(created_at="2026-01-31"), "created_at must be an ISO 8601 UTC time"),
        (as_json(created_at="2026-01-31T12:00:00+02:00"), "created_at must be"),
        (as_json(created_at="2026-13-31T12:00:00Z"), "created_at must be"),
        (as_json(created_at=20260131), "created_at must be"),
        (as_json(extra="x"), "exactly the keys"),
        ({"model": "m"}, "exactly the keys"),
    ],
)
def test_from_json_rejects_malformed_input(document: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Manifest.from_json(document)


def test_from_json_rejects_a_non_object() -> None:
    with pytest.raises(ConfigError, match="a manifest must be a JSON object"):
        Manifest.from_json([])  # type: ignore[arg-type]


def test_a_first_version_has_no_parent() -> None:
    first = manifest(version=1, parent=None)

    assert Manifest.from_json(first.to_json()) == first


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"manifest": {}, "signature": "", "key_id": "0" * 16, "x": 1}, "exactly the keys"),
        ({"manifest": None, "signature": 5, "key_id": "0" * 16}, "signature must be a base64"),
        ({"manifest": None, "signature": "@@", "key_id": "0" * 16}, "not valid base64"),
    ],
)
def test_signed_from_json_rejects_malformed_input(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SignedManifest.from_json(document)


def test_signed_from_json_rejects_a_malformed_key_id() -> None:
    document = seeded_key(1).sign(manifest()).to_json()
    document["key_id"] = "../../etc"

    with pytest.raises(ConfigError, match="key_id must be 16 lowercase hex"):
        SignedManifest.from_json(document)


@given(
    metadata=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=8),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=4), children, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=4,
    )
)
def test_any_json_metadata_round_trips_with_the_same_bytes(metadata: dict[str, Any]) -> None:
    built = manifest(metadata=metadata)

    parsed = Manifest.from_json(json.loads(built.canonical_bytes()))

    assert parsed.canonical_bytes() == built.canonical_bytes()


def test_load_or_create_writes_0600_and_reloads_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "store.pem"

    created = StoreKey.load_or_create(path)
    loaded = StoreKey.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert loaded.public_key_bytes() == created.public_key_bytes()
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.pem"]
    assert verify_manifest(created.sign(manifest()), loaded.public_key_bytes()) == manifest()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_or_create_refuses_a_key_others_can_read(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "store.pem"
    StoreKey.load_or_create(path)
    path.chmod(mode)

    with pytest.raises(ConfigError, match=f"has mode {mode:o}.*chmod 600"):
        StoreKey.load_or_create(path)


def test_load_or_create_refuses_a_file_that_is_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "store.pem"
    path.write_bytes(b"not a key")
    path.chmod(0o600)

    with pytest.raises(ConfigError, match="not an unencrypted PKCS8 PEM key") as raised:
        StoreKey.load_or_create(path)
    assert "not a key" not in str(raised.value)


def test_load_or_create_reports_an_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with pytest.raises(StorageError, match=r"cannot (open|create) the store key"):
        StoreKey.load_or_create(tmp_path / "file" / "store.pem")


def test_store_key_never_shows_its_private_half() -> None:
    key = seeded_key(3)

    assert repr(key) == f"StoreKey(key_id={key.key_id!r})"
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key)


def test_entries_validate_on_construction() -> None:
    with pytest.raises(ConfigError, match="artefact format must be an ArtefactFormat"):
        entry(format="npz")
    with pytest.raises(ConfigError, match="artefact precision must be a Precision"):
        entry(precision="fp32")
    with pytest.raises(ConfigError, match="non-empty tuple"):
        manifest(artefacts=[entry()])
