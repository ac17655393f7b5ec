from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from fedge.errors import ConfigError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import DeviceRow, EnrolmentTokenRow
from fl_server.enrolment import (
    INVALID_TOKEN_MESSAGE,
    DeviceRegistry,
    DeviceStatus,
    EnrolmentRefused,
    create_tokens,
)
from fl_server.enrolment.registry import supernode_key_sha256
from fl_server.enrolment.tokens import RefusalReason
from fl_server.pki import public_key_to_pem, verify_revocation_list
from secure_agg.crypto import signing_key_from_seed
from secure_agg.errors import CryptoError
from secure_agg.identity import EnrolmentAuthority
from secure_agg.randomness import DeterministicRandom

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EXPIRES = NOW + timedelta(days=1)


@pytest.fixture
def audit(engine: Engine) -> AuditLog:
    return AuditLog(engine)


@pytest.fixture
def registry(engine: Engine, audit: AuditLog) -> DeviceRegistry:
    return DeviceRegistry(engine, audit)


@pytest.fixture
def authority() -> EnrolmentAuthority:
    return EnrolmentAuthority.generate(DeterministicRandom(21))


def _supernode_pem(curve: ec.EllipticCurve | None = None) -> str:
    return public_key_to_pem(ec.generate_private_key(curve or ec.SECP256R1()).public_key())


def _identity(seed: int) -> bytes:
    private = DeterministicRandom(seed).random_bytes(32)
    return signing_key_from_seed(private).public_key().public_bytes_raw()


def _tokens(engine: Engine, audit: AuditLog, count: int = 1) -> list[str]:
    return create_tokens(engine, count, expires_at=EXPIRES, now=NOW, audit=audit)


def _counts(engine: Engine) -> tuple[int, int]:
    with Session(engine) as session:
        devices = session.scalar(select(func.count()).select_from(DeviceRow))
        used = session.scalar(select(func.count()).where(EnrolmentTokenRow.used_at.is_not(None)))
    return int(devices or 0), int(used or 0)


def test_enrol_stores_the_device_and_returns_a_certificate_for_its_own_key(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit)
    pem = _supernode_pem(ec.SECP384R1())

    enrolment = registry.enrol(
        token,
        supernode_public_key_pem=pem,
        identity_public_key=_identity(1),
        authority=authority,
        now=NOW,
    )

    assert enrolment.device_id.startswith("dev-")
    assert len(enrolment.device_id) == 20
    assert enrolment.enrolled_at == NOW
    enrolment.certificate.verify(authority.public_key)
    assert enrolment.certificate.enrolment_id == enrolment.device_id
    assert enrolment.certificate.public_key == _identity(1)
    device = registry.device(enrolment.device_id)
    assert device is not None
    assert device.supernode_public_key_pem == pem
    assert device.identity_public_key == _identity(1)
    assert (device.status, device.node_id, device.is_active) == (DeviceStatus.ENROLLED, None, True)
    assert device.enrolled_at == NOW
    event = audit.latest(1)[0]
    assert event.kind is AuditEventKind.DEVICE_ENROLLED
    assert event.payload["device_id"] == enrolment.device_id
    assert event.payload["token_id"] == device.token_id
    assert token not in str(event.payload)
    assert audit.verify().ok


def _enrol(
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    token: str,
    *,
    pem: str | None = None,
    identity: bytes | None = None,
    now: datetime = NOW,
) -> str:
    return registry.enrol(
        token,
        supernode_public_key_pem=pem if pem is not None else _supernode_pem(),
        identity_public_key=identity if identity is not None else _identity(1),
        authority=authority,
        now=now,
    ).device_id


