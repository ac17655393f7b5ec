"""SQLAlchemy 2 table definitions of the fedge cloud database.

The tables are created and upgraded by the Alembic migrations beside this
module, never by ``metadata.create_all``: the migrations are the schema's
history and the only way it changes.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["AuditHeadRow", "AuditRecordRow", "Base", "LedgerRow"]

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
    kind: Mapped[str] = mapped_column(String(64))
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


class LedgerRow(Base):
    """What one round of a run spent for one subject ("run" or a client), and the total."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (UniqueConstraint("run_id", "subject", "server_round"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(128))
    server_round: Mapped[int] = mapped_column(Integer)
    mechanism: Mapped[str] = mapped_column(String(32))
    rho: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int | None] = mapped_column(Integer)
    delta: Mapped[float] = mapped_column(Float)
    epsilon: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[str] = mapped_column(String(40))
