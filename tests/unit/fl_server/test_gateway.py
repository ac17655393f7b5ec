"""The gateway's routes in process: enrolment, the CA, the revocation list, health, refusals."""

from __future__ import annotations

import base64
import json
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, cast

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import DeviceRow, EnrolmentTokenRow
from fl_server.enrolment import INVALID_TOKEN_MESSAGE, DeviceRegistry, DeviceStatus, create_tokens
from fl_server.enrolment.refusals import RefusalLimits, RefusalRecorder
from fl_server.enrolment.registry import supernode_key_sha256
from fl_server.gateway import Gateway, build_app
from fl_server.pki import certificate_to_pem, create_ca, public_key_to_pem
from fl_server.superlink import ControlClient, SuperLinkError
from secure_agg.crypto import signing_key_from_seed
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority, IdentityCertificate
from secure_agg.randomness import DeterministicRandom
from secure_agg.revocation import verify_revocation_list

with warnings.catch_warnings():
    # starlette 1.x announces a move of its test client to httpx2; httpx is what fedge has.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NODE_ID = 2**63 + 17  # above the signed range: stored as two's complement
ENROL = "/v1/fedge/enroll"


class FakeControl:
    """Stands in for the SuperLink's Control API: registers keys, counts calls."""

    def __init__(self, node_id: int = NODE_ID, error: Exception | None = None) -> None:
        self.node_id = node_id
        self.error = error
        self.registered: list[bytes] = []
        self.exits = 0

    def __enter__(self) -> FakeControl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.exits += 1

    def register_node(self, public_key: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.registered.append(public_key)
        return self.node_id


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


@pytest.fixture
def registry(engine: Engine, audit: AuditLog) -> DeviceRegistry:
    return DeviceRegistry(engine, audit)


@pytest.fixture
def authority() -> EnrolmentAuthority:
    return EnrolmentAuthority.generate(DeterministicRandom(5))


@pytest.fixture
def ca_pem() -> bytes:
    _key, certificate = create_ca("gateway test CA", valid_days=30, now=NOW)
    return certificate_to_pem(certificate)


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


def _gateway(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    factory: Callable[[], ControlClient],
    audit: AuditLog,
    *,
    superlink_address: str | None = None,
    limits: RefusalLimits | None = None,
) -> Gateway:
    return Gateway(
        registry=registry,
        authority=authority,
        ca_pem=ca_pem,
        superlink_address=superlink_address or f"127.0.0.1:{_closed_port()}",
        control=factory,
        refusals=RefusalRecorder(audit, limits=limits, clock=lambda: NOW),
        clock=lambda: NOW,
    )


@pytest.fixture
def client(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    control: FakeControl,
    audit: AuditLog,
) -> Iterator[TestClient]:
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", control), audit)
    with TestClient(build_app(gateway)) as test_client:
        yield test_client


def _token(engine: Engine, audit: AuditLog) -> str:
    (token,) = create_tokens(engine, 1, expires_at=NOW + timedelta(days=1), now=NOW, audit=audit)
    return token


def _identity(seed: int) -> bytes:
    private = DeterministicRandom(seed).random_bytes(32)
    return signing_key_from_seed(private).public_key().public_bytes_raw()


def _request(token: str, *, seed: int = 1) -> dict[str, str]:
    return {
        "token": token,
        "supernode_public_key": public_key_to_pem(
            ec.generate_private_key(ec.SECP384R1()).public_key()
        ),
        "identity_public_key": _identity(seed).hex(),
    }


def _counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        devices = session.scalar(select(func.count()).select_from(DeviceRow))
        used = session.scalar(select(func.count()).where(EnrolmentTokenRow.used_at.is_not(None)))
    return int(devices or 0), int(used or 0)


def test_enrol_registers_the_device_and_returns_its_certificate(
    client: TestClient,
    engine: Engine,
    audit: AuditLog,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    control: FakeControl,
) -> None:
    request = _request(_token(engine, audit))

    answer = client.post(ENROL, json=request)

    assert answer.status_code == 200
    reply: dict[str, Any] = answer.json()
    assert set(reply) == {"device_id", "node_id", "authority_public_key", "certificate"}
    device_id = reply["device_id"]
    assert reply["node_id"] == NODE_ID
    assert reply["authority_public_key"] == authority.public_key.hex()
    certificate = IdentityCertificate(
        enrolment_id=reply["certificate"]["enrolment_id"],
        public_key=bytes.fromhex(reply["certificate"]["public_key"]),
        signature=bytes.fromhex(reply["certificate"]["signature"]),
        expires_at=reply["certificate"]["expires_at"],
    )
    assert certificate.enrolment_id == device_id
    assert certificate.public_key.hex() == request["identity_public_key"]
    assert certificate.expires_at == int((NOW + timedelta(days=365)).timestamp())
    certificate.verify_at_time(authority.public_key, int(NOW.timestamp()))
    with pytest.raises(CryptoError):
        certificate.verify_at_time(authority.public_key, certificate.expires_at)
    assert control.registered == [request["supernode_public_key"].encode("ascii")]
    assert control.exits == 1
    device = registry.device(device_id)
    assert device is not None
    assert (device.status, device.node_id) == (DeviceStatus.ENROLLED, NODE_ID)
    assert registry.device_for_node(NODE_ID) == device
    assert _counts(engine) == (1, 1)


def test_a_reused_token_is_refused_opaquely_and_enrols_nothing_more(
    client: TestClient, engine: Engine, audit: AuditLog, control: FakeControl
) -> None:
    token = _token(engine, audit)
    assert client.post(ENROL, json=_request(token, seed=1)).status_code == 200

    answer = client.post(ENROL, json=_request(token, seed=2))

    assert answer.status_code == 403
    assert answer.json() == {"error": INVALID_TOKEN_MESSAGE}
    assert _counts(engine) == (1, 1)
    assert len(control.registered) == 1


def test_an_unknown_token_gets_the_same_message(client: TestClient, engine: Engine) -> None:
    answer = client.post(ENROL, json=_request("fet_" + "A" * 43))

    assert answer.status_code == 403
    assert answer.json() == {"error": INVALID_TOKEN_MESSAGE}
    assert _counts(engine) == (0, 0)


def _raw_body(token: str, change: Callable[[dict[str, object]], None]) -> bytes:
    document: dict[str, object] = dict(_request(token))
    change(document)
    return json.dumps(document).encode()


def _set(key: str, value: object) -> Callable[[dict[str, object]], None]:
    def change(document: dict[str, object]) -> None:
        document[key] = value

    return change


def _drop(key: str) -> Callable[[dict[str, object]], None]:
    def change(document: dict[str, object]) -> None:
        del document[key]

    return change


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda token: b"token=" + token.encode(), r"^the enrolment request is not JSON$"),
        (lambda token: b"[" * 16_000, r"^the enrolment request is not JSON$"),
        (lambda token: b'"just text"', r"must hold exactly token, supernode_public_key, identity"),
        (lambda token: _raw_body(token, _set("extra", 1)), r"must hold exactly token"),
        (lambda token: _raw_body(token, _drop("identity_public_key")), r"must hold exactly"),
        (lambda token: _raw_body(token, _set("token", 7)), r"^every enrolment field is text$"),
        (lambda token: _raw_body(token, _set("token", "t" * 257)), r"^the token is too long$"),
        (
            lambda token: _raw_body(token, _set("identity_public_key", "zz" * 32)),
            r"^identity_public_key must be hex$",
        ),
        (
            lambda token: _raw_body(token, _set("identity_public_key", "ab" * 31)),
            r"^an identity public key has exactly 32 bytes$",
        ),
        (
            lambda token: _raw_body(token, _set("supernode_public_key", "not a key")),
            r"^the public key is not a PEM SubjectPublicKeyInfo$",
        ),
    ],
)
def test_a_malformed_request_is_a_400_and_spends_nothing(
    client: TestClient,
    engine: Engine,
    audit: AuditLog,
    control: FakeControl,
    body: Callable[[str], bytes],
    match: str,
) -> None:
    token = _token(engine, audit)

    answer = client.post(ENROL, content=body(token))

    assert answer.status_code == 400
    assert re.search(match, answer.json()["error"])
    assert _counts(engine) == (0, 0)
    assert control.registered == []
    (event,) = audit.latest(1)
    assert event.kind is AuditEventKind.ENROLMENT_REFUSED
    assert dict(event.payload) == {"reason": "malformed_request", "peer": "testclient"}
    # The token was not spent: it still enrols.
    assert client.post(ENROL, json=_request(token)).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000 + b"]" * 200_000, b'{"token": "' + b"a" * 20_000 + b'"}'],
    ids=["200k-deep", "over-long"],
)
def test_an_oversized_request_is_a_413(
    client: TestClient, engine: Engine, audit: AuditLog, body: bytes
) -> None:
    answer = client.post(ENROL, content=body)

    assert answer.status_code == 413
    assert answer.json() == {"error": "the enrolment request is too large"}
    assert _counts(engine) == (0, 0)
    (event,) = audit.latest(1)
    assert (event.kind, dict(event.payload)) == (
        AuditEventKind.ENROLMENT_REFUSED,
        {"reason": "request_too_large", "peer": "testclient"},
    )


