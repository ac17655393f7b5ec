"""SQLAlchemy 2 table definitions of the fedge cloud database.

The tables are created and upgraded by the Alembic migrations beside this
module, never by ``metadata.create_all``: the migrations are the schema's
history and the only way it changes.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["AuditHeadRow", "AuditRecordRow", "Base"]

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
