"""The gateway's routes in process: enrolment, the CA, the revocation list, health, refusals."""

from __future__ import annotations

import json
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import DeviceRow, EnrolmentTokenRow
from fl_server.enrolment import INVALID_TOKEN_MESSAGE, DeviceRegistry, DeviceStatus, create_tokens
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
) -> Gateway:
    return Gateway(
        registry=registry,
        authority=authority,
        ca_pem=ca_pem,
        superlink_address=f"127.0.0.1:{_closed_port()}",
        control=factory,
        clock=lambda: NOW,
    )


@pytest.fixture
def client(
    registry: DeviceRegistry, authority: EnrolmentAuthority, ca_pem: bytes, control: FakeControl
) -> Iterator[TestClient]:
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", control))
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
    # The token was not spent: it still enrols.
    assert client.post(ENROL, json=_request(token)).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000 + b"]" * 200_000, b'{"token": "' + b"a" * 20_000 + b'"}'],
    ids=["200k-deep", "over-long"],
)
def test_an_oversized_request_is_a_413(client: TestClient, engine: Engine, body: bytes) -> None:
    answer = client.post(ENROL, content=body)

    assert answer.status_code == 413
    assert answer.json() == {"error": "the enrolment request is too large"}
    assert _counts(engine) == (0, 0)


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
    gateway = _gateway(registry, authority, ca_pem, lambda: cast("ControlClient", control))

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

    gateway = _gateway(registry, authority, ca_pem, unreachable)

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
