"""fedge client enroll against the real gateway app (in process) and against forged replies.

``fl_client.enrolment`` reaches the server through ``httpx.get`` and ``httpx.Client``;
the tests swap its ``httpx`` for a namespace whose clients either run the gateway's
ASGI app in process (starlette's test client) or answer with ``httpx.MockTransport``.
"""

from __future__ import annotations

import contextlib
import json
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import Engine

from edge_runtime.secret_files import read_secret
from fedge.errors import ConfigError
from fl_client.device_home import (
    DeviceHome,
    DeviceRecord,
    policy_from_json,
    policy_to_json,
)
from fl_client.enrolment import EnrolmentError, PolicyChoices, enrol_device, fingerprint_of
from fl_client.policy import DevicePolicy
from fl_server.audit import AuditLog
from fl_server.db import open_database
from fl_server.deployment_init import ca_fingerprint
from fl_server.enrolment import INVALID_TOKEN_MESSAGE, DeviceRegistry, create_tokens
from fl_server.enrolment.refusals import RefusalRecorder
from fl_server.gateway import Gateway, build_app
from fl_server.pki import certificate_to_pem, create_ca
from fl_server.superlink import ControlClient
from secure_agg.identity import EnrolmentAuthority
from secure_agg.params import ThreatModel
from secure_agg.policy import ProtocolPolicy
from secure_agg.randomness import DeterministicRandom

with warnings.catch_warnings():
    # starlette 1.x announces a move of its test client to httpx2; httpx is what fedge has.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

SERVER = "https://fedge.test:9443"
NODE_ID = 4242


class _Control:
    def __enter__(self) -> _Control:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def register_node(self, public_key: bytes) -> int:
        assert public_key.startswith(b"-----BEGIN PUBLIC KEY-----")
        return NODE_ID


def _use_client(monkeypatch: pytest.MonkeyPatch, client: Callable[[], httpx.Client]) -> None:
    """Route fl_client.enrolment's HTTP through ``client`` (its arguments are not used)."""

    def get(url: str, **_: object) -> httpx.Response:
        return client().get(url)

    def make(**_: object) -> contextlib.AbstractContextManager[httpx.Client]:
        return contextlib.nullcontext(client())

    namespace = SimpleNamespace(
        get=get, Client=make, HTTPError=httpx.HTTPError, Timeout=httpx.Timeout
    )
    monkeypatch.setattr("fl_client.enrolment.httpx", namespace)


@pytest.fixture
def ca_pem() -> bytes:
    _key, certificate = create_ca("device test CA", valid_days=30, now=datetime.now(UTC))
    return certificate_to_pem(certificate)


@pytest.fixture
def authority() -> EnrolmentAuthority:
    return EnrolmentAuthority.generate(DeterministicRandom(12))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    created = open_database(f"sqlite:///{tmp_path / 'server.db'}")
    try:
        yield created
    finally:
        created.dispose()


@pytest.fixture
def registry(engine: Engine) -> DeviceRegistry:
    return DeviceRegistry(engine, AuditLog(engine))


@pytest.fixture
def gateway_client(
    registry: DeviceRegistry, authority: EnrolmentAuthority, ca_pem: bytes, engine: Engine
) -> Iterator[TestClient]:
    gateway = Gateway(
        registry=registry,
        authority=authority,
        ca_pem=ca_pem,
        superlink_address="127.0.0.1:9",
        control=lambda: cast("ControlClient", _Control()),
        refusals=RefusalRecorder(AuditLog(engine)),
    )
    with TestClient(build_app(gateway), base_url=SERVER) as client:
        yield client


@pytest.fixture
def token(engine: Engine) -> str:
    now = datetime.now(UTC)
    (created,) = create_tokens(
        engine, 1, expires_at=now + timedelta(hours=1), now=now, audit=AuditLog(engine)
    )
    return created


# ------------------------------------------------------------ the real gateway


def test_enrol_through_the_gateway_installs_the_device(
    monkeypatch: pytest.MonkeyPatch,
    gateway_client: TestClient,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    ca_pem: bytes,
    token: str,
    tmp_path: Path,
) -> None:
    _use_client(monkeypatch, lambda: gateway_client)
    directory = tmp_path / "device"

    record = enrol_device(
        SERVER + "/",
        token,
        directory,
        ca_fingerprint=ca_fingerprint(ca_pem),
        choices=PolicyChoices(lifetime_epsilon=12.0, min_survivors=3),
    )

    home = DeviceHome(directory)
    assert record.node_id == NODE_ID
    assert record.server_url == SERVER
    assert home.require_enrolled() == record
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for secret in (home.supernode_key, home.identity_key, home.superexec_secret):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert home.supernode_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert len(read_secret(home.identity_key)) == 32
    assert home.ca_cert.read_bytes() == ca_pem
    identity = home.identity()
    assert identity.certificate.enrolment_id == record.device_id
    identity.certificate.verify_at_time(authority.public_key, int(time.time()))
    policy = home.load_policy()
    assert policy.lifetime_epsilon == 12.0
    assert policy.protocol is not None
    assert policy.protocol.authority_public_key == authority.public_key
    assert policy.protocol.require_certificate_expiry is True
    assert policy.protocol.min_survivors == 3
    device = registry.device(record.device_id)
    assert device is not None and device.node_id == NODE_ID
    assert device.identity_public_key == identity.certificate.public_key