def _ed25519_pem() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(
    ("pem", "identity", "match"),
    [
        ("not a key", None, "not a PEM SubjectPublicKeyInfo"),
        ("", None, "a public key PEM has"),
        (None, b"\x01" * 31, "exactly 32 bytes"),
        (None, "aa" * 32, "exactly 32 bytes"),
    ],
)
def test_enrol_refuses_malformed_keys_and_persists_nothing(
    engine: Engine,
    audit: AuditLog,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    pem: str | None,
    identity: object,
    match: str,
) -> None:
    (token,) = _tokens(engine, audit)
    events_before = len(audit.latest(100))

    with pytest.raises(ConfigError, match=match):
        _enrol(registry, authority, token, pem=pem, identity=identity)  # type: ignore[arg-type]

    assert _counts(engine) == (0, 0)
    assert len(audit.latest(100)) == events_before


@pytest.mark.parametrize("curve", ["ed25519", "secp256k1"])
def test_enrol_refuses_a_supernode_key_off_the_nist_curves(
    engine: Engine,
    audit: AuditLog,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    curve: str,
) -> None:
    (token,) = _tokens(engine, audit)
    pem = _ed25519_pem() if curve == "ed25519" else _supernode_pem(ec.SECP256K1())

    with pytest.raises(ConfigError, match="not an EC key on a NIST curve"):
        _enrol(registry, authority, token, pem=pem)
    assert _counts(engine) == (0, 0)


def test_enrol_refuses_bad_authority_or_time(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit)

    with pytest.raises(ConfigError, match="timezone-aware"):
        _enrol(registry, authority, token, now=datetime(2026, 3, 1))
    with pytest.raises(ConfigError, match="must be an EnrolmentAuthority"):
        registry.enrol(
            token,
            supernode_public_key_pem=_supernode_pem(),
            identity_public_key=_identity(1),
            authority=b"seed",  # type: ignore[arg-type]
            now=NOW,
        )
    assert _counts(engine) == (0, 0)


@pytest.mark.parametrize("token", ["fet_unknown", "nope"])
def test_enrol_with_a_bad_token_leaves_nothing(
    engine: Engine,
    audit: AuditLog,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    token: str,
) -> None:
    _tokens(engine, audit)
    events_before = len(audit.latest(100))

    with pytest.raises(EnrolmentRefused, match=f"^{INVALID_TOKEN_MESSAGE}$"):
        _enrol(registry, authority, token)

    assert _counts(engine) == (0, 0)
    assert len(audit.latest(100)) == events_before


def test_a_token_enrols_one_device_only(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit)
    _enrol(registry, authority, token, identity=_identity(1))

    with pytest.raises(EnrolmentRefused, match=f"^{INVALID_TOKEN_MESSAGE}$"):
        _enrol(registry, authority, token, identity=_identity(2))
    assert _counts(engine) == (1, 1)


def test_an_expired_token_enrols_nothing(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit)

    with pytest.raises(EnrolmentRefused, match=f"^{INVALID_TOKEN_MESSAGE}$"):
        _enrol(registry, authority, token, now=EXPIRES)
    assert _counts(engine) == (0, 0)


@pytest.mark.parametrize("reuse", ["supernode", "identity"])
def test_a_key_already_enrolled_is_refused_and_the_token_stays_unused(
    engine: Engine,
    audit: AuditLog,
    registry: DeviceRegistry,
    authority: EnrolmentAuthority,
    reuse: str,
) -> None:
    first, second = _tokens(engine, audit, 2)
    pem = _supernode_pem()
    _enrol(registry, authority, first, pem=pem, identity=_identity(1))
    events_before = len(audit.latest(100))

    with pytest.raises(EnrolmentRefused, match="already enrolled or was revoked") as caught:
        _enrol(
            registry,
            authority,
            second,
            pem=pem if reuse == "supernode" else _supernode_pem(),
            identity=_identity(1) if reuse == "identity" else _identity(2),
        )

    assert caught.value.reason is RefusalReason.KEY_TAKEN
    assert caught.value.token_id is not None
    assert _counts(engine) == (1, 1)
    assert len(audit.latest(100)) == events_before
    _enrol(registry, authority, second, identity=_identity(3))  # the token still works


