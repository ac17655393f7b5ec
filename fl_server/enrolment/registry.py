"""The device registry: who is enrolled, with which keys, on which Flower node; revocation.

One identity names a device everywhere: the server assigns ``dev-<16 hex>``
at enrolment and the enrolment authority certifies the device's own Ed25519
identity key under that id; the same id names its SuperNode key, its Flower
node id once registered, its ledgers and its audit events.

Notes
-----
Each change (enrolment, node registration, revocation) and its audit event
commit in one transaction: either both are stored or neither is. Enrolment
also spends the token in that transaction, so a refused enrolment (a bad key,
a key already enrolled, a database error) leaves the token usable, no device
row and no audit event here. Refusals are audited by the caller that knows who
asked (the gateway, through :class:`fl_server.enrolment.refusals.RefusalRecorder`,
which bounds how fast an unauthenticated caller can grow the chain); the
exception carries the server-side reason for it.

A revoked key never enrols again, since a revoked device is presumed
compromised. Revocation is permanent, so the number of revoked devices only
grows and serves as the revocation list's sequence number (see
:mod:`fl_server.pki`).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, Select, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, StorageError
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.db.schema import DeviceRow
from fl_server.enrolment._db import check_now, in_transaction, stored_time
from fl_server.enrolment.tokens import EnrolmentRefused, RefusalReason, redeem
from fl_server.pki import (
    RevokedDevice,
    build_revocation_list,
    load_nist_public_key_pem,
    public_key_to_pem,
)
from secure_agg.crypto import KEY_BYTES
from secure_agg.identity import EnrolmentAuthority, IdentityCertificate

__all__ = [
    "CERTIFICATE_DAYS",
    "Device",
    "DeviceRegistry",
    "DeviceStatus",
    "Enrolment",
    "supernode_key_sha256",
]

logger = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r"^dev-[0-9a-f]{16}$")
_DEVICE_ID_BYTES = 8
CERTIFICATE_DAYS = 365
_NODE_ID_LIMIT = 2**64  # Flower node ids are unsigned 64-bit integers
_MAX_REASON = 500


class DeviceStatus(Enum):
    """Whether a device may take part in rounds. Values are stored in the database."""

    ENROLLED = "enrolled"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One row of the registry."""

    device_id: str
    supernode_public_key_pem: str
    identity_public_key: bytes
    node_id: int | None
    enrolled_at: datetime
    token_id: int
    status: DeviceStatus
    revoked_at: datetime | None
    reason: str | None

    @property
    def is_active(self) -> bool:
        """Whether the device is enrolled and not revoked."""
        return self.status is DeviceStatus.ENROLLED


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrolment:
    """What an enrolled device is given back: its id and its identity certificate."""

    device_id: str
    certificate: IdentityCertificate
    enrolled_at: datetime


def _fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def supernode_key_sha256(pem: str) -> str:
    """Return the SHA-256 (hex) of a SuperNode key's DER SubjectPublicKeyInfo.

    This is how the registry and its audit events name a SuperNode key.

    Raises
    ------
    ConfigError
        If ``pem`` is not a PEM EC public key on a NIST curve.
    """
    return _fingerprint(load_nist_public_key_pem(pem))


def _to_stored_node_id(node_id: int) -> int:
    # BIGINT is signed: store an unsigned 64-bit id as its two's-complement value,
    # the mapping Flower's own SQLite link state uses.
    return node_id - _NODE_ID_LIMIT if node_id >= _NODE_ID_LIMIT // 2 else node_id


def _from_stored_node_id(stored: int) -> int:
    return stored + _NODE_ID_LIMIT if stored < 0 else stored


def _check_node_id(node_id: int) -> int:
    if isinstance(node_id, bool) or not isinstance(node_id, int):
        raise ConfigError(f"a Flower node id is an integer, got {node_id!r}")
    if not 0 <= node_id < _NODE_ID_LIMIT:
        raise ConfigError(f"a Flower node id is 0..2**64-1, got {node_id}")
    return _to_stored_node_id(node_id)


def _check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise ConfigError(f"device ids look like dev-<16 hex digits>, got {device_id!r}")
    return device_id


def _to_device(row: DeviceRow) -> Device:
    return Device(
        device_id=row.device_id,
        supernode_public_key_pem=row.supernode_public_key,
        identity_public_key=bytes.fromhex(row.identity_public_key),
        node_id=None if row.node_id is None else _from_stored_node_id(row.node_id),
        enrolled_at=datetime.fromisoformat(row.enrolled_at),
        token_id=row.token_id,
        status=DeviceStatus(row.status),
        revoked_at=None if row.revoked_at is None else datetime.fromisoformat(row.revoked_at),
        reason=row.reason,
    )


