"""Serve signed manifests and artefacts to enrolled devices over HTTPS (range requests, ETags).

Why HTTPS and not Flower's channel: artefacts are large, immutable and
addressed by digest, which is what HTTP caching and ``Range`` resumption are
for (a device on a flaky link resumes a 40 MB download instead of restarting
it), and any CDN or S3-compatible front can take over later; Flower's message
channel would carry them as one record per round trip with no resumption.

Endpoints (every request signed by an enrolled device, see
:mod:`secure_agg.request_auth`; TLS always on):

- ``GET /v1/health`` -> ``{"status": "ok"}``
- ``GET /v1/models/<model>/manifest?ref=<number|alias|latest>`` -> the signed
  manifest and the offered artefacts; the device verifies the signature itself.
- ``GET /v1/objects/<sha256>`` -> the bytes, ``ETag: "<sha256>"``, ``Range:
  bytes=a-b`` -> 206, ``If-None-Match`` -> 304. Only objects of *offered*
  artefacts are served; each object is re-hashed before its first byte is sent,
  so a corrupt or missing object is answered 500 / 404, never served.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge_runtime.manifest import check_digest
from edge_runtime.tls import tls_context
from fedge.errors import ConfigError, FedgeError
from fl_server.store.blobs import BlobCorrupt, BlobMissing
from fl_server.store.store import ModelStore
from secure_agg.errors import CryptoError
from secure_agg.request_auth import verify_authorization

__all__ = ["StoreServer", "tls_context"]

logger = logging.getLogger(__name__)

_MANIFEST = re.compile(r"^/v1/models/([A-Za-z0-9_.-]{1,64})/manifest$")
_OBJECT = re.compile(r"^/v1/objects/([^/]*)$")
# At most 19 digits a side (offsets fit in 63 bits): a 5,000-digit header is refused as
# unsatisfiable instead of reaching int() (which raised past 4,300 digits and dropped the
# connection without an answer).
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
_CHUNK = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # The enrolled device id (the same id as in the registry, the ledgers and the audit
    # trail) of the request being served; "-" until its signature verifies.
    device_id = "-"

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("store server: device %s: " + format, self.device_id, *args)

    def _send_json(self, status: HTTPStatus, document: dict[str, Any]) -> None:
        body = json.dumps(document, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": message})

    def do_GET(self) -> None:
        target = self.path
        try:
            device = verify_authorization(
                self.headers.get("Authorization"),
                method="GET",
                target=target,
                authority_public_key=self.server.authority_public_key,
                now=self.server.clock(),
            )
        except CryptoError:
            self._error(HTTPStatus.UNAUTHORIZED, "a request signed by an enrolled device is needed")
            return
        self.device_id = device.enrolment_id
        path, query = urlsplit(target).path, parse_qs(urlsplit(target).query)
        try:
            if path == "/v1/health":
                self._send_json(HTTPStatus.OK, {"status": "ok"})
            elif (match := _MANIFEST.match(path)) is not None:
                self._manifest(match.group(1), query.get("ref", ["latest"])[0])
            elif (match := _OBJECT.match(path)) is not None:
                self._object(match.group(1))
            else:
                self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
        except ConfigError as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc))
        except FedgeError as exc:
            logger.error("store server: %s (device %s)", exc, device.enrolment_id)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))

    def _manifest(self, model: str, ref: str) -> None:
        version = self.server.store.get(model, ref)
        self._send_json(
            HTTPStatus.OK,
            {
                **version.signed.to_json(),
                "offered": [a.name for a in version.offered()],
            },
        )

    def _object(self, raw_digest: str) -> None:
        digest = check_digest(raw_digest)
        store = self.server.store
        if not store.is_offered(digest):
            self._error(HTTPStatus.NOT_FOUND, f"object {digest} is not offered")
            return
        etag = f'"{digest}"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            data = store.blobs.get(digest)  # re-hashed: a corrupt object is never sent
        except BlobMissing:
            self._error(HTTPStatus.NOT_FOUND, f"object {digest} is missing from the store")
            return
        except BlobCorrupt:
            logger.error("store server: object %s is corrupt; not serving it", digest)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"object {digest} failed verification")
            return
        start, end = 0, len(data) - 1
        status = HTTPStatus.OK
        requested = self.headers.get("Range")
        if requested is not None:
            parsed = _parse_range(requested, len(data))
            if parsed is None:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status is HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        view = memoryview(data)[start : end + 1]
        for offset in range(0, len(view), _CHUNK):
            self.wfile.write(view[offset : offset + _CHUNK])


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    match = _RANGE.match(header.strip())
    if match is None or size == 0 or (not match.group(1) and not match.group(2)):
        return None
    if not match.group(1):  # the last N bytes
        length = int(match.group(2))
        return (max(0, size - length), size - 1) if length > 0 else None
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        store: ModelStore,
        *,
        authority_public_key: bytes,
        clock: Callable[[], float],
        tls: ssl.SSLContext,
        socket_timeout_s: float,
    ) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.authority_public_key = authority_public_key
        self.clock = clock
        self.tls = tls
        self.socket_timeout_s = socket_timeout_s

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread and under a timeout:
        # a client that connects and never finishes its handshake (or stalls mid-request)
        # holds only its own thread, never the accept loop every device depends on.
        request.settimeout(self.socket_timeout_s)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as error:
            logger.debug("store server: TLS handshake with %s failed: %s", client_address[0], error)
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            self.shutdown_request(wrapped)


class StoreServer:
    """An HTTPS server of one model store, started in a background thread.

    Parameters
    ----------
    store
        What to serve.
    authority_public_key
        The enrolment authority whose devices may fetch.
    tls
        The server's TLS context (:func:`tls_context`); there is no plain-HTTP mode.
    host, port
        Where to listen (port 0: any free port, see :attr:`port`).
    socket_timeout_s
        How long one connection may stall (its TLS handshake, a request, a read)
        before it is dropped; each connection runs in its own thread.
    """

    def __init__(
        self,
        store: ModelStore,
        *,
        authority_public_key: bytes,
        tls: ssl.SSLContext,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        socket_timeout_s: float = 30.0,
    ) -> None:
        if len(authority_public_key) != 32:
            raise ConfigError("the enrolment authority's key must be 32 bytes (Ed25519)")
        if not socket_timeout_s > 0:
            raise ConfigError(f"socket_timeout_s must be > 0, got {socket_timeout_s}")
        self._server = _Server(
            (host, port),
            store,
            authority_public_key=authority_public_key,
            clock=clock,
            tls=tls,
            socket_timeout_s=socket_timeout_s,
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