def test_a_lying_content_length_is_a_413(client: TestClient, engine: Engine) -> None:
    answer = client.post(ENROL, content=b"{}", headers={"content-length": "99999999"})

    assert answer.status_code == 413
    assert _counts(engine) == (0, 0)


@pytest.mark.parametrize(
    "error",
    [SuperLinkError("Control API RegisterNode failed: HTTP 409"), ConfigError("bad key")],
)
def test_a_superlink_failure_is_a_503_and_the_device_ends_revoked(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    engine: Engine,
    audit: AuditLog,
    error: Exception,
) -> None:
    control = FakeControl(error=error)
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", control), audit)

    with TestClient(build_app(gateway)) as client:
        answer = client.post(ENROL, json=_request(_token(engine, audit)))
        revocations = client.get("/v1/fedge/revocations").content

    assert answer.status_code == 503
    assert answer.json() == {
        "error": "the server could not register the device; ask for a new token"
    }
    (device,) = registry.list()
    assert device.status is DeviceStatus.REVOKED
    assert device.node_id is None
    assert _counts(engine) == (1, 1)
    revoked = verify_revocation_list(revocations, authority.public_key, now=NOW)
    assert revoked.device_ids == {device.device_id}
    assert audit.latest(1)[0].kind is AuditEventKind.DEVICE_REVOKED