def test_a_second_enrolment_into_the_same_directory_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    gateway_client: TestClient,
    ca_pem: bytes,
    token: str,
    tmp_path: Path,
) -> None:
    _use_client(monkeypatch, lambda: gateway_client)
    directory = tmp_path / "device"
    enrol_device(SERVER, token, directory, ca_fingerprint=ca_fingerprint(ca_pem))
    before = (directory / "device.json").read_bytes()

    with pytest.raises(ConfigError, match=r"already holds an enrolled device"):
        enrol_device(SERVER, token, directory, ca_fingerprint=ca_fingerprint(ca_pem))

    assert (directory / "device.json").read_bytes() == before


def test_a_spent_token_is_refused_with_the_servers_message(
    monkeypatch: pytest.MonkeyPatch,
    gateway_client: TestClient,
    ca_pem: bytes,
    token: str,
    tmp_path: Path,
) -> None:
    _use_client(monkeypatch, lambda: gateway_client)
    enrol_device(SERVER, token, tmp_path / "one", ca_fingerprint=ca_fingerprint(ca_pem))

    with pytest.raises(
        EnrolmentError, match=rf"refused the enrolment \(403\): {INVALID_TOKEN_MESSAGE}"
    ):
        enrol_device(SERVER, token, tmp_path / "two", ca_fingerprint=ca_fingerprint(ca_pem))

    assert not (tmp_path / "two").exists()


def test_a_wrong_ca_fingerprint_leaves_no_directory_and_spends_no_token(
    monkeypatch: pytest.MonkeyPatch,
    gateway_client: TestClient,
    registry: DeviceRegistry,
    token: str,
    tmp_path: Path,
) -> None:
    _use_client(monkeypatch, lambda: gateway_client)
    directory = tmp_path / "device"

    with pytest.raises(EnrolmentError, match=r"does not match --ca-fingerprint: refusing to enrol"):
        enrol_device(SERVER, token, directory, ca_fingerprint="sha256:" + "0" * 64)

    assert not directory.exists()
    assert registry.list() == []


# ------------------------------------------------------------- forged replies


def _server(
    authority: EnrolmentAuthority,
    *,
    status: int = 200,
    body: Callable[[dict[str, Any]], object] | None = None,
) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        assert set(sent) == {"token", "supernode_public_key", "identity_public_key"}
        if body is None:
            return httpx.Response(status, json=_reply(authority, sent))
        answer = body(sent)
        if isinstance(answer, bytes):
            return httpx.Response(status, content=answer)
        return httpx.Response(status, json=answer)

    return handle


def _reply(
    authority: EnrolmentAuthority,
    sent: dict[str, Any],
    *,
    device_id: str = "dev-0123456789abcdef",
    enrolment_id: str | None = None,
    node_id: int = 9,
    key: bytes | None = None,
    expires_at: int | None = -1,
    signer: EnrolmentAuthority | None = None,
) -> dict[str, Any]:
    expiry = int(time.time()) + 3600 if expires_at == -1 else expires_at
    certificate = (signer or authority).certify(
        enrolment_id or device_id,
        key or bytes.fromhex(sent["identity_public_key"]),
        expires_at=expiry,
    )
    return {
        "device_id": device_id,
        "node_id": node_id,
        "authority_public_key": authority.public_key.hex(),
        "certificate": certificate.to_json(),
    }


@pytest.fixture
def ca_file(tmp_path: Path, ca_pem: bytes) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca_pem)
    return path