class DeviceRegistry:
    """Enrol, look up and revoke devices in the deployment's database.

    Parameters
    ----------
    engine
        The deployment's database (migrated by ``open_database``).
    audit
        The audit log of ``engine``: every change is recorded there, in the
        change's own transaction.
    """

    def __init__(self, engine: Engine, audit: AuditLog) -> None:
        if audit.engine is not engine:
            raise ConfigError("the registry's audit log must live in the registry's database")
        self._engine = engine
        self._audit = audit

    def enrol(
        self,
        token: str,
        *,
        supernode_public_key_pem: str,
        identity_public_key: bytes,
        authority: EnrolmentAuthority,
        now: datetime,
        certificate_days: int = CERTIFICATE_DAYS,
    ) -> Enrolment:
        """Spend ``token`` to enrol a device with the keys it generated itself.

        Parameters
        ----------
        token
            A one-time enrolment token from :func:`create_tokens`.
        supernode_public_key_pem
            The device's Flower SuperNode authentication key: a PEM
            SubjectPublicKeyInfo EC key on a NIST curve.
        identity_public_key
            The device's raw 32-byte Ed25519 secure-aggregation identity key.
        authority
            The enrolment authority that certifies the identity key.
        now
            The enrolment time (timezone-aware).
        certificate_days
            How long the identity certificate is valid (1..3650 days); devices
            refuse it afterwards on their own clocks.

        Returns
        -------
        Enrolment
            The new device id and its identity certificate.

        Raises
        ------
        ConfigError
            If a key is malformed (checked before the token is looked at).
        EnrolmentRefused
            If the token is invalid, expired or used (one opaque message), or
            either key is already enrolled or was revoked.
        StorageError
            If the database refuses the transaction.
        """
        moment = check_now(now)
        supernode_key = load_nist_public_key_pem(supernode_public_key_pem)
        supernode_pem = public_key_to_pem(supernode_key)
        fingerprint = _fingerprint(supernode_key)
        if not isinstance(identity_public_key, bytes) or len(identity_public_key) != KEY_BYTES:
            raise ConfigError(f"an identity public key has exactly {KEY_BYTES} bytes")
        if not isinstance(authority, EnrolmentAuthority):
            raise ConfigError("authority must be an EnrolmentAuthority")
        identity_hex = identity_public_key.hex()
        if not 1 <= certificate_days <= 3650:
            raise ConfigError(f"certificate_days must be in [1, 3650], got {certificate_days}")
        expires_at = int((moment + timedelta(days=certificate_days)).timestamp())

        def work(session: Session) -> Enrolment:
            # The token first: without a valid one nothing else is looked up.
            token_id = redeem(session, token, now=moment)
            taken = session.scalar(
                select(func.count())
                .select_from(DeviceRow)
                .where(
                    or_(
                        DeviceRow.supernode_key_sha256 == fingerprint,
                        DeviceRow.identity_public_key == identity_hex,
                    )
                )
            )
            if taken:
                raise EnrolmentRefused(
                    "a key of this device is already enrolled or was revoked",
                    reason=RefusalReason.KEY_TAKEN,
                    token_id=token_id,
                )
            device_id = "dev-" + secrets.token_hex(_DEVICE_ID_BYTES)
            certificate = authority.certify(device_id, identity_public_key, expires_at=expires_at)
            session.add(
                DeviceRow(
                    device_id=device_id,
                    supernode_public_key=supernode_pem,
                    supernode_key_sha256=fingerprint,
                    identity_public_key=identity_hex,
                    node_id=None,
                    enrolled_at=stored_time(moment),
                    token_id=token_id,
                    status=DeviceStatus.ENROLLED.value,
                    revoked_at=None,
                    reason=None,
                )
            )
            session.flush()
            self._audit.append_in(
                session,
                AuditEventKind.DEVICE_ENROLLED,
                {
                    "device_id": device_id,
                    "token_id": token_id,
                    "supernode_key_sha256": fingerprint,
                    "identity_public_key": identity_hex,
                    "enrolled_at": stored_time(moment),
                },
            )
            return Enrolment(device_id=device_id, certificate=certificate, enrolled_at=moment)

        try:
            enrolment = in_transaction(self._engine, work, what="enrol a device")
        except EnrolmentRefused as exc:
            logger.warning("enrolment refused: %s", exc)
            raise
        logger.info("enrolment: enrolled %s", enrolment.device_id)
        return enrolment

    def set_node_id(self, device_id: str, node_id: int) -> Device:
        """Record the Flower node id the SuperLink gave an enrolled device.

        Setting the id a device already has changes nothing and records nothing.

        Raises
        ------
        ConfigError
            If the device id or node id is malformed, the device is unknown or
            revoked, or another device holds the node id.
        StorageError
            If the database refuses the transaction.
        """
        _check_device_id(device_id)
        stored = _check_node_id(node_id)

        def work(session: Session) -> Device:
            row = session.get(DeviceRow, device_id, with_for_update=True)
            if row is None:
                raise ConfigError(f"no device {device_id}")
            if row.status != DeviceStatus.ENROLLED.value:
                raise ConfigError(f"device {device_id} is revoked")
            if row.node_id == stored:
                return _to_device(row)
            holder = session.scalar(select(DeviceRow.device_id).where(DeviceRow.node_id == stored))
            if holder is not None:
                raise ConfigError(f"Flower node {node_id} already belongs to {holder}")
            previous = None if row.node_id is None else _from_stored_node_id(row.node_id)
            row.node_id = stored
            session.flush()
            self._audit.append_in(
                session,
                AuditEventKind.DEVICE_NODE_REGISTERED,
                {"device_id": device_id, "node_id": node_id, "previous_node_id": previous},
            )
            return _to_device(row)

        return in_transaction(self._engine, work, what="set a device's node id")

    def device(self, device_id: str) -> Device | None:
        """Return the device ``device_id``, or ``None`` if there is none.

        Raises
        ------
        ConfigError
            If ``device_id`` is malformed.
        StorageError
            If the database cannot be read.
        """
        _check_device_id(device_id)
        return self._one(select(DeviceRow).where(DeviceRow.device_id == device_id))

    def device_for_node(self, node_id: int) -> Device | None:
        """Return the device registered as Flower node ``node_id`` (revoked ones included).

        Raises
        ------
        ConfigError
            If ``node_id`` is not an unsigned 64-bit integer.
        StorageError
            If the database cannot be read.
        """
        stored = _check_node_id(node_id)
        return self._one(select(DeviceRow).where(DeviceRow.node_id == stored))

    def list(self, *, status: DeviceStatus | None = None) -> builtins.list[Device]:
        """Return every device (only those with ``status`` when given), in enrolment order.

        Raises
        ------
        ConfigError
            If ``status`` is not a :class:`DeviceStatus`.
        StorageError
            If the database cannot be read.
        """
        if status is not None and not isinstance(status, DeviceStatus):
            raise ConfigError(f"status must be a DeviceStatus, got {status!r}")
        query = select(DeviceRow).order_by(DeviceRow.enrolled_at, DeviceRow.device_id)
        if status is not None:
            query = query.where(DeviceRow.status == status.value)
        try:
            with Session(self._engine) as session:
                return [_to_device(row) for row in session.execute(query).scalars()]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the device registry: {type(exc).__name__}") from exc

    def revoke(self, device_id: str, reason: str, *, now: datetime) -> Device:
        """Revoke ``device_id`` for good and record why.

        Raises
        ------
        ConfigError
            If the device id or reason is malformed, the device is unknown or
            already revoked.
        StorageError
            If the database refuses the transaction.
        """
        _check_device_id(device_id)
        if not isinstance(reason, str) or not 0 < len(reason.strip()) <= _MAX_REASON:
            raise ConfigError(f"a revocation reason has 1..{_MAX_REASON} characters")
        moment = stored_time(now)

        def work(session: Session) -> Device:
            # Conditional update: of two concurrent revocations exactly one applies.
            changed = session.execute(
                update(DeviceRow)
                .where(
                    DeviceRow.device_id == device_id,
                    DeviceRow.status == DeviceStatus.ENROLLED.value,
                )
                .values(status=DeviceStatus.REVOKED.value, revoked_at=moment, reason=reason)
                .returning(DeviceRow.device_id)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            row = session.get(DeviceRow, device_id, populate_existing=True)
            if row is None:
                raise ConfigError(f"no device {device_id}")
            if changed is None:
                raise ConfigError(f"device {device_id} is already revoked")
            device = _to_device(row)
            self._audit.append_in(
                session,
                AuditEventKind.DEVICE_REVOKED,
                {
                    "device_id": device_id,
                    "node_id": device.node_id,
                    "revoked_at": moment,
                    "reason": reason,
                },
            )
            return device

        device = in_transaction(self._engine, work, what="revoke a device")
        logger.info("enrolment: revoked %s", device_id)
        return device

    def revocation_list(self, authority: EnrolmentAuthority, *, now: datetime) -> bytes:
        """Return the revocation list of every revoked device, signed by ``authority``.

        Its sequence number is the number of revoked devices (see the module notes).

        Raises
        ------
        ConfigError
            If ``now`` is naive.
        StorageError
            If the database cannot be read.
        """
        check_now(now)
        query = select(DeviceRow.device_id, DeviceRow.revoked_at).where(
            DeviceRow.status == DeviceStatus.REVOKED.value
        )
        try:
            with Session(self._engine) as session:
                rows = session.execute(query).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the device registry: {type(exc).__name__}") from exc
        revoked = [
            RevokedDevice(device_id=device_id, revoked_at=datetime.fromisoformat(revoked_at))
            for device_id, revoked_at in rows
            if revoked_at is not None
        ]
        return build_revocation_list(authority, revoked, sequence=len(revoked), now=now)

    def _one(self, query: Select[DeviceRow]) -> Device | None:
        try:
            with Session(self._engine) as session:
                row = session.execute(query).scalar_one_or_none()
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the device registry: {type(exc).__name__}") from exc
        return None if row is None else _to_device(row)
