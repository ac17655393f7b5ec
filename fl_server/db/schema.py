"""SQLAlchemy 2 table definitions of the fedge cloud database.

The tables are created and upgraded by the Alembic migrations beside this
module, never by ``metadata.create_all``: the migrations are the schema's
history and the only way it changes.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AliasRow",
    "ArtefactRow",
    "AuditCheckpointRow",
    "AuditHeadRow",
    "AuditRecordRow",
    "Base",
    "DeviceEventRow",
    "DeviceRow",
    "EnrolmentTokenRow",
    "LedgerRow",
    "ModelVersionRow",
    "ReleaseDirectiveRow",
    "RolloutRow",
]

_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so migrations name constraints."""

    metadata = MetaData(naming_convention=_NAMING)


class AuditRecordRow(Base):
    """One audit event, chained to its predecessor by ``prev_hash``."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    recorded_at: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHeadRow(Base):
    """The single row naming the newest audit record, so a deleted tail is detected."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    record_hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpointRow(Base):
    """A signed checkpoint of the chain's head (also kept in anchors outside the database)."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    seq: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(String(32))
    public_key: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


class LedgerRow(Base):
    """What one round of a run spent for one subject ("run" or a client), and the total."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (UniqueConstraint("run_id", "subject", "server_round"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(128), index=True)
    server_round: Mapped[int] = mapped_column(Integer)
    mechanism: Mapped[str] = mapped_column(String(32))
    rho: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int | None] = mapped_column(Integer)
    delta: Mapped[float] = mapped_column(Float)
    epsilon: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[str] = mapped_column(String(40))


class ModelVersionRow(Base):
    """One immutable version of a global model: its signed manifest and searchable metadata."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    server_round: Mapped[int | None] = mapped_column(Integer)
    dp_epsilon: Mapped[float | None] = mapped_column(Float)
    dp_delta: Mapped[float | None] = mapped_column(Float)
    participants: Mapped[int | None] = mapped_column(Integer)
    code_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(40))
    manifest: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(16))


class ArtefactRow(Base):
    """One artefact of a version (weights, an ONNX variant): its digest and measured quality."""

    __tablename__ = "model_artefacts"
    __table_args__ = (UniqueConstraint("version_id", "name"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    version_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("model_versions.id", ondelete="CASCADE"),
        index=True,
    )
    name: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(8))
    precision: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    quality: Mapped[str] = mapped_column(Text)


class AliasRow(Base):
    """A movable name (``production``, ``canary``, ...) for one version of a model."""

    __tablename__ = "model_aliases"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[str] = mapped_column(String(40))


class EnrolmentTokenRow(Base):
    """A one-time enrolment token: only its SHA-256 is stored, never the token."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[str] = mapped_column(String(40))
    used_at: Mapped[str | None] = mapped_column(String(40))
    created_by: Mapped[str | None] = mapped_column(String(128))


class DeviceRow(Base):
    """An enrolled (or revoked) device: its keys, its Flower node and how it enrolled."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    supernode_public_key: Mapped[str] = mapped_column(Text)
    supernode_key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    identity_public_key: Mapped[str] = mapped_column(String(64), unique=True)
    node_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    enrolled_at: Mapped[str] = mapped_column(String(40))
    token_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("enrolment_tokens.id"),
        unique=True,
    )
    status: Mapped[str] = mapped_column(String(16), index=True)
    revoked_at: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(Text)


class DeviceEventRow(Base):
    """One signed event a device published over MQTT, stored once per (device, seq)."""

    __tablename__ = "device_events"
    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    device_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    event_time: Mapped[float] = mapped_column(Float)
    received_at: Mapped[str] = mapped_column(String(40), index=True)
    body: Mapped[str] = mapped_column(Text)
    certificate: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))


class RolloutRow(Base):
    """A canary rollout of one model version: its plan and where its state machine is."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer)
    plan: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[int] = mapped_column(Integer)
    stage_started_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(Text)


class ReleaseDirectiveRow(Base):
    """A signed release directive; the newest of a model is what its devices should run."""

    __tablename__ = "release_directives"
    __table_args__ = (UniqueConstraint("model", "sequence"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    model: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(BigInteger)
    rollout_id: Mapped[str] = mapped_column(String(64), index=True)
    document: Mapped[str] = mapped_column(Text)
    issued_at: Mapped[str] = mapped_column(String(40))