def test_a_control_factory_that_cannot_connect_is_a_503(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    engine: Engine,
    audit: AuditLog,
) -> None:
    def unreachable() -> ControlClient:
        raise SuperLinkError("Control API unreachable")

    gateway = _gateway(registry, authority, ca_pem, unreachable, audit)

    with TestClient(build_app(gateway)) as client:
        answer = client.post(ENROL, json=_request(_token(engine, audit)))

    assert answer.status_code == 503
    (device,) = registry.list()
    assert device.status is DeviceStatus.REVOKED


def test_the_ca_is_served(client: TestClient, ca_pem: bytes) -> None:
    answer = client.get("/v1/fedge/ca.pem")

    assert answer.status_code == 200
    assert answer.content == ca_pem
    assert answer.headers["content-type"] == "application/x-pem-file"


def test_the_revocation_list_verifies_and_grows_with_revocations(
    client: TestClient,
    engine: Engine,
    audit: AuditLog,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
) -> None:
    empty = verify_revocation_list(
        client.get("/v1/fedge/revocations").content, authority.public_key, now=NOW
    )
    device_id = client.post(ENROL, json=_request(_token(engine, audit))).json()["device_id"]
    registry.revoke(device_id, "lost", now=NOW)

    answer = client.get("/v1/fedge/revocations")
    listed = verify_revocation_list(
        answer.content, authority.public_key, now=NOW, min_sequence=empty.sequence + 1
    )

    assert answer.headers["content-type"] == "application/json"
    assert (empty.sequence, empty.device_ids) == (0, frozenset())
    assert listed.device_ids == {device_id}
    other = EnrolmentAuthority.generate(DeterministicRandom(6))
    with pytest.raises(CryptoError):
        verify_revocation_list(answer.content, other.public_key, now=NOW)


def test_health_is_503_while_the_superlink_is_unreachable(client: TestClient) -> None:
    answer = client.get("/healthz")

    assert answer.status_code == 503
    assert answer.json() == {"status": "unavailable", "superlink": False}