def _forged(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    _use_client(monkeypatch, lambda: httpx.Client(transport=httpx.MockTransport(handler)))


def test_a_well_formed_forged_reply_is_accepted_as_the_positive_control(
    monkeypatch: pytest.MonkeyPatch, authority: EnrolmentAuthority, ca_file: Path, tmp_path: Path
) -> None:
    _forged(monkeypatch, _server(authority))

    record = enrol_device(SERVER, "fet_x", tmp_path / "device", ca_cert=ca_file)

    assert record == DeviceRecord(device_id="dev-0123456789abcdef", node_id=9, server_url=SERVER)


OTHER = EnrolmentAuthority.generate(DeterministicRandom(13))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda a, s: [1, 2], r"^the server's enrolment reply is not a JSON object$"),
        (lambda a, s: b"<html>", r"^the server's enrolment reply is not JSON$"),
        (lambda a, s: {"device_id": "dev-00000000"}, r"enrolment reply is malformed: 'node_id'"),
        (
            lambda a, s: {**_reply(a, s), "authority_public_key": "zz"},
            r"^the server's enrolment reply is malformed: ",
        ),
        (
            lambda a, s: _reply(a, s, device_id="device-1"),
            r"^the server's enrolment reply names no valid device$",
        ),
        (
            lambda a, s: _reply(a, s, node_id=2**64),
            r"^the server's enrolment reply names no valid device$",
        ),
        (
            lambda a, s: _reply(a, s, key=bytes(range(32))),
            r"^the certificate is not for this device's key$",
        ),
        (
            lambda a, s: _reply(a, s, enrolment_id="dev-ffffffffffffffff"),
            r"^the certificate is not for this device's key$",
        ),
        (
            lambda a, s: _reply(a, s, signer=OTHER),
            r"^the certificate does not verify with the authority key$",
        ),
        (
            lambda a, s: _reply(a, s, expires_at=int(time.time()) - 60),
            r"^the certificate does not verify with the authority key$",
        ),
        (
            lambda a, s: _reply(a, s, expires_at=None),
            r"^the certificate has no expiry \(this server is too old or forged\)$",
        ),
    ],
)
def test_a_reply_that_does_not_check_out_is_refused_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
    authority: EnrolmentAuthority,
    ca_file: Path,
    tmp_path: Path,
    body: Callable[[EnrolmentAuthority, dict[str, Any]], object],
    match: str,
) -> None:
    _forged(monkeypatch, _server(authority, body=lambda sent: body(authority, sent)))
    directory = tmp_path / "device"

    with pytest.raises(EnrolmentError, match=match):
        enrol_device(SERVER, "fet_x", directory, ca_cert=ca_file)

    assert not directory.exists()


def test_a_refusal_without_json_has_an_empty_reason(
    monkeypatch: pytest.MonkeyPatch, authority: EnrolmentAuthority, ca_file: Path, tmp_path: Path
) -> None:
    _forged(monkeypatch, _server(authority, status=502, body=lambda sent: b"bad gateway"))

    with pytest.raises(EnrolmentError, match=r"^the server refused the enrolment \(502\): $"):
        enrol_device(SERVER, "fet_x", tmp_path / "device", ca_cert=ca_file)


