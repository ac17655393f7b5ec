"""A served model store with an audit log, an enrolled device and a TLS client (issue 15 tests)."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path
from typing import Any

from fl_server.audit import AuditLog
from fl_server.db import open_database
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.serve import StoreServer, tls_context
from fl_server.store.store import ModelStore, NewArtefact
from secure_agg.identity import EnrolmentAuthority, NodeIdentity
from secure_agg.randomness import DeterministicRandom
from secure_agg.request_auth import authorization_header
from tests.helpers import self_signed_certificate


class Served:
    """One store publishing ``data`` as ``cnn`` v1, served over TLS (not yet started)."""

    def __init__(self, tmp_path: Path, data: bytes, **server_options: Any) -> None:
        self.tmp_path = tmp_path
        self.authority = EnrolmentAuthority.generate(DeterministicRandom(1))
        self.device: NodeIdentity = self.authority.enrol("device-1", DeterministicRandom(2))
        self.engine = open_database(f"sqlite:///{tmp_path / 'fedge.db'}")
        self.audit = AuditLog(self.engine)
        self.blobs = FileBlobStore(tmp_path / "store", durable=False)
        self.store = ModelStore(self.engine, self.blobs, StoreKey.generate(), audit=self.audit)
        version = self.store.publish("cnn", [NewArtefact(name="weights.npz", data=data)])
        self.digest = version.manifest.artefacts[0].digest
        self.object_path = tmp_path / "store" / "objects" / self.digest[:2] / self.digest
        cert, key = self_signed_certificate(tmp_path / "tls")
        self.client_tls = ssl.create_default_context(cafile=str(cert))
        self.server = StoreServer(
            self.store,
            authority_public_key=self.authority.public_key,
            tls=tls_context(cert, key),
            **server_options,
        )

    def request(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        signed: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPSConnection(
            "localhost", self.server.port, context=self.client_tls, timeout=10
        )
        sent = dict(headers or {})
        if signed:
            sent["Authorization"] = self.authorization(method, target)
        try:
            connection.request(method, target, headers=sent)
            response = connection.getresponse()
            body = response.read()
            return response.status, dict(response.getheaders()), body
        finally:
            connection.close()

    def authorization(self, method: str, target: str) -> str:
        return authorization_header(
            self.device, method=method, target=target, timestamp=int(time.time())
        )

    def close(self) -> None:
        self.engine.dispose()
