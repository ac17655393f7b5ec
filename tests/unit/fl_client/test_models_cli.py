"""``fedge client models install|rollback``: verified sideloads that report what they did.

Bundles here hold small stand-in bytes (the cache checks signatures and digests, never
parses ONNX), signed with a fixed key, with and without a signed artefact offer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.manifest import (
    OFFER_KEY,
    SIGNING_CONTEXT,
    ArtefactEntry,
    ArtefactFormat,
    Manifest,
    Precision,
    SignedManifest,
    key_id_for,
)
from fedge.cli import main

STORE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEY_HEX = STORE_KEY.public_key().public_bytes_raw().hex()
INT8, FP32, REFERENCE = "model-int8-static.onnx", "model-fp32.onnx", "drift-reference.json"


def blob(version: int, name: str, size: int = 8192) -> bytes:
    seed = hashlib.sha256(f"{version}/{name}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def signed_manifest(
    version: int, artefacts: Mapping[str, bytes], *, offer: Mapping[str, str] | None = None
) -> SignedManifest:
    metadata: dict[str, object] = {"round": version}
    if offer is not None:
        metadata[OFFER_KEY] = {
            name: {"status": status, "quality": {"accuracy": 0.9}} for name, status in offer.items()
        }
    manifest = Manifest(
        model="cnn",
        version=version,
        parent=version - 1 if version > 1 else None,
        artefacts=tuple(
            ArtefactEntry(
                name=name,
                digest=hashlib.sha256(data).hexdigest(),
                size=len(data),
                format=ArtefactFormat.JSON if name.endswith(".json") else ArtefactFormat.ONNX,
                precision=Precision.INT8 if "int8" in name else Precision.FP32,
            )
            for name, data in artefacts.items()
        ),
        metadata=metadata,
        created_at="2026-01-31T12:00:00Z",
    )
    signature = STORE_KEY.sign(SIGNING_CONTEXT + manifest.canonical_bytes())
    return SignedManifest(
        manifest, signature, key_id_for(STORE_KEY.public_key().public_bytes_raw())
    )


def bundle(
    root: Path,
    version: int,
    names: tuple[str, ...] = (FP32, REFERENCE),
    *,
    offer: Mapping[str, str] | None = None,
) -> Path:
    """Write the bundle ``fedge store export`` would write for ``version``."""
    data = {name: blob(version, name) for name in names}
    count = len(list(root.iterdir())) if root.exists() else 0
    directory = root / f"bundle-{version}-{count}"
    directory.mkdir(parents=True)
    for name, content in data.items():
        (directory / name).write_bytes(content)
    document = signed_manifest(version, data, offer=offer).to_json()
    (directory / "manifest.json").write_text(json.dumps(document))
    return directory


def fedge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def install(
    capsys: pytest.CaptureFixture[str], cache: Path, source: Path, *extra: str
) -> tuple[int, str, str]:
    return fedge(
        capsys,
        "client",
        "models",
        "install",
        str(source),
        "--store-key",
        KEY_HEX,
        "--cache-dir",
        str(cache),
        *extra,
    )


def one_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedge: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of each file (None for a directory)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.name != "lock"
    }


def test_a_tampered_bundle_of_the_installed_version_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    genuine = bundle(tmp_path / "bundles", 1)
    assert install(capsys, cache, genuine)[0] == 0
    before = snapshot(cache)
    tampered = bundle(tmp_path / "bundles", 1)
    model = tampered / FP32
    model.write_bytes(b"X" + model.read_bytes()[1:])

    code, out, err = install(capsys, cache, tampered)

    assert code == 1 and "verified" not in out
    one_error(err, r"model-fp32\.onnx hashes to [0-9a-f]{64}, the signed manifest says")
    assert snapshot(cache) == before


def test_a_tampered_companion_of_the_installed_version_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert install(capsys, cache, bundle(tmp_path / "bundles", 1))[0] == 0
    before = snapshot(cache)
    tampered = bundle(tmp_path / "bundles", 1)
    (tampered / REFERENCE).write_bytes(b"{}" + (tampered / REFERENCE).read_bytes()[2:])

    code, _, err = install(capsys, cache, tampered)

    assert code == 1
    one_error(err, r"drift-reference\.json hashes to")
    assert snapshot(cache) == before


def test_a_failed_install_leaves_no_partial_version(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert install(capsys, cache, bundle(tmp_path / "bundles", 1))[0] == 0
    before = snapshot(cache)
    broken = bundle(tmp_path / "bundles", 2)  # a good drift reference, a bad model
    (broken / FP32).write_bytes((broken / FP32).read_bytes()[:-1])

    code, _, err = install(capsys, cache, broken)

    assert code == 1
    one_error(err, r"model-fp32\.onnx has 8191 bytes, the signed manifest says 8192")
    assert snapshot(cache) == before  # no versions/cnn/2 holding only the drift reference
    assert not (cache / "versions" / "cnn" / "2").exists()


def test_install_reports_what_it_did(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cache, bundles = tmp_path / "cache", tmp_path / "bundles"
    first, second = bundle(bundles, 1), bundle(bundles, 2)

    code, out, _ = install(capsys, cache, first)
    assert code == 0
    assert out.splitlines() == [
        "installed cnn v1 model-fp32.onnx (+ drift-reference.json): signature and SHA-256 "
        "verified (16,384 bytes), 16,384 bytes written; now current",
        "rollback: no previous version is cached",
    ]
    code, out, _ = install(capsys, cache, second)
    assert code == 0 and out.splitlines()[0].startswith("installed cnn v2 model-fp32.onnx")
    assert out.splitlines()[0].endswith("now current (was v1 model-fp32.onnx)")
    assert out.splitlines()[1] == "rollback: v1 model-fp32.onnx stays cached"

    code, out, _ = install(capsys, cache, second)  # the same bundle again
    assert code == 0
    assert out.splitlines()[0] == (
        "cnn v2 model-fp32.onnx (+ drift-reference.json) is already current: signature and "
        "SHA-256 verified (16,384 bytes), nothing written"
    )
    code, out, _ = install(capsys, cache, first, "--allow-downgrade")
    assert code == 0
    assert out.splitlines() == [
        "re-activated cnn v1 model-fp32.onnx (+ drift-reference.json) from the cache: signature "
        "and SHA-256 verified (16,384 bytes), nothing written; now current (was v2 "
        "model-fp32.onnx)",
        "rollback: v2 model-fp32.onnx stays cached",
    ]

    code, out, _ = install(capsys, cache, second, "--json")
    report = json.loads(out)
    assert code == 0 and report["outcome"] == "reactivated"
    assert report["current"] == {
        "model": "cnn",
        "version": 2,
        "artefact": FP32,
        "digest": hashlib.sha256(blob(2, FP32)).hexdigest(),
        "size": 8192,
    }
    assert report["rollback"] == {
        "version": 1,
        "artefact": FP32,
        "digest": hashlib.sha256(blob(1, FP32)).hexdigest(),
    }
    assert (report["verified_bytes"], report["written_bytes"]) == (16384, 0)


def test_rollback_after_an_install_is_a_pointer_swap(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache, bundles = tmp_path / "cache", tmp_path / "bundles"
    first, second = bundle(bundles, 1), bundle(bundles, 2)
    assert install(capsys, cache, first)[0] == 0
    assert install(capsys, cache, second)[0] == 0
    for path in (first, second):  # nothing left to copy from: the cache alone serves
        for child in path.iterdir():
            child.unlink()
    versions = snapshot(cache / "versions")

    code, out, _ = fedge(
        capsys, "client", "models", "rollback", "cnn", "--store-key", KEY_HEX, "--cache-dir",
        str(cache),
    )  # fmt: skip

    assert (code, out.strip()) == (0, "cnn -> v1 model-fp32.onnx")
    assert snapshot(cache / "versions") == versions  # no byte moved: only the pointer


def test_install_chooses_only_among_signed_offered_artefacts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    offer = {INT8: "rejected", FP32: "offered", REFERENCE: "offered"}
    # The exporter left the rejected INT8 file in the bundle: it must not be installed.
    source = bundle(tmp_path / "bundles", 1, (INT8, FP32, REFERENCE), offer=offer)

    code, out, _ = install(capsys, cache, source)

    assert code == 0 and out.startswith("installed cnn v1 model-fp32.onnx")
    assert not (cache / "versions" / "cnn" / "1" / INT8).exists()
    before = snapshot(cache)
    code, _, err = install(capsys, cache, source, "--artefact", INT8)
    assert code == 1
    one_error(
        err,
        r"model-int8-static\.onnx is rejected by the signed manifest of cnn v1 "
        r"\(offered: model-fp32\.onnx, drift-reference\.json\)",
    )
    assert snapshot(cache) == before


def test_a_rejected_companion_is_left_out(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    offer = {FP32: "offered", REFERENCE: "rejected"}
    source = bundle(tmp_path / "bundles", 1, (FP32, REFERENCE), offer=offer)

    code, out, _ = install(capsys, cache, source)

    assert code == 0 and "drift-reference" not in out
    assert not (cache / "versions" / "cnn" / "1" / REFERENCE).exists()


def test_a_forged_offer_is_refused_before_anything_is_chosen(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    offer = {INT8: "rejected", FP32: "offered"}
    source = bundle(tmp_path / "bundles", 1, (INT8, FP32), offer=offer)
    document = json.loads((source / "manifest.json").read_text())
    document["manifest"]["metadata"][OFFER_KEY][INT8]["status"] = "offered"  # a database edit
    (source / "manifest.json").write_text(json.dumps(document))

    code, _, err = install(capsys, cache, source, "--artefact", INT8)

    assert code == 1
    one_error(err, "signature does not verify")
    assert not cache.exists() or snapshot(cache / "versions") == {}


def test_a_companion_cannot_be_installed_as_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = install(
        capsys, tmp_path / "cache", bundle(tmp_path / "b", 1), "--artefact", REFERENCE
    )

    assert code == 1
    one_error(err, r"drift-reference\.json is a json document, not a model to serve")
