"""Serve a :class:`~edge_runtime.predictor.Predictor` over local HTTP (JSON in, JSON out).

Endpoints:

- ``POST /v1/predict`` with ``{"instances": [x, ...]}`` (each ``x`` shaped like one
  model input) -> ``{"outputs": [[...]], "classes": [...], "model": ..., "provider": ...}``;
  the instances go through a :class:`~edge_runtime.predictor.MicroBatcher`, so
  concurrent requests share batched model calls.
- ``GET /v1/health`` -> status, model label, active provider (and why, if it is not
  the first preference), uptime.
- ``GET /v1/metrics`` -> model latency quantiles, request latency, counts by status,
  batch sizes.

Every failure is answered with a one-line JSON ``{"error": ...}``: 400 for a
malformed request, 404 / 405 for a wrong path or method, 408 for a body that
stalls, 411 without a ``Content-Length``, 413 for a body over the limit, 503 when
the queue is full or the model too slow, 500 for anything else (logged, never
raised into the server).

Notes
-----
Threat model: the server is for applications on the device itself, so it binds
127.0.0.1 and speaks plain HTTP by default; it has no authentication. Binding any
other address exposes the model to the network, so it is refused without TLS
(1.2 or later); TLS alone encrypts but does not say who the client is, so for a
network-facing server pass a context that requires client certificates (mutual
TLS: ``verify_mode = ssl.CERT_REQUIRED`` and the client CA loaded). TLS
handshakes run in the connection's thread, not the accept loop, and every
connection has a socket timeout, so a slow client cannot stall others. Request
bodies are never logged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeoutError
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edge_runtime.batching import MicroBatcher
from edge_runtime.latency import LatencyHistogram
from edge_runtime.predictor import Predictor
from edge_runtime.tls import tls_context
from fedge.errors import ConfigError, FedgeError

__all__ = ["InferenceServer", "tls_context"]

logger = logging.getLogger(__name__)

_ROUTES = {"/v1/predict": "POST", "/v1/health": "GET", "/v1/metrics": "GET"}
_LOOPBACK_NAMES = frozenset({"localhost"})
_DIGITS = re.compile(r"[0-9]{1,12}")
_SHUTDOWN_POLL_S = 0.1  # how soon stop() is noticed


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_status: dict[int, int] = {}
        self._instances = 0

    def count(self, status: int, instances: int = 0) -> None:
        with self._lock:
            self._by_status[status] = self._by_status.get(status, 0) + 1
            self._instances += instances

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            by_status, instances = dict(self._by_status), self._instances
        total = sum(by_status.values())
        errors = sum(count for status, count in by_status.items() if status >= 400)
        return {
            "total": total,
            "errors": errors,
            "instances": instances,
            "by_status": {str(status): by_status[status] for status in sorted(by_status)},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: InferenceServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Runs in the connection's own thread: a slow TLS handshake cannot block accept().
        request.settimeout(self.owner.socket_timeout_s)
        tls = self.owner.tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as error:
            logger.debug("TLS handshake with %s failed: %s", client_address[0], error)
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            self.shutdown_request(wrapped)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("inference server: " + format, *args)

    def _send_json(self, status: HTTPStatus, document: dict[str, Any]) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", _ROUTES[urlsplit(self.path).path])
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _dispatch(self) -> None:
        started = time.perf_counter()
        path = urlsplit(self.path).path
        instances = 0
        try:
            status, document, instances = self._answer(path)
        except _RequestError as error:
            status, document = error.status, {"error": " ".join(str(error).split())}
        except Exception:  # nothing a request does may take the server down
            logger.exception("inference server: unexpected error on %s %s", self.command, path)
            self.close_connection = True
            status, document = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        # Counted before the answer is written: a client that reads the metrics
        # right after its answer must see its own request (and one that went away
        # mid-answer was still served).
        self.server.owner._counters.count(int(status), instances)
        if path == "/v1/predict":
            self.server.owner._request_latency.record(time.perf_counter() - started)
        try:
            self._send_json(status, document)
        except OSError as error:  # the client went away
            logger.debug("inference server: cannot answer %s: %s", path, error)
            self.close_connection = True

    def _answer(self, path: str) -> tuple[HTTPStatus, dict[str, Any], int]:
        if path not in _ROUTES:
            raise _RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {path!r}")
        if self.command != _ROUTES[path]:
            self.close_connection = True  # a body we will not read may follow
            raise _RequestError(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {_ROUTES[path]} only"
            )
        owner = self.server.owner
        if path == "/v1/predict":
            document, instances = owner._predict_document(self._read_body())
            return HTTPStatus.OK, document, instances
        if path == "/v1/health":
            return HTTPStatus.OK, owner.health(), 0
        return HTTPStatus.OK, owner.metrics(), 0

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not chunks")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self.close_connection = True
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if len(lengths) > 1 or _DIGITS.fullmatch(lengths[0].strip()) is None:
            self.close_connection = True  # never guess where an ambiguous body ends
            raise _RequestError(HTTPStatus.BAD_REQUEST, "send one numeric Content-Length")
        length, limit = int(lengths[0]), self.server.owner.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread
            raise _RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body exceeds {limit} bytes"
            )
        try:
            body = self.rfile.read(length)
        except OSError:  # the socket timeout: a client that stalls mid-body
            self.close_connection = True
            raise _RequestError(
                HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive in time"
            ) from None
        if len(body) != length:
            self.close_connection = True
            raise _RequestError(HTTPStatus.BAD_REQUEST, "the body is shorter than its length")
        return body

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()


class InferenceServer:
    """A local HTTP(S) inference server for one predictor, run in a background thread.

    Parameters
    ----------
    predictor
        The model to serve; swap it on the predictor and the server follows.
    host, port
        Where to listen; port 0 picks a free port (see :attr:`port`). Only loopback
        addresses may be used without ``tls``.
    tls
        A server context with TLS 1.2 or later (:func:`tls_context`), or None for
        plain HTTP on loopback.
    max_batch, max_delay_ms
        The micro-batcher's settings.
    max_body_bytes, max_instances
        The largest request body and the most instances per request.
    request_timeout_s
        How long a request waits for its outputs before a 503.
    socket_timeout_s
        How long a connection may stay silent before it is closed.
    clock
        Monotonic seconds, for the uptime.

    Raises
    ------
    ConfigError
        If ``host`` is not loopback and ``tls`` is None, ``tls`` allows TLS below
        1.2, a limit is not positive, or the address cannot be bound.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        max_body_bytes: int = 4 << 20,
        max_instances: int = 64,
        request_timeout_s: float = 10.0,
        socket_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tls is None and not _is_loopback(host):
            raise ConfigError(
                f"refusing to serve plain HTTP on {host!r}: only loopback addresses may be "
                "bound without TLS; give a certificate and key (tls=tls_context(cert, key); "
                "fedge client serve --tls-cert --tls-key)"
            )
        if tls is not None and tls.minimum_version < ssl.TLSVersion.TLSv1_2:
            raise ConfigError(
                f"tls must require TLS 1.2 or later, its minimum is {tls.minimum_version.name}"
            )
        for name, value in (
            ("max_body_bytes", max_body_bytes),
            ("max_instances", max_instances),
            ("request_timeout_s", request_timeout_s),
            ("socket_timeout_s", socket_timeout_s),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        self.predictor = predictor
        self.tls = tls
        self.max_body_bytes = max_body_bytes
        self.max_instances = max_instances
        self.request_timeout_s = request_timeout_s
        self.socket_timeout_s = socket_timeout_s
        self._counters = _Counters()
        self._request_latency = LatencyHistogram()
        self._clock = clock
        self._started_at = clock()
        self._batcher = MicroBatcher(predictor, max_batch=max_batch, max_delay_ms=max_delay_ms)
        try:
            self._server = _Server((host, port), self)
        except (OSError, OverflowError) as error:
            self._batcher.close()
            raise ConfigError(f"cannot listen on {host!r} port {port}: {error}") from error
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080``."""
        host = str(self._server.server_address[0])
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def health(self) -> dict[str, Any]:
        """Return the health document of ``GET /v1/health``."""
        return {
            "status": "ok",
            "model": self.predictor.model_id,
            "provider": self.predictor.provider.value,
            "provider_fallback": self.predictor.fallback_reason,
            "uptime_s": round(self._clock() - self._started_at, 3),
        }

    def metrics(self) -> dict[str, Any]:
        """Return the metrics document of ``GET /v1/metrics``."""
        return {
            "model": self.predictor.model_id,
            "model_latency": self.predictor.latency.snapshot(),
            "request_latency": self._request_latency.snapshot(),
            "requests": self._counters.snapshot(),
            "batching": self._batcher.stats(),
        }

    def _predict_document(self, body: bytes) -> tuple[dict[str, Any], int]:
        """Answer one ``POST /v1/predict`` body; return the document and the instance count.

        Raises
        ------
        _RequestError
            With the HTTP status and a one-line message for a request that fails.
        """
        try:
            document = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, NaN
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("instances"), list):
            raise _RequestError(HTTPStatus.BAD_REQUEST, 'expected {"instances": [...]}')
        instances: list[Any] = document["instances"]
        if not 1 <= len(instances) <= self.max_instances:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"send 1 to {self.max_instances} instances, got {len(instances)}",
            )
        try:
            batch = self.predictor.check_inputs(instances)  # all or nothing reaches the model
            futures = [self._batcher.submit(row) for row in batch]
        except ConfigError as error:
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        except FedgeError as error:  # closed or full: the client may retry
            raise _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
        deadline = time.monotonic() + self.request_timeout_s
        try:
            rows = [future.result(max(0.0, deadline - time.monotonic())) for future in futures]
        except FutureTimeoutError:
            for future in futures:
                future.cancel()
            raise _RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE, "the model did not answer in time"
            ) from None
        except ConfigError as error:  # e.g. the model was swapped for another shape
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        outputs = np.stack(rows)
        return {
            "outputs": outputs.tolist(),
            "classes": outputs.argmax(axis=1).tolist() if outputs.ndim == 2 else None,
            "model": self.predictor.model_id,
            "provider": self.predictor.provider.value,
        }, len(instances)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _SHUTDOWN_POLL_S},
            name="fedge-inference-server",
            daemon=True,
        )
        self._thread.start()
        logger.info("inference server listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving, close the socket and drain the micro-batcher."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()
        self._batcher.close()

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