def test_fleet_requests_are_a_502_while_the_superlink_is_unreachable(client: TestClient) -> None:
    answer = client.post("/v1/fleet/pull-messages", content=b"\x00\x01")

    assert answer.status_code == 502
    assert answer.json() == {"error": "the SuperLink is unavailable"}


def test_only_the_documented_methods_are_routed(client: TestClient) -> None:
    assert client.get(ENROL).status_code == 405
    assert client.post("/v1/fedge/ca.pem").status_code == 405
    assert client.get("/v1/control/list-nodes").status_code == 404


def _refusals(audit: AuditLog) -> list[dict[str, object]]:
    return [
        dict(event.payload)
        for event in audit.iter()
        if event.kind is AuditEventKind.ENROLMENT_REFUSED
    ]


def _trail_text(audit: AuditLog) -> str:
    return "\n".join(json.dumps(dict(event.payload)) for event in audit.iter())


def test_token_refusals_are_audited_by_reason_without_the_token(
    client: TestClient, engine: Engine, audit: AuditLog
) -> None:
    used = _token(engine, audit)
    assert client.post(ENROL, json=_request(used, seed=1)).status_code == 200
    (expired,) = create_tokens(
        engine, 1, expires_at=NOW - timedelta(seconds=1), now=NOW - timedelta(days=1), audit=audit
    )
    unknown = "fet_" + "B" * 43
    used_id = next(
        e.payload["token_id"] for e in audit.iter() if e.kind is AuditEventKind.DEVICE_ENROLLED
    )
    expired_id = audit.latest(1)[0].payload["token_ids"][0]  # type: ignore[index]

    answers = [
        client.post(ENROL, json=_request(token, seed=seed))
        for seed, token in ((2, used), (3, expired), (4, unknown), (5, "not-a-token"))
    ]

    assert [a.status_code for a in answers] == [403] * 4
    assert all(a.json() == {"error": INVALID_TOKEN_MESSAGE} for a in answers)
    assert _refusals(audit) == [
        {"reason": "used_token", "peer": "testclient", "token_id": used_id},
        {"reason": "expired_token", "peer": "testclient", "token_id": expired_id},
        {"reason": "unknown_token", "peer": "testclient", "token_id": None},
        {"reason": "malformed_token", "peer": "testclient", "token_id": None},
    ]
    trail = _trail_text(audit)
    for token in (used, expired, unknown, "not-a-token"):
        assert token not in trail


def test_a_taken_key_is_audited_and_leaves_the_token_usable(
    client: TestClient, engine: Engine, audit: AuditLog
) -> None:
    first = _request(_token(engine, audit), seed=1)
    assert client.post(ENROL, json=first).status_code == 200
    second = _token(engine, audit)
    token_id = audit.latest(1)[0].payload["token_ids"][0]  # type: ignore[index]

    answer = client.post(
        ENROL,
        json={**_request(second, seed=9), "identity_public_key": first["identity_public_key"]},
    )

    assert answer.status_code == 403
    assert answer.json() == {"error": "a key of this device is already enrolled or was revoked"}
    assert _refusals(audit) == [{"reason": "key_taken", "peer": "testclient", "token_id": token_id}]
    assert _counts(engine) == (1, 1)  # the second token is still unused


def test_a_refusal_flood_adds_a_bounded_number_of_records(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    engine: Engine,
    audit: AuditLog,
) -> None:
    control = FakeControl()
    limits = RefusalLimits(events_per_window=3)
    gateway = _gateway(
        registry, authority, ca_pem, lambda: cast("ControlClient", control), audit, limits=limits
    )
    before = audit.verify().records_checked

    with TestClient(build_app(gateway)) as client:
        answers = [client.post(ENROL, json=_request("fet_" + "C" * 43)) for _ in range(40)]
        assert len(_refusals(audit)) == 3

    # Shutting down wrote the window's summary: 3 records + 1, not 40.
    assert {a.status_code for a in answers} == {403}
    assert audit.verify().records_checked == before + 4
    summary = audit.latest(1)[0]
    assert summary.kind is AuditEventKind.AUDIT_SUPPRESSED
    assert dict(summary.payload) == {
        "kind": "enrolment.refused",
        "suppressed": 37,
        "limit": 3,
        "window_start": NOW.isoformat(timespec="microseconds"),
        "window_end": NOW.isoformat(timespec="microseconds"),
        "reasons": {"unknown_token": 37},
        "peers": {"testclient": 37},
        "other_peers": 0,
    }


