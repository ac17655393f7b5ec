"""Walk the audit chain record by record, checking each link and hash as it goes.

One walker serves the full verification (:mod:`fl_server.audit.verify`, which
collects every problem) and the incremental one the budget check uses
(:class:`fl_server.ledger_binding.VerifiedSpends`, which stops at the first).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, StorageError
from fl_server.audit.events import GENESIS_HASH, parse_canonical, record_hash
from fl_server.db.schema import AuditHeadRow, AuditRecordRow

__all__ = ["ChainPosition", "ChainWalker", "CheckedRow", "read_head"]

_BATCH = 500


@dataclass(frozen=True, slots=True)
class ChainPosition:
    """A point of the chain: record ``seq`` (0 before the first) and its hash."""

    seq: int = 0
    record_hash: str = GENESIS_HASH


@dataclass(frozen=True, slots=True)
class CheckedRow:
    """One stored record, its parsed payload (``None`` if damaged) and its problem, if any."""

    seq: int
    kind: str
    run_id: str | None
    recorded_at: str
    record_hash: str
    payload: dict[str, object] | None
    problem: str
    problem_seq: int
    """Where the problem is: the record itself, or the missing record before it."""


@dataclass(frozen=True, slots=True)
class ContentCheck:
    """A stored record checked on its own (its link to the predecessor is the caller's)."""

    payload: object
    """The parsed payload, or the stored text when it is not canonical JSON."""
    json_error: str | None = None
    hash_ok: bool = True

    @property
    def problem(self) -> str | None:
        """What is wrong, phrased for a listing; ``None`` when intact."""
        if self.json_error is not None:
            return f"its payload is not canonical JSON ({self.json_error})"
        return None if self.hash_ok else "its content does not match its hash"


def check_content(row: AuditRecordRow) -> ContentCheck:
    """Parse a record's payload strictly and re-hash its content."""
    try:
        payload = parse_canonical(row.payload)
        digest = record_hash(
            seq=row.seq,
            recorded_at=row.recorded_at,
            kind=row.kind,
            run_id=row.run_id,
            payload_json=row.payload,
            prev_hash=row.prev_hash,
        )
    except ConfigError as exc:
        return ContentCheck(row.payload, json_error=str(exc))
    return ContentCheck(payload, hash_ok=digest == row.record_hash)


def _problem(row: AuditRecordRow, expected_seq: int, prev_hash: str) -> tuple[str, object]:
    if row.seq != expected_seq:
        return f"record {expected_seq} is missing (found record {row.seq} in its place)", None
    if row.prev_hash != prev_hash:
        return (
            f"record {row.seq} does not link to its predecessor (inserted, removed or reordered)",
            None,
        )
    checked = check_content(row)
    if checked.json_error is not None:
        return (
            f"record {row.seq} holds a payload that is not canonical JSON ({checked.json_error})",
            None,
        )
    if not checked.hash_ok:
        return f"record {row.seq} was modified: its content does not match its hash", None
    return "", checked.payload


class ChainWalker:
    """Yield the records after ``start``, each checked against the previous one.

    After a damaged record the walker keeps going from the record as stored,
    so a listing can show everything; ``position`` is the last record that
    checked out only while no problem has been found.
    """

    def __init__(self, engine: Engine, start: ChainPosition | None = None) -> None:
        self._engine = engine
        self.position = start or ChainPosition()
        self.damaged = False

    def walk(self, upto: int | None = None) -> Iterator[CheckedRow]:
        """Yield every record after the start position (up to record ``upto``) in order.

        A reader of a live database passes the head it read first as ``upto``:
        records appended while it walks belong to the next walk.

        Raises
        ------
        StorageError
            If the database cannot be read.
        """
        expected_seq = self.position.seq + 1
        prev_hash = self.position.record_hash
        last_seq = self.position.seq
        while True:
            query = select(AuditRecordRow).where(AuditRecordRow.seq > last_seq)
            if upto is not None:
                query = query.where(AuditRecordRow.seq <= upto)
            query = query.order_by(AuditRecordRow.seq).limit(_BATCH)
            try:
                with Session(self._engine) as session:
                    rows = list(session.scalars(query))
            except SQLAlchemyError as exc:
                raise StorageError(f"cannot read the audit log: {exc}") from exc
            for row in rows:
                problem, payload = _problem(row, expected_seq, prev_hash)
                if not problem and not isinstance(payload, dict):
                    problem = f"record {row.seq} holds a payload that is not a JSON object"
                if problem:
                    self.damaged = True
                elif not self.damaged:
                    self.position = ChainPosition(row.seq, row.record_hash)
                yield CheckedRow(
                    seq=row.seq,
                    kind=row.kind,
                    run_id=row.run_id,
                    recorded_at=row.recorded_at,
                    record_hash=row.record_hash,
                    payload=payload if isinstance(payload, dict) and not problem else None,
                    problem=problem,
                    problem_seq=min(row.seq, expected_seq),
                )
                # Continue from the record as stored: one bad record is named once.
                expected_seq, prev_hash = row.seq + 1, row.record_hash
            if len(rows) < _BATCH:
                return
            last_seq = rows[-1].seq


def records_after(engine: Engine, seq: int) -> bool:
    """Return whether any record lies after record ``seq``.

    Raises
    ------
    StorageError
        If the database cannot be read.
    """
    query = select(AuditRecordRow.seq).where(AuditRecordRow.seq > seq).limit(1)
    try:
        with Session(engine) as session:
            return session.scalars(query).first() is not None
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the audit log: {exc}") from exc


def read_head(engine: Engine) -> ChainPosition | None:
    """Return what the head row names, or ``None`` if it is missing.

    Raises
    ------
    StorageError
        If the database cannot be read.
    """
    try:
        with Session(engine) as session:
            head = session.get(AuditHeadRow, 1)
            return None if head is None else ChainPosition(head.seq, head.record_hash)
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the audit log: {exc}") from exc
