"""Serve signed manifests and artefacts to enrolled devices over HTTPS (range requests, ETags).

Why HTTPS and not Flower's channel: artefacts are large, immutable and
addressed by digest, which is what HTTP caching and ``Range`` resumption are
for (a device on a flaky link resumes a 40 MB download instead of restarting
it), and any CDN or S3-compatible front can take over later; Flower's message
channel would carry them as one record per round trip with no resumption.

Endpoints (TLS always on; every request but the health probe signed by an
enrolled device, see :mod:`secure_agg.request_auth`, else 401):

- ``GET /v1/health``, ``HEAD /v1/health`` -> ``{"status": "ok"}``, unsigned (for
  load balancers; it says nothing but that the server answers).
- ``GET /v1/models/<model>/manifest?ref=<number|alias|latest>`` -> the signed
  manifest and the offered artefacts; the device verifies the signature itself.
- ``GET /v1/objects/<sha256>`` -> the bytes, ``ETag: "<sha256>"``, ``Range:
  bytes=a-b`` -> 206 (416 if unsatisfiable), ``If-None-Match`` -> 304. Only
  objects of *offered* artefacts are served. The object's SHA-256 is checked in
  full before its first byte is sent (a corrupt or missing object is answered
  500 / 404, never served), then only the requested range is read and sent, 1 MiB
  at a time, from the file that was hashed: the server never holds an object in
  memory (:meth:`~fl_server.store.blobs.FileBlobStore.open_verified`, whose
  short-lived memo of recent hashes makes a thousand concurrent fetches cost one).
- Any other method or path: 401 unsigned, else 405 / 404.

Each request is written, after its response, as one line of the access log
(logger ``fedge.store.access``, and appended to ``access_log`` when given)::

    2026-05-01T10:00:00.123+00:00 10.0.0.7 device-17 GET /v1/objects/ab12... 206 1048576 4.2

time (UTC), client address, enrolled device id (``-`` before a signature verifies),
method, path without its query string, status, body bytes sent and milliseconds
taken. Headers (the ``Authorization`` signature among them) and query strings are
never logged; characters outside printable ASCII are percent-escaped, so a crafted
path cannot forge a line.

A device that received a whole object (a 200 whose body was fully written, or a
206 reaching the last byte) is recorded in the store's audit trail as
``store.downloaded`` (:meth:`ModelStore.record_download`). One background thread
appends these, in order: a thousand concurrent downloads never race for the
trail's head row, and a slow or failing database never holds up a download (a
failed append is logged as an error; the download stands).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge_runtime.manifest import check_digest
from edge_runtime.tls import tls_context
from fedge.errors import ConfigError, FedgeError, StorageError
from fl_server.store._serve_records import (
    ACCESS_LOGGER,
    AccessLog,
    CountingWriter,
    Download,
    DownloadRecorder,
    printable,
)
from fl_server.store.blobs import BlobCorrupt, BlobMissing, VerifiedBlob
from fl_server.store.store import ModelStore
from secure_agg.errors import CryptoError
from secure_agg.request_auth import verify_authorization

__all__ = ["ACCESS_LOGGER", "LISTEN_BACKLOG", "StoreServer", "tls_context"]

logger = logging.getLogger(__name__)

_HEALTH = "/v1/health"
_MANIFEST = re.compile(r"^/v1/models/([A-Za-z0-9_.-]{1,64})/manifest$")
_OBJECT = re.compile(r"^/v1/objects/([^/]*)$")
# At most 19 digits a side (offsets fit in 63 bits): a 5,000-digit header is refused as
# unsatisfiable instead of reaching int() (which raised past 4,300 digits and dropped the
# connection without an answer).
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
_CHUNK = 1 << 20
# Connections the kernel queues before the accept loop takes them. The standard library's
# 5 is far too few for a fleet released at once: past it, SYNs are dropped and each of
# those devices retries a second (then 3, 7, ... seconds) later.
LISTEN_BACKLOG = 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self._counter = CountingWriter(self.wfile)
        self.wfile = self._counter

    def handle_one_request(self) -> None:
        # A keep-alive connection serves several requests with this one object: nothing
        # of the previous request (its device above all) may leak into the next one's line.
        # device_id: the enrolled device (the id of the registry, the ledgers and the audit
        # trail) whose signature this request carries; "-" until one verifies.
        self.device_id = "-"
        self.command, self.path = "", ""
        self._status: int | None = None
        self._started: float | None = None
        self._body_from: int | None = None
        try:
            super().handle_one_request()
        finally:
            if self._status is not None:
                self._log_access()

    def parse_request(self) -> bool:
        self._started = time.monotonic()  # the request line is in: the request starts here
        return super().parse_request()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = int(code)
        if self._started is None:  # refused before parse_request (a 414)
            self._started = time.monotonic()
        super().send_response(code, message)

    def end_headers(self) -> None:
        super().end_headers()
        self._body_from = self._counter.written

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log nothing here: the access line is written once the body is out."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("store server: %s: " + format, self.address_string(), *args)

    def _log_access(self) -> None:
        sent = 0 if self._body_from is None else self._counter.written - self._body_from
        elapsed_ms = 0.0 if self._started is None else (time.monotonic() - self._started) * 1e3
        moment = datetime.fromtimestamp(self.server.clock(), UTC).isoformat(timespec="milliseconds")
        self.server.access_log.write(
            f"{moment} {printable(self.client_address[0])} {printable(self.device_id)} "
            f"{printable(self.command)} {printable(self.path.partition('?')[0])} "
            f"{self._status} {sent} {elapsed_ms:.1f}"
        )

    def _send_json(self, status: HTTPStatus, document: dict[str, Any]) -> None:
        body = json.dumps(document, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": message})

    def _authenticate(self) -> bool:
        """Check the request's device signature; answer 401 and return False if it fails."""
        try:
            device = verify_authorization(
                self.headers.get("Authorization"),
                method=self.command,
                target=self.path,
                authority_public_key=self.server.authority_public_key,
                now=self.server.clock(),
            )
        except CryptoError:
            self._error(HTTPStatus.UNAUTHORIZED, "a request signed by an enrolled device is needed")
            return False
        self.device_id = device.enrolment_id
        return True

    def do_HEAD(self) -> None:
        if self.path.partition("?")[0] == _HEALTH:
            self._send_json(HTTPStatus.OK, {"status": "ok"})
            return
        if not self._authenticate():
            return
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path, _, _ = self.path.partition("?")
        if path == _HEALTH:  # unsigned: load balancers probe it
            self._send_json(HTTPStatus.OK, {"status": "ok"})
            return
        if not self._authenticate():
            return
        query = parse_qs(urlsplit(self.path).query)
        try:
            if (match := _MANIFEST.match(path)) is not None:
                self._manifest(match.group(1), query.get("ref", ["latest"])[0])
            elif (match := _OBJECT.match(path)) is not None:
                self._object(match.group(1))
            else:
                self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
        except ConfigError as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc))
        except FedgeError as exc:
            logger.error("store server: %s (device %s)", exc, self.device_id)
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
        with ExitStack() as stack:
            try:
                # Hashed in full before the first byte goes out: a corrupt object is never sent.
                blob = stack.enter_context(store.blobs.open_verified(digest))
            except BlobMissing:
                self._error(HTTPStatus.NOT_FOUND, f"object {digest} is missing from the store")
                return
            except BlobCorrupt:
                logger.error("store server: object %s is corrupt; not serving it", digest)
                self._error(
                    HTTPStatus.INTERNAL_SERVER_ERROR, f"object {digest} failed verification"
                )
                return
            self._send_object(digest, blob)

    def _send_object(self, digest: str, blob: VerifiedBlob) -> None:
        start, end = 0, blob.size - 1
        status = HTTPStatus.OK
        requested = self.headers.get("Range")
        if requested is not None:
            parsed = _parse_range(requested, blob.size)
            if parsed is None:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{blob.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", f'"{digest}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        if status is HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{blob.size}")
        self.end_headers()
        complete = blob.size == 0 or self._send_range(digest, blob, start, end)
        if complete and end == blob.size - 1:
            self.server.downloads.record(
                Download(
                    device=self.device_id,
                    digest=digest,
                    size=max(0, end - start + 1),
                    ranged=status is HTTPStatus.PARTIAL_CONTENT,
                )
            )

    def _send_range(self, digest: str, blob: VerifiedBlob, start: int, end: int) -> bool:
        """Write bytes ``start``..``end``; return whether all were written."""
        try:
            for chunk in blob.read_range(start, end, chunk_size=_CHUNK):
                self.wfile.write(chunk)
        except StorageError as exc:  # headers are out: the connection is all we can drop
            logger.error("store server: reading object %s failed mid-response: %s", digest, exc)
            self.close_connection = True
            return False
        except OSError as exc:  # the device went away (or stalled past the socket timeout)
            logger.debug("store server: sending %s to %s stopped: %s", digest, self.device_id, exc)
            self.close_connection = True
            return False
        return True


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
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        store: ModelStore,
        *,
        authority_public_key: bytes,
        clock: Callable[[], float],
        tls: ssl.SSLContext,
        socket_timeout_s: float,
        access_log: AccessLog,
    ) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.authority_public_key = authority_public_key
        self.clock = clock
        self.tls = tls
        self.socket_timeout_s = socket_timeout_s
        self.access_log = access_log
        self.downloads = DownloadRecorder(store)

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

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A device that drops its connection is routine; anything else is a bug worth a trace.
        error = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(error, OSError) else logging.ERROR
        logger.log(
            level, "store server: a request from %s failed", client_address[0], exc_info=True
        )


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
    clock
        Seconds since the epoch: checks request timestamps, stamps access lines.
    socket_timeout_s
        How long one connection may stall (its TLS handshake, a request, a read)
        before it is dropped; each connection runs in its own thread.
    access_log
        A file to append the access log to (created with its directory, mode
        0o640); the lines also go to the ``fedge.store.access`` logger either way.

    Raises
    ------
    ConfigError
        If the authority key is not 32 bytes or ``socket_timeout_s`` is not positive.
    StorageError
        If the access log cannot be opened.
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
        access_log: Path | None = None,
    ) -> None:
        if len(authority_public_key) != 32:
            raise ConfigError("the enrolment authority's key must be 32 bytes (Ed25519)")
        if not socket_timeout_s > 0:
            raise ConfigError(f"socket_timeout_s must be > 0, got {socket_timeout_s}")
        log = AccessLog(access_log)
        try:
            self._server = _Server(
                (host, port),
                store,
                authority_public_key=authority_public_key,
                clock=clock,
                tls=tls,
                socket_timeout_s=socket_timeout_s,
                access_log=log,
            )
        except BaseException:
            log.close()
            raise
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
        """Stop serving, close the socket, record the downloads still queued, close the log."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server.downloads.close(timeout_s=30)
        self._server.access_log.close()

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
