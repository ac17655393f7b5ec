"""Serving the store over HTTPS to enrolled devices: auth, manifests, ranges, ETags, corruption."""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.manifest import (
    ArtefactFormat,
    Precision,
    SignedManifest,
    verify_manifest,
)
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.serve import StoreServer, tls_context
from fl_server.store.store import ModelStore, NewArtefact
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom
from secure_agg.request_auth import authorization_header
from tests.helpers import self_signed_certificate

WEIGHTS = bytes(range(256)) * 40


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.authority = EnrolmentAuthority.generate(DeterministicRandom(1))
        self.device = self.authority.enrol("device-1", DeterministicRandom(2))
        self.engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
        self.store = ModelStore(self.engine, FileBlobStore(tmp_path / "store"), StoreKey.generate())
        version = self.store.publish(
            "cnn",
            [
                NewArtefact(name="weights.npz", data=WEIGHTS),
                NewArtefact(
                    name="model-int4.onnx",
                    data=b"int4 bytes",
                    format=ArtefactFormat.ONNX,
                    precision=Precision.INT4,
                    rejected=True,
                ),
            ],
        )
        self.digests = {a.name: a.digest for a in version.manifest.artefacts}
        cert, key = self_signed_certificate(tmp_path)
        self.client_tls = ssl.create_default_context(cafile=str(cert))
        self.server = StoreServer(
            self.store, authority_public_key=self.authority.public_key, tls=tls_context(cert, key)
        )

    def get(
        self,
        target: str,
        *,
        identity: NodeIdentity | None = None,
        headers: dict[str, str] | None = None,
        timestamp: int | None = None,
        signed_target: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPSConnection(
            "localhost", self.server.port, context=self.client_tls, timeout=10
        )
        sent = dict(headers or {})
        who = self.device if identity is None else identity
        sent["Authorization"] = authorization_header(
            who,
            method="GET",
            target=signed_target or target,
            timestamp=int(time.time()) if timestamp is None else timestamp,
        )
        connection.request("GET", target, headers=sent)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response.status, dict(response.getheaders()), body


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    created = Fleet(tmp_path)
    with created.server:
        yield created
    created.engine.dispose()


def test_a_device_gets_the_signed_manifest_and_verifies_it(fleet: Fleet) -> None:
    status, _, body = fleet.get("/v1/models/cnn/manifest?ref=latest")
    assert status == 200
    document = json.loads(body)
    signed = SignedManifest.from_json({k: v for k, v in document.items() if k != "offered"})
    assert verify_manifest(signed, fleet.store.public_key).version == 1
    assert document["offered"] == ["weights.npz"]  # the rejected INT4 variant is not offered


def test_objects_come_whole_or_by_range_with_etags(fleet: Fleet) -> None:
    digest = fleet.digests["weights.npz"]
    status, headers, body = fleet.get(f"/v1/objects/{digest}")
    assert status == 200 and body == WEIGHTS and headers["ETag"] == f'"{digest}"'

    status, headers, body = fleet.get(f"/v1/objects/{digest}", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == WEIGHTS[10:20]
    assert headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
    status, _, body = fleet.get(f"/v1/objects/{digest}", headers={"Range": "bytes=-5"})
    assert status == 206 and body == WEIGHTS[-5:]
    status, _, _ = fleet.get(f"/v1/objects/{digest}", headers={"Range": "bytes=99999-"})
    assert status == 416
    status, _, body = fleet.get(f"/v1/objects/{digest}", headers={"If-None-Match": f'"{digest}"'})
    assert status == 304 and body == b""


def test_only_offered_well_formed_digests_are_served(fleet: Fleet) -> None:
    assert fleet.get(f"/v1/objects/{fleet.digests['model-int4.onnx']}")[0] == 404
    assert fleet.get(f"/v1/objects/{'a' * 64}")[0] == 404
    assert fleet.get("/v1/objects/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert fleet.get("/v1/models/cnn/manifest?ref=nope")[0] == 404


def test_a_corrupt_object_is_never_served(fleet: Fleet, tmp_path: Path) -> None:
    digest = fleet.digests["weights.npz"]
    path = tmp_path / "store" / "objects" / digest[:2] / digest
    path.chmod(0o644)
    path.write_bytes(b"x" * len(WEIGHTS))

    status, _, body = fleet.get(f"/v1/objects/{digest}")

    assert status == 500 and b"failed verification" in body and b"xxxx" not in body


def test_requests_without_a_valid_device_signature_are_refused(fleet: Fleet) -> None:
    stranger = EnrolmentAuthority.generate(DeterministicRandom(9)).enrol(
        "x", DeterministicRandom(3)
    )
    manifest = "/v1/models/cnn/manifest?ref=latest"
    assert fleet.get(manifest)[0] == 200
    assert fleet.get(manifest, identity=stranger)[0] == 401
    assert fleet.get(manifest, timestamp=int(time.time()) - 3600)[0] == 401
    # A signature for one request does not open another.
    digest = fleet.digests["weights.npz"]
    assert fleet.get(f"/v1/objects/{digest}", signed_target=manifest)[0] == 401
    for unsigned in (manifest, f"/v1/objects/{digest}", "/v1/nothing"):
        connection = http.client.HTTPSConnection(
            "localhost", fleet.server.port, context=fleet.client_tls, timeout=10
        )
        connection.request("GET", unsigned)
        assert connection.getresponse().status == 401
        connection.close()


def test_the_access_log_names_the_enrolled_device(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedge.store.access"):
        status, _, _ = fleet.get("/v1/models/cnn/manifest?ref=latest")
        fleet.get("/v1/models/cnn/manifest", timestamp=0)  # refused: a stale signature
    assert status == 200
    lines = [r.getMessage().split() for r in caplog.records if r.name == "fedge.store.access"]
    assert [(fields[2], fields[5]) for fields in lines] == [
        (fleet.device.certificate.enrolment_id, "200"),
        ("-", "401"),
    ]


def test_an_idle_connection_that_never_shakes_hands_blocks_no_one(tmp_path: Path) -> None:
    import socket

    created = Fleet(tmp_path)
    created.server = StoreServer(
        created.store,
        authority_public_key=created.authority.public_key,
        tls=created.server._server.tls,  # the same TLS context
        socket_timeout_s=2.0,
    )
    with created.server:
        idle = socket.create_connection(("localhost", created.server.port))  # sends nothing
        try:
            started = time.monotonic()
            status, _, body = created.get(f"/v1/objects/{created.digests['weights.npz']}")
            waited = time.monotonic() - started
        finally:
            idle.close()
    created.engine.dispose()

    # Before, the handshake ran inside accept(): this request waited forever behind `idle`.
    assert (status, body) == (200, WEIGHTS)
    assert waited < 2.0


@pytest.mark.parametrize(
    "header", ["bytes=" + "9" * 5000 + "-", "bytes=-" + "1" * 20, "bytes=1-2,4-5"]
)
def test_a_malformed_or_huge_range_is_refused_with_416(fleet: Fleet, header: str) -> None:
    status, headers, body = fleet.get(
        f"/v1/objects/{fleet.digests['weights.npz']}", headers={"Range": header}
    )

    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(WEIGHTS)}"
    assert body == b""