def test_unknown_routes_and_methods_are_audited_as_auth_failures(
    client: TestClient, audit: AuditLog
) -> None:
    missing = client.post("/v1/control/start-run", content=b"x")
    wrong = client.get(ENROL)

    assert missing.status_code == 404
    assert wrong.status_code == 405
    assert "POST" in wrong.headers["allow"]
    failures = [dict(e.payload) for e in audit.iter() if e.kind is AuditEventKind.AUTH_FAILED]
    assert failures == [
        {"reason": "unknown_route", "peer": "testclient", "method": "POST"},
        {"reason": "method_not_allowed", "peer": "testclient", "method": "GET"},
    ]


def _superlink_answering(status: int) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        del request
        return httpx.Response(status, json={"detail": "Invalid SuperNode authentication"})

    return httpx.MockTransport(answer)


@pytest.mark.parametrize(
    ("route", "status", "reason"),
    [
        ("pull-messages", 401, "fleet_node_signature"),
        ("activate-node", 401, "fleet_node_signature"),
        ("activate-node", 412, "fleet_unknown_node"),
        ("register-node", 412, "fleet_unknown_node"),
    ],
)
def test_a_superlink_authentication_refusal_is_audited_and_passed_on(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    audit: AuditLog,
    route: str,
    status: int,
    reason: str,
) -> None:
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", None), audit)
    gateway.fleet = httpx.AsyncClient(
        base_url="https://superlink", transport=_superlink_answering(status)
    )
    pem = public_key_to_pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    header = base64.b64encode(pem.encode("ascii")).decode("ascii")

    with TestClient(build_app(gateway)) as client:
        answer = client.post(
            f"/v1/fleet/{route}",
            content=b"\x00",
            headers={"flwr-public-key": header, "flwr-signature": "c2lnbmF0dXJl"},
        )

    assert answer.status_code == status
    assert answer.json() == {"detail": "Invalid SuperNode authentication"}
    (event,) = [e for e in audit.iter() if e.kind is AuditEventKind.AUTH_FAILED]
    assert dict(event.payload) == {
        "reason": reason,
        "peer": "testclient",
        "route": route,
        "status": status,
        "supernode_key_sha256": supernode_key_sha256(pem),
    }
    assert "c2lnbmF0dXJl" not in _trail_text(audit)


@pytest.mark.parametrize(
    ("route", "status"),
    [
        ("pull-messages", 200),
        ("push-messages", 412),
        ("pull-messages", 500),
    ],
)
def test_other_superlink_answers_are_not_auth_failures(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    audit: AuditLog,
    route: str,
    status: int,
) -> None:
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", None), audit)
    gateway.fleet = httpx.AsyncClient(
        base_url="https://superlink", transport=_superlink_answering(status)
    )

    with TestClient(build_app(gateway)) as client:
        answer = client.post(f"/v1/fleet/{route}", content=b"\x00")

    assert answer.status_code == status
    assert not [e for e in audit.iter() if e.kind is AuditEventKind.AUTH_FAILED]


@pytest.mark.parametrize(
    "header",
    [None, "not base64!", base64.b64encode(b"not a key").decode(), "QQ==" * 2000],
    ids=["missing", "not-base64", "not-a-key", "oversized"],
)
def test_a_malformed_claimed_key_is_not_named(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    audit: AuditLog,
    header: str | None,
) -> None:
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", None), audit)
    gateway.fleet = httpx.AsyncClient(
        base_url="https://superlink", transport=_superlink_answering(401)
    )
    headers = {} if header is None else {"flwr-public-key": header}

    with TestClient(build_app(gateway)) as client:
        answer = client.post("/v1/fleet/pull-messages", content=b"", headers=headers)

    assert answer.status_code == 401
    (event,) = [e for e in audit.iter() if e.kind is AuditEventKind.AUTH_FAILED]
    assert dict(event.payload) == {
        "reason": "fleet_node_signature",
        "peer": "testclient",
        "route": "pull-messages",
        "status": 401,
        "supernode_key_sha256": None,
    }