def test_an_unreachable_server_is_an_enrolment_error(
    monkeypatch: pytest.MonkeyPatch, ca_file: Path, tmp_path: Path
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    _forged(monkeypatch, refuse)

    with pytest.raises(EnrolmentError, match=rf"^cannot reach {SERVER}: connection refused$"):
        enrol_device(SERVER, "fet_x", tmp_path / "device", ca_cert=ca_file)
    with pytest.raises(EnrolmentError, match=rf"^cannot reach {SERVER}: connection refused$"):
        enrol_device(SERVER, "fet_x", tmp_path / "device", ca_fingerprint="sha256:" + "a" * 64)


def test_a_server_that_serves_no_ca_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _forged(monkeypatch, lambda request: httpx.Response(404))

    with pytest.raises(EnrolmentError, match=rf"^{SERVER} did not serve its CA certificate$"):
        enrol_device(SERVER, "fet_x", tmp_path / "device", ca_fingerprint="sha256:" + "a" * 64)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({}, r"^give --ca-fingerprint sha256:<64 hex digits> or --ca-cert FILE$"),
        ({"ca_fingerprint": "sha256:ABC"}, r"^give --ca-fingerprint sha256:<64 hex digits>"),
        ({"ca_fingerprint": "md5:" + "a" * 64}, r"^give --ca-fingerprint sha256:<64 hex digits>"),
        ({"ca_cert": Path("/nonexistent/ca.pem")}, r"^cannot read --ca-cert /nonexistent/ca.pem: "),
    ],
)
def test_enrol_refuses_a_missing_or_malformed_pin(
    tmp_path: Path, arguments: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        enrol_device(SERVER, "fet_x", tmp_path / "device", **arguments)

    assert not (tmp_path / "device").exists()


def test_enrol_refuses_a_ca_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate", encoding="ascii")

    with pytest.raises(EnrolmentError, match=r"CA certificate is not a PEM certificate$"):
        enrol_device(SERVER, "fet_x", tmp_path / "device", ca_cert=bad)


def test_enrol_refuses_plain_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--server must be an https:// URL, got 'http://x'$"):
        enrol_device("http://x", "fet_x", tmp_path / "device", ca_fingerprint="sha256:" + "a" * 64)


def test_enrol_refuses_a_file_as_directory(tmp_path: Path, ca_file: Path) -> None:
    path = tmp_path / "device"
    path.write_text("x", encoding="ascii")

    with pytest.raises(ConfigError, match=r"device is not a directory$"):
        enrol_device(SERVER, "fet_x", path, ca_cert=ca_file)


# ---------------------------------------------------- fingerprints and policy


def test_fingerprint_of_matches_the_servers_fingerprint(ca_pem: bytes) -> None:
    assert fingerprint_of(ca_pem) == ca_fingerprint(ca_pem)
    assert fingerprint_of(ca_pem).startswith("sha256:")
    assert len(fingerprint_of(ca_pem)) == len("sha256:") + 64


def test_fingerprint_of_refuses_what_is_not_pem() -> None:
    with pytest.raises(EnrolmentError, match=r"^the server's CA certificate is not a PEM"):
        fingerprint_of(b"<html>hello</html>")


def _policy(*, protocol: bool = True) -> DevicePolicy:
    return DevicePolicy(
        protocol=ProtocolPolicy(
            threat_model=ThreatModel.ACTIVE,
            authority_public_key=bytes(range(32)),
            ring_bits=frozenset({16, 32}),
            min_degree=3,
            corrupt_fraction=0.2,
            min_survivors=4,
            max_participants=500,
            max_vector_length=1 << 20,
            require_certificate_expiry=True,
        )
        if protocol
        else None,
        max_l2_clip=3.0,
        min_noise_multiplier=0.8,
        min_honest_contributors=5,
        lifetime_epsilon=6.5,
        delta=1e-7,
    )


@pytest.mark.parametrize("protocol", [True, False])
def test_the_policy_round_trips_through_json(protocol: bool) -> None:
    policy = _policy(protocol=protocol)

    loaded = policy_from_json(json.loads(json.dumps(policy_to_json(policy))))

    assert loaded == policy


def test_a_policy_without_the_expiry_flag_does_not_require_expiry() -> None:
    document = policy_to_json(_policy())
    del document["protocol"]["require_certificate_expiry"]

    loaded = policy_from_json(document)

    assert loaded.protocol is not None
    assert loaded.protocol.require_certificate_expiry is False


def _home_with_policy(tmp_path: Path, text: str) -> DeviceHome:
    home = DeviceHome(tmp_path)
    home.policy.write_text(text, encoding="utf-8")
    return home


def _policy_text(change: Callable[[dict[str, Any]], None]) -> str:
    document = policy_to_json(_policy())
    change(document)
    return json.dumps(document)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        _policy_text(lambda d: d.pop("delta")),
        _policy_text(lambda d: d.update(max_l2_clip=True)),
        _policy_text(lambda d: d.update(max_l2_clip="3")),
        _policy_text(lambda d: d.update(lifetime_epsilon=float("nan"))),
        _policy_text(lambda d: d.update(max_l2_clip=-1.0)),
        _policy_text(lambda d: d["protocol"].update(threat_model="paranoid")),
        _policy_text(lambda d: d["protocol"].update(authority_public_key="zz")),
        _policy_text(lambda d: d["protocol"].update(ring_bits=[4])),
    ],
)
def test_a_damaged_policy_names_its_file(tmp_path: Path, text: str) -> None:
    home = _home_with_policy(tmp_path, text)

    with pytest.raises(ConfigError, match=rf"^{home.policy} is damaged or missing: "):
        home.load_policy()


def test_a_missing_policy_names_its_file(tmp_path: Path) -> None:
    home = DeviceHome(tmp_path)

    with pytest.raises(ConfigError, match=rf"^{home.policy} is damaged or missing: "):
        home.load_policy()


def test_require_enrolled_says_how_to_enrol(tmp_path: Path) -> None:
    home = DeviceHome(tmp_path / "device")

    with pytest.raises(
        ConfigError, match=r"^this device is not enrolled \(.*device.json missing\)"
    ):
        home.require_enrolled()
    with pytest.raises(ConfigError, match=r"run `fedge client enroll --server URL --token T"):
        home.require_enrolled()


@pytest.mark.parametrize(
    "text", ["{", '{"device_id": "dev-1"}', '{"device_id": "d", "node_id": "x", "server_url": ""}']
)
def test_a_damaged_device_record_names_its_file(tmp_path: Path, text: str) -> None:
    home = DeviceHome(tmp_path)
    home.record.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError, match=rf"^{home.record} is damaged: "):
        home.require_enrolled()


def test_a_damaged_identity_certificate_names_its_file(tmp_path: Path) -> None:
    home = DeviceHome(tmp_path)
    home.identity_key.write_bytes(bytes(32))
    home.identity_key.chmod(0o600)
    home.identity_certificate.write_text('{"enrolment_id": "dev-1"}', encoding="utf-8")

    with pytest.raises(ConfigError, match=rf"^{home.identity_certificate} is damaged: "):
        home.identity()
