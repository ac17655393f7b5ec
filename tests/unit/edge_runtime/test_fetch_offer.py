"""StoreClient.sync chooses among the artefacts the *signed* manifest offers.

The server's ``offered`` list is an unsigned database column: a store whose database
was edited could move devices off a variant (flip it to rejected) or onto a rejected
one. The network is stubbed here (``manifest`` and ``download``); the real server is
exercised in ``tests/integration``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.cache import InstallOutcome, ModelCache, ModelRejected
from edge_runtime.fetch import StoreClient
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
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom
from tests.helpers import self_signed_certificate

STORE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TRUSTED = STORE_KEY.public_key().public_bytes_raw()
INT8, FP32, REFERENCE = "model-int8-static.onnx", "model-fp32.onnx", "drift-reference.json"


def blob(version: int, name: str) -> bytes:
    return (hashlib.sha256(f"{version}/{name}".encode()).digest() * 128)[:4096]


def signed_manifest(
    version: int, names: tuple[str, ...], offer: Mapping[str, str] | None
) -> SignedManifest:
    metadata: dict[str, object] = {}
    if offer is not None:
        metadata[OFFER_KEY] = {n: {"status": s, "quality": {}} for n, s in offer.items()}
    manifest = Manifest(
        model="cnn",
        version=version,
        parent=None,
        artefacts=tuple(
            ArtefactEntry(
                name=name,
                digest=hashlib.sha256(blob(version, name)).hexdigest(),
                size=4096,
                format=ArtefactFormat.JSON if name.endswith(".json") else ArtefactFormat.ONNX,
                precision=Precision.INT8 if "int8" in name else Precision.FP32,
            )
            for name in names
        ),
        metadata=metadata,
        created_at="2026-01-31T12:00:00Z",
    )
    signature = STORE_KEY.sign(SIGNING_CONTEXT + manifest.canonical_bytes())
    return SignedManifest(manifest, signature, key_id_for(TRUSTED))


class StubbedStore:
    """A StoreClient whose manifest and object requests are answered locally."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        authority = EnrolmentAuthority.generate(DeterministicRandom(1))
        cert, _ = self_signed_certificate(tmp_path / "tls")
        self.client = StoreClient(
            "https://store.invalid",
            identity=authority.enrol("device-1", DeterministicRandom(2)),
            ca_file=cert,
        )
        self.answer: tuple[SignedManifest, list[str]] | None = None
        self.downloaded: list[str] = []
        monkeypatch.setattr(self.client, "manifest", self._manifest)
        monkeypatch.setattr(self.client, "download", self._download)

    def _manifest(self, model: str, ref: str = "latest") -> tuple[SignedManifest, list[str]]:
        assert self.answer is not None
        return self.answer

    def _download(self, digest: str, destination: Path, *, expected_size: int) -> None:
        assert self.answer is not None
        signed = self.answer[0]
        entry = next(a for a in signed.manifest.artefacts if a.digest == digest)
        self.downloaded.append(entry.name)
        destination.write_bytes(blob(signed.manifest.version, entry.name))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StubbedStore:
    return StubbedStore(tmp_path, monkeypatch)


@pytest.fixture
def cache(tmp_path: Path) -> ModelCache:
    return ModelCache(tmp_path / "cache", trusted_key=TRUSTED)


def test_the_signed_offer_overrides_the_servers_list(
    store: StubbedStore, cache: ModelCache
) -> None:
    offer = {INT8: "offered", FP32: "offered", REFERENCE: "offered"}
    # A database edit flipped INT8 to rejected: the server no longer lists it.
    store.answer = (signed_manifest(1, (INT8, FP32, REFERENCE), offer), [FP32, REFERENCE])

    store.client.sync(cache, "cnn")

    current = cache.current("cnn")
    assert current is not None and current.artefact == INT8
    assert sorted(store.downloaded) == [REFERENCE, INT8]


def test_a_signed_rejection_is_never_fetched(store: StubbedStore, cache: ModelCache) -> None:
    offer = {INT8: "rejected", FP32: "offered"}
    # A database edit flipped INT8 back to offered: the server lists it.
    store.answer = (signed_manifest(1, (INT8, FP32), offer), [INT8, FP32])

    store.client.sync(cache, "cnn")

    current = cache.current("cnn")
    assert current is not None and current.artefact == FP32
    assert store.downloaded == [FP32]
    store.answer = (signed_manifest(2, (INT8, FP32), offer), [INT8, FP32])
    with pytest.raises(ModelRejected, match=r"cnn v2 offers none of \['model-int8-static.onnx'\]"):
        store.client.sync(cache, "cnn", prefer=[INT8])
    assert store.downloaded == [FP32]


def test_an_old_manifest_falls_back_to_the_servers_list(
    store: StubbedStore, cache: ModelCache
) -> None:
    store.answer = (signed_manifest(1, (INT8, FP32), None), [FP32])

    store.client.sync(cache, "cnn")

    current = cache.current("cnn")
    assert current is not None and current.artefact == FP32


def test_sync_reports_downloads_and_reactivations(store: StubbedStore, cache: ModelCache) -> None:
    offer = {FP32: "offered", REFERENCE: "offered"}
    first = signed_manifest(1, (FP32, REFERENCE), offer)
    store.answer = (first, [FP32, REFERENCE])

    report = store.client.sync(cache, "cnn")

    assert report.install.outcome is InstallOutcome.INSTALLED
    assert (report.downloaded_bytes, report.offer_signed) == (8192, True)
    assert report.install.companions == (REFERENCE,)
    assert report.offered == (FP32, REFERENCE)
    store.answer = (signed_manifest(2, (FP32,), {FP32: "offered"}), [FP32])
    upgraded = store.client.sync(cache, "cnn")
    assert upgraded.install.rollback is not None and upgraded.install.rollback.version == 1
    store.answer = (first, [FP32, REFERENCE])
    again = store.client.sync(cache, "cnn", allow_downgrade=True)
    assert again.install.outcome is InstallOutcome.REACTIVATED
    assert again.downloaded_bytes == 0  # the previous version was still cached
    assert store.downloaded == [FP32, REFERENCE, FP32]
    summary = json.dumps(again.to_json())
    assert '"outcome": "reactivated"' in summary
