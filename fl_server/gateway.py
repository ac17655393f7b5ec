"""The gateway: the deployment's one public HTTPS port.

Flower's SuperLink serves its Control API (unauthenticated in open-source
Flower: whoever reaches it can register nodes and start runs), its Runtime API
and its Fleet API on one port, so fedge binds it to loopback and puts this
gateway in front. The gateway serves:

- ``POST /v1/fleet/...``: forwarded to the SuperLink unchanged (the SuperNodes'
  API; each request is still authenticated by Flower's node signature);
- ``GET /v1/fedge/ca.pem``: the deployment's CA certificate (a device pins it by
  the fingerprint the operator gave it, before trusting anything else);
- ``POST /v1/fedge/enroll``: a one-time token and the device's two public keys
  in; its device id, its identity certificate and the authority's key out; the
  SuperNode key is registered with the SuperLink under that device id;
- ``GET /v1/fedge/revocations``: the authority-signed revocation list;
- ``GET /healthz``: 200 while the SuperLink answers (for load balancers; no auth).

Refusals are audited (``enrolment.refused``, ``auth.failed``) with a reason
category and the peer address, never what the caller sent, through a
:class:`~fl_server.enrolment.refusals.RefusalRecorder` that bounds how many
records a flood can add. The device is answered exactly as before: the audit
trail is the only place the reason is told. Authentication failures the gateway
sees are unknown routes or methods and the SuperLink's refusals of proxied Fleet
requests: ``401`` (Flower's node authentication: a bad signature, a stale
timestamp or a key that does not own the node id) and ``412`` on
``register-node`` / ``activate-node`` (a SuperNode key the SuperLink does not
know: never enrolled, or unregistered after revocation). The gateway asks for no
client certificate: a device is authenticated by its token, then by its
SuperNode key.

It runs in its own process (``python -m fl_server.gateway DIR``): only this
process reads the enrolment authority's key, never the coordinator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_runtime.secret_files import read_secret
from edge_runtime.tls import pinned_client_context
from fedge.errors import ConfigError, FedgeError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.events import JSONValue
from fl_server.db import open_database
from fl_server.deployment import DeploymentLayout, load_config, split_address
from fl_server.enrolment.authority import read_authority
from fl_server.enrolment.refusals import RefusalRecorder
from fl_server.enrolment.registry import DeviceRegistry, supernode_key_sha256
from fl_server.enrolment.tokens import EnrolmentRefused
from fl_server.superlink import ControlClient, SuperLinkError
from secure_agg.identity import EnrolmentAuthority

__all__ = ["Gateway", "build_app", "main"]

logger = logging.getLogger(__name__)

_MAX_ENROL_BYTES = 16 * 1024
_MAX_FLEET_BYTES = 512 * 1024 * 1024
# Hop-by-hop headers (RFC 9110, 7.6.1) and those httpx recomputes.
_DROPPED_HEADERS = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade"}
)
# Flower's Fleet routes are lower-case words joined by dashes; anything else is not named.
_FLEET_ROUTE = re.compile(r"^/v1/fleet/([a-z]+(?:-[a-z]+){0,5})$")
# The SuperLink answers these for a SuperNode key it does not know (node auth is on).
_UNKNOWN_NODE_ROUTES = frozenset({"register-node", "activate-node"})
# A base64 PEM public key of a NIST curve is well under this.
_MAX_PUBLIC_KEY_HEADER = 4096
_PUBLIC_KEY_HEADER = "flwr-public-key"
_FLUSH_EVERY_S = 10.0


class Gateway:
    """The state behind the gateway's routes (one per process)."""

    def __init__(
        self,
        *,
        registry: DeviceRegistry,
        authority: EnrolmentAuthority,
        ca_pem: bytes,
        superlink_address: str,
        control: Callable[[], ControlClient],
        refusals: RefusalRecorder,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.registry = registry
        self.refusals = refusals
        self.authority = authority
        self.ca_pem = ca_pem
        self.control = control
        self.clock = clock
        self.fleet = httpx.AsyncClient(
            base_url=f"https://{superlink_address}",
            verify=pinned_client_context(ca_pem),
            timeout=httpx.Timeout(600.0, connect=10.0),
        )

    async def close(self) -> None:
        """Close the connection pool to the SuperLink; write the pending refusal summaries."""
        await self.fleet.aclose()
        self.refusals.close()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _peer(request: Request) -> str | None:
    return None if request.client is None else request.client.host


def _claimed_key_sha256(request: Request) -> str | None:
    """Return the fingerprint of the SuperNode key a Fleet request claims, if it parses.

    The key is public (it names the device in ``device.enrolled``); the header is
    caller input, so anything malformed or oversized is simply not named.
    """
    header = request.headers.get(_PUBLIC_KEY_HEADER)
    if header is None or len(header) > _MAX_PUBLIC_KEY_HEADER:
        return None
    try:
        pem = base64.b64decode(header, validate=True).decode("ascii")
        return supernode_key_sha256(pem)
    except (binascii.Error, UnicodeDecodeError, ConfigError):
        return None


def _fleet_refusal(path: str, status: int) -> tuple[str, str] | None:
    """Return (reason, route) when the SuperLink's answer is an authentication failure."""
    match = _FLEET_ROUTE.match(path)
    route = match.group(1) if match else "other"
    if status == 401:
        return "fleet_node_signature", route
    if status == 412 and route in _UNKNOWN_NODE_ROUTES:
        return "fleet_unknown_node", route
    return None


async def _read_limited(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _enrol_fields(body: bytes) -> tuple[str, str, bytes]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise ConfigError("the enrolment request is not JSON") from None
    if not isinstance(payload, dict) or set(payload) != {
        "token",
        "supernode_public_key",
        "identity_public_key",
    }:
        raise ConfigError(
            "the enrolment request must hold exactly token, supernode_public_key, "
            "identity_public_key"
        )
    token, supernode, identity = (
        payload["token"],
        payload["supernode_public_key"],
        payload["identity_public_key"],
    )
    if not all(isinstance(v, str) for v in (token, supernode, identity)):
        raise ConfigError("every enrolment field is text")
    if len(token) > 256:
        raise ConfigError("the token is too long")
    try:
        identity_key = bytes.fromhex(identity)
    except ValueError:
        raise ConfigError("identity_public_key must be hex") from None
    return token, supernode, identity_key


def build_app(gateway: Gateway) -> Starlette:
    """Return the gateway's ASGI application."""

    async def health(request: Request) -> Response:
        del request
        try:
            answer = await gateway.fleet.get("/health", timeout=2.0)
        except httpx.HTTPError:
            answer = None
        if answer is None or answer.status_code != 200:
            return JSONResponse({"status": "unavailable", "superlink": False}, status_code=503)
        return JSONResponse({"status": "ok", "superlink": True})

    async def ca(request: Request) -> Response:
        del request
        return Response(gateway.ca_pem, media_type="application/x-pem-file")

    async def revocations(request: Request) -> Response:
        del request
        signed = gateway.registry.revocation_list(gateway.authority, now=gateway.clock())
        return Response(signed, media_type="application/json")

    def refused(reason: str, request: Request, **details: JSONValue) -> None:
        gateway.refusals.record(AuditEventKind.ENROLMENT_REFUSED, reason, _peer(request), details)

    async def enrol(request: Request) -> Response:
        body = await _read_limited(request, _MAX_ENROL_BYTES)
        if body is None:
            refused("request_too_large", request)
            return _error(413, "the enrolment request is too large")
        try:
            token, supernode_pem, identity_key = _enrol_fields(body)
            enrolment = gateway.registry.enrol(
                token,
                supernode_public_key_pem=supernode_pem,
                identity_public_key=identity_key,
                authority=gateway.authority,
                now=gateway.clock(),
            )
        except EnrolmentRefused as exc:
            refused(exc.reason.value, request, token_id=exc.token_id)
            return _error(403, str(exc))
        except ConfigError as exc:
            refused("malformed_request", request)
            return _error(400, str(exc))
        try:
            with gateway.control() as control:
                node_id = control.register_node(supernode_pem.encode("ascii"))
            gateway.registry.set_node_id(enrolment.device_id, node_id)
        except (SuperLinkError, FedgeError) as exc:
            # The token is spent; the half-enrolled device is revoked so its keys cannot be
            # reused and the operator issues a new token.
            logger.error("enrolment of %s failed at the SuperLink: %s", enrolment.device_id, exc)
            gateway.registry.revoke(
                enrolment.device_id, "SuperLink registration failed", now=gateway.clock()
            )
            return _error(503, "the server could not register the device; ask for a new token")
        return JSONResponse(
            {
                "device_id": enrolment.device_id,
                "node_id": node_id,
                "authority_public_key": gateway.authority.public_key.hex(),
                "certificate": enrolment.certificate.to_json(),
            }
        )

    async def fleet(request: Request) -> Response:
        body = await _read_limited(request, _MAX_FLEET_BYTES)
        if body is None:
            return _error(413, "request too large")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS}
        try:
            upstream = await gateway.fleet.request(
                request.method, request.url.path, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            logger.warning("fleet request %s failed upstream: %s", request.url.path, exc)
            return _error(502, "the SuperLink is unavailable")
        refusal = _fleet_refusal(request.url.path, upstream.status_code)
        if refusal is not None:
            reason, route = refusal
            gateway.refusals.record(
                AuditEventKind.AUTH_FAILED,
                reason,
                _peer(request),
                {
                    "route": route,
                    "status": upstream.status_code,
                    "supernode_key_sha256": _claimed_key_sha256(request),
                },
            )
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_HEADERS}
        passed.pop("content-encoding", None)
        return Response(upstream.content, status_code=upstream.status_code, headers=passed)

    async def unrouted(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        gateway.refusals.record(
            AuditEventKind.AUTH_FAILED,
            "unknown_route" if exc.status_code == 404 else "method_not_allowed",
            _peer(request),
            {"method": request.method if request.method.isalpha() else "other"},
        )
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    return Starlette(
        routes=[
            Route("/healthz", health, methods=["GET"]),
            Route("/v1/fedge/ca.pem", ca, methods=["GET"]),
            Route("/v1/fedge/enroll", enrol, methods=["POST"]),
            Route("/v1/fedge/revocations", revocations, methods=["GET"]),
            Route("/v1/fleet/{path:path}", fleet, methods=["POST"]),
        ],
        exception_handlers={404: unrouted, 405: unrouted},
        lifespan=_lifespan(gateway),
    )


def _lifespan(gateway: Gateway) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        del app

        async def flush_summaries() -> None:
            # A window's summary is written soon after it ends, not only at the next refusal.
            while True:
                await asyncio.sleep(_FLUSH_EVERY_S)
                gateway.refusals.flush()

        flusher = asyncio.create_task(flush_summaries())
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await gateway.close()

    return lifespan


def main(argv: list[str] | None = None) -> int:
    """Serve the gateway of the deployment directory given on the command line."""
    parser = argparse.ArgumentParser(prog="python -m fl_server.gateway")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    import uvicorn

    layout = DeploymentLayout(args.directory)
    try:
        layout.require_initialised()
        config = load_config(layout.config)
        engine = open_database(layout.database_url(config), create=False)
        authority = read_authority(layout.authority_key)
        read_secret(layout.server_key)  # refused when readable by others
        ca_pem = layout.ca_cert.read_bytes()
    except (FedgeError, OSError) as exc:
        sys.stderr.write(f"fedge gateway: error: {exc}\n")
        return 1
    superlink = f"127.0.0.1:{config.server.superlink_port}"
    audit = AuditLog(engine)
    gateway = Gateway(
        registry=DeviceRegistry(engine, audit),
        refusals=RefusalRecorder(audit),
        authority=authority,
        ca_pem=ca_pem,
        superlink_address=superlink,
        control=lambda: ControlClient(superlink, root_certificates=ca_pem),
    )
    host, port = split_address(config.server.address, "server.address")
    uvicorn.run(
        build_app(gateway),
        host=host,
        port=port,
        ssl_certfile=str(layout.server_cert),
        ssl_keyfile=str(layout.server_key),
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