def test_supernode_key_sha256_is_the_registrys_fingerprint(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit, 1)
    pem = _supernode_pem()
    _enrol(registry, authority, token, pem=pem)

    (event,) = [e for e in audit.iter() if e.kind is AuditEventKind.DEVICE_ENROLLED]
    assert supernode_key_sha256(pem) == event.payload["supernode_key_sha256"]
    with pytest.raises(ConfigError):
        supernode_key_sha256("not a key")


def test_a_revoked_key_cannot_enrol_again(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    first, second = _tokens(engine, audit, 2)
    pem = _supernode_pem()
    device_id = _enrol(registry, authority, first, pem=pem)
    registry.revoke(device_id, "stolen", now=NOW)

    with pytest.raises(EnrolmentRefused, match="already enrolled or was revoked"):
        _enrol(registry, authority, second, pem=pem, identity=_identity(9))


def test_concurrent_enrolments_with_one_token_enrol_one_device(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit)
    start = threading.Barrier(6)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(index: int) -> None:
        start.wait()
        try:
            _enrol(registry, authority, token, identity=_identity(100 + index))
            outcome = "won"
        except EnrolmentRefused:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    assert _counts(engine) == (1, 1)
    assert audit.verify().ok


def test_node_ids_bind_to_devices_and_are_looked_up(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    first, second = _tokens(engine, audit, 2)
    device_a = _enrol(registry, authority, first, identity=_identity(1))
    device_b = _enrol(registry, authority, second, identity=_identity(2))
    big = 2**64 - 5  # Flower node ids are unsigned 64-bit

    registry.set_node_id(device_a, big)
    registry.set_node_id(device_b, 7)
    unchanged = registry.set_node_id(device_b, 7)

    assert unchanged.node_id == 7
    found = registry.device_for_node(big)
    assert found is not None
    assert (found.device_id, found.node_id) == (device_a, big)
    assert registry.device_for_node(8) is None
    events = [e for e in audit.latest(10) if e.kind is AuditEventKind.DEVICE_NODE_REGISTERED]
    assert [e.payload["node_id"] for e in events] == [big, 7]
    with pytest.raises(ConfigError, match=f"already belongs to {device_a}"):
        registry.set_node_id(device_b, big)
    moved = registry.set_node_id(device_b, 9)
    assert moved.node_id == 9
    assert audit.latest(1)[0].payload["previous_node_id"] == 7


@pytest.mark.parametrize(
    ("device_id", "node_id", "match"),
    [
        ("dev-0000000000000000", 1, "no device dev-0000000000000000"),
        ("device-1", 1, "device ids look like"),
        ("dev-0000000000000000", -1, r"0\.\.2\*\*64-1"),
        ("dev-0000000000000000", 2**64, r"0\.\.2\*\*64-1"),
        ("dev-0000000000000000", True, "is an integer"),
        ("dev-0000000000000000", "1", "is an integer"),
    ],
)
def test_set_node_id_refuses_bad_input(
    registry: DeviceRegistry, device_id: str, node_id: object, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        registry.set_node_id(device_id, node_id)  # type: ignore[arg-type]


def test_revoke_marks_the_device_records_why_and_refuses_twice(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    (token,) = _tokens(engine, audit)
    device_id = _enrol(registry, authority, token)
    registry.set_node_id(device_id, 42)
    later = NOW + timedelta(hours=1)

    revoked = registry.revoke(device_id, "key leaked", now=later)

    assert (revoked.status, revoked.revoked_at, revoked.reason) == (
        DeviceStatus.REVOKED,
        later,
        "key leaked",
    )
    assert not revoked.is_active
    event = audit.latest(1)[0]
    assert event.kind is AuditEventKind.DEVICE_REVOKED
    assert event.payload == {
        "device_id": device_id,
        "node_id": 42,
        "revoked_at": "2026-03-01T13:00:00.000000+00:00",
        "reason": "key leaked",
    }
    assert registry.list(status=DeviceStatus.ENROLLED) == []
    assert [d.device_id for d in registry.list(status=DeviceStatus.REVOKED)] == [device_id]
    with pytest.raises(ConfigError, match="already revoked"):
        registry.revoke(device_id, "again", now=later)
    with pytest.raises(ConfigError, match="is revoked"):
        registry.set_node_id(device_id, 43)
    assert len([e for e in audit.latest(20) if e.kind is AuditEventKind.DEVICE_REVOKED]) == 1


@pytest.mark.parametrize(
    ("device_id", "reason", "now", "match"),
    [
        ("dev-0000000000000000", "lost", NOW, "no device"),
        ("bad", "lost", NOW, "device ids look like"),
        ("dev-0000000000000000", "", NOW, "reason has 1..500"),
        ("dev-0000000000000000", "   ", NOW, "reason has 1..500"),
        ("dev-0000000000000000", "x" * 501, NOW, "reason has 1..500"),
        ("dev-0000000000000000", "lost", datetime(2026, 3, 1), "timezone-aware"),
    ],
)
def test_revoke_refuses_bad_input(
    registry: DeviceRegistry, device_id: str, reason: str, now: datetime, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        registry.revoke(device_id, reason, now=now)


def test_list_returns_devices_in_enrolment_order(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    tokens = _tokens(engine, audit, 3)
    ids = [
        _enrol(registry, authority, token, identity=_identity(i), now=NOW + timedelta(minutes=i))
        for i, token in enumerate(tokens)
    ]

    assert [device.device_id for device in registry.list()] == ids
    with pytest.raises(ConfigError, match="must be a DeviceStatus"):
        registry.list(status="enrolled")  # type: ignore[arg-type]


def test_lookups_refuse_malformed_ids(registry: DeviceRegistry) -> None:
    assert registry.device("dev-0000000000000000") is None
    with pytest.raises(ConfigError, match="device ids look like"):
        registry.device("DEV-0000000000000000")
    with pytest.raises(ConfigError, match=r"0\.\.2\*\*64-1"):
        registry.device_for_node(-1)


def test_the_revocation_list_grows_with_each_revocation(
    engine: Engine, audit: AuditLog, registry: DeviceRegistry, authority: EnrolmentAuthority
) -> None:
    first, second = _tokens(engine, audit, 2)
    device_a = _enrol(registry, authority, first, identity=_identity(1))
    device_b = _enrol(registry, authority, second, identity=_identity(2))

    empty = verify_revocation_list(
        registry.revocation_list(authority, now=NOW), authority.public_key, now=NOW
    )
    registry.revoke(device_a, "lost", now=NOW)
    one_data = registry.revocation_list(authority, now=NOW)
    registry.revoke(device_b, "stolen", now=NOW)
    two = verify_revocation_list(
        registry.revocation_list(authority, now=NOW), authority.public_key, now=NOW
    )

    assert (empty.sequence, empty.device_ids) == (0, frozenset())
    assert (two.sequence, two.device_ids) == (2, frozenset({device_a, device_b}))
    with pytest.raises(CryptoError, match="cryptographic verification failed"):
        verify_revocation_list(one_data, authority.public_key, now=NOW, min_sequence=2)
    with pytest.raises(ConfigError, match="timezone-aware"):
        registry.revocation_list(authority, now=datetime(2026, 3, 1))


def test_the_registry_needs_its_own_databases_audit_log(engine: Engine, tmp_path: object) -> None:
    from fl_server.db import open_database

    other = open_database(f"sqlite:///{tmp_path}/other.db")
    try:
        with pytest.raises(ConfigError, match="must live in the registry's database"):
            DeviceRegistry(engine, AuditLog(other))
    finally:
        other.dispose()
