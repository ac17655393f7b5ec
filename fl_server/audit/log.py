"""An append-only, hash-chained audit log stored through SQLAlchemy.

Each record carries the SHA-256 of its own canonical content and of its
predecessor's; a head row names the newest record. Editing, deleting, inserting
or reordering any record, the newest included, breaks the chain where
:meth:`AuditLog.verify` can name it.

Notes
-----
Threat model: the chain makes tampering *evident* to anyone who re-verifies it;
it does not stop a party with write access to the database from rewriting the
whole chain consistently. Anchoring the head hash outside the database (a signed
report, a transparency log) is what closes that gap; compliance reports carry
the head hash for this reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, Select, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, StorageError
from fl_server.audit.events import (
    GENESIS_HASH,
    AuditEvent,
    AuditEventKind,
    JSONValue,
    canonical_json,
    parse_canonical,
    record_hash,
)
from fl_server.db.schema import AuditHeadRow, AuditRecordRow

__all__ = ["AuditLog", "VerifyReport"]

_HEAD_ID = 1
_MAX_APPEND_ATTEMPTS = 20
_MAX_RUN_ID_LEN = 64


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of :meth:`AuditLog.verify`.

    ``first_bad_seq`` is the sequence number of the first record that fails (or
    where a missing record should be); ``None`` when the chain verifies.
    """

    ok: bool
    records_checked: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str = ""


class AuditLog:
    """Append to, read and verify the audit chain of one database.

    Parameters
    ----------
    engine
        An engine whose schema :func:`fl_server.db.open_database` has migrated.
    clock
        Returns the current time (timezone-aware); injected so tests control time.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._engine = engine
        self._clock = clock

    @property
    def engine(self) -> Engine:
        """The database this log lives in."""
        return self._engine

    def append(
        self,
        kind: AuditEventKind,
        payload: Mapping[str, JSONValue],
        *,
        run_id: str | None = None,
    ) -> AuditEvent:
        """Append one event in its own transaction and return it as stored.

        Concurrent appenders (threads or processes) are serialised by the head
        row: on PostgreSQL by ``SELECT ... FOR UPDATE``, on SQLite by its writer
        lock; a writer that loses a race retries.

        Raises
        ------
        ConfigError
            If ``kind`` is not an :class:`AuditEventKind`, the payload is not JSON
            or the run id is too long.
        StorageError
            If the database refuses the write.
        """
        last_error: Exception | None = None
        for attempt in range(_MAX_APPEND_ATTEMPTS):
            try:
                with Session(self._engine) as session, session.begin():
                    return self.append_in(session, kind, payload, run_id=run_id)
            except (IntegrityError, OperationalError) as exc:
                # Lost a race for the head row (or SQLite was busy): retry on a
                # fresh transaction, backing off a little more each time.
                last_error = exc
                time.sleep(0.005 * (attempt + 1))
            except SQLAlchemyError as exc:
                raise StorageError(f"cannot append to the audit log: {exc}") from exc
        raise StorageError(f"cannot append to the audit log: {last_error}")

    def append_in(
        self,
        session: Session,
        kind: AuditEventKind,
        payload: Mapping[str, JSONValue],
        *,
        run_id: str | None = None,
    ) -> AuditEvent:
        """Append one event inside the caller's open transaction on this log's database.

        The event commits or rolls back with the caller's other writes, so a
        state change and its audit record are never separated by a crash. The
        caller retries the whole transaction on ``IntegrityError`` or
        ``OperationalError`` (a lost race for the head row).

        Raises
        ------
        ConfigError
            As :meth:`append`, or if ``session`` is bound to another database.
        """
        if not isinstance(kind, AuditEventKind):
            raise ConfigError(f"audit kind must be an AuditEventKind, got {kind!r}")
        if run_id is not None and not 0 < len(run_id) <= _MAX_RUN_ID_LEN:
            raise ConfigError(f"run_id must have 1..{_MAX_RUN_ID_LEN} characters")
        if session.get_bind().engine is not self._engine:
            raise ConfigError("append_in needs a session on the audit log's own database")
        payload_json = canonical_json(dict(payload))
        moment = self._clock()
        if moment.tzinfo is None:
            raise ConfigError("the audit clock must return timezone-aware datetimes")
        recorded_at = moment.astimezone(UTC).isoformat(timespec="microseconds")
        head = session.execute(
            select(AuditHeadRow).where(AuditHeadRow.id == _HEAD_ID).with_for_update()
        ).scalar_one()
        seq = head.seq + 1
        prev_hash = head.record_hash
        digest = record_hash(
            seq=seq,
            recorded_at=recorded_at,
            kind=kind.value,
            run_id=run_id,
            payload_json=payload_json,
            prev_hash=prev_hash,
        )
        session.add(
            AuditRecordRow(
                seq=seq,
                recorded_at=recorded_at,
                kind=kind.value,
                run_id=run_id,
                payload=payload_json,
                prev_hash=prev_hash,
                record_hash=digest,
            )
        )
        head.seq = seq
        head.record_hash = digest
        session.flush()
        return AuditEvent(
            seq=seq,
            recorded_at=datetime.fromisoformat(recorded_at),
            kind=kind,
            run_id=run_id,
            payload=json.loads(payload_json),
            prev_hash=prev_hash,
            record_hash=digest,
        )

    def iter(self, *, run_id: str | None = None, batch_size: int = 500) -> Iterator[AuditEvent]:
        """Yield events in sequence order, only those of ``run_id`` when given.

        Raises
        ------
        StorageError
            If the database cannot be read or holds a record of an unknown kind.
        """
        last_seq = 0
        while True:
            query = select(AuditRecordRow).where(AuditRecordRow.seq > last_seq)
            if run_id is not None:
                query = query.where(AuditRecordRow.run_id == run_id)
            rows = self._fetch(query.order_by(AuditRecordRow.seq).limit(batch_size))
            for row in rows:
                yield _to_event(row)
            if len(rows) < batch_size:
                return
            last_seq = rows[-1].seq

    def latest(self, count: int, *, run_id: str | None = None) -> list[AuditEvent]:
        """Return the newest ``count`` events (of ``run_id`` when given), oldest first.

        Raises
        ------
        ConfigError
            If ``count`` is not positive.
        StorageError
            If the database cannot be read.
        """
        if count < 1:
            raise ConfigError(f"count must be >= 1, got {count}")
        query = select(AuditRecordRow)
        if run_id is not None:
            query = query.where(AuditRecordRow.run_id == run_id)
        rows = self._fetch(query.order_by(AuditRecordRow.seq.desc()).limit(count))
        return [_to_event(row) for row in reversed(rows)]

    def _fetch(self, query: Select[AuditRecordRow]) -> list[AuditRecordRow]:
        try:
            with Session(self._engine) as session:
                return list(session.execute(query).scalars())
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the audit log: {exc}") from exc

    def verify(self) -> VerifyReport:
        """Re-hash the whole chain and check every link and the head.

        Returns
        -------
        VerifyReport
            ``ok`` and the head hash, or the first bad record and why.
        """
        expected_seq = 1
        prev_hash = GENESIS_HASH
        checked = 0
        try:
            with Session(self._engine) as session:
                head = session.get(AuditHeadRow, _HEAD_ID)
                rows = session.execute(
                    select(AuditRecordRow).order_by(AuditRecordRow.seq)
                ).scalars()
                for row in rows:
                    problem = _check_row(row, expected_seq, prev_hash)
                    if problem:
                        return VerifyReport(
                            ok=False,
                            records_checked=checked,
                            head_hash=prev_hash,
                            first_bad_seq=min(expected_seq, row.seq),
                            reason=problem,
                        )
                    checked += 1
                    prev_hash = row.record_hash
                    expected_seq += 1
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the audit log: {exc}") from exc
        if head is None:
            return VerifyReport(
                ok=False,
                records_checked=checked,
                head_hash=prev_hash,
                first_bad_seq=expected_seq,
                reason="the head row is missing",
            )
        if head.seq != checked or head.record_hash != prev_hash:
            return VerifyReport(
                ok=False,
                records_checked=checked,
                head_hash=prev_hash,
                first_bad_seq=expected_seq,
                reason=(
                    f"the head names record {head.seq} but the chain ends at record {checked}: "
                    "records were removed from the end"
                    if head.seq > checked
                    else f"the head (record {head.seq}) does not match the chain's last record"
                ),
            )
        return VerifyReport(ok=True, records_checked=checked, head_hash=prev_hash)


def _check_row(row: AuditRecordRow, expected_seq: int, prev_hash: str) -> str:
    if row.seq != expected_seq:
        return f"record {expected_seq} is missing (found record {row.seq} in its place)"
    if row.prev_hash != prev_hash:
        return f"record {row.seq} does not link to its predecessor (inserted, removed or reordered)"
    try:
        digest = record_hash(
            seq=row.seq,
            recorded_at=row.recorded_at,
            kind=row.kind,
            run_id=row.run_id,
            payload_json=row.payload,
            prev_hash=row.prev_hash,
        )
    except ConfigError as exc:
        return f"record {row.seq} holds a payload that is not canonical JSON ({exc})"
    if digest != row.record_hash:
        return f"record {row.seq} was modified: its content does not match its hash"
    return ""


def _to_event(row: AuditRecordRow) -> AuditEvent:
    try:
        kind = AuditEventKind(row.kind)
    except ValueError as exc:
        raise StorageError(
            f"audit record {row.seq} has unknown kind {row.kind!r} (written by a newer fedge?)"
        ) from exc
    try:
        payload = parse_canonical(row.payload)
    except ConfigError as exc:
        raise StorageError(f"audit record {row.seq} holds a damaged payload: {exc}") from exc
    if not isinstance(payload, dict):
        raise StorageError(f"audit record {row.seq} holds a payload that is not a JSON object")
    return AuditEvent(
        seq=row.seq,
        recorded_at=datetime.fromisoformat(row.recorded_at),
        kind=kind,
        run_id=row.run_id,
        payload=payload,
        prev_hash=row.prev_hash,
        record_hash=row.record_hash,
    )
