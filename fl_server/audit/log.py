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
from fl_server.audit.chain import ChainWalker, read_head
from fl_server.audit.events import (
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
        """Re-hash the whole chain and check every link and the head (no checkpoints).

        :func:`fl_server.audit.verify.verify_trail` checks the signed checkpoints,
        the ledger and the store as well; this is the chain alone.

        Returns
        -------
        VerifyReport
            ``ok`` and the head hash, or the first bad record and why.
        """
        head = read_head(self._engine)  # first: appends made while walking are not judged
        walker = ChainWalker(self._engine)
        checked = 0
        for row in walker.walk(upto=None if head is None else head.seq):
            if row.problem:
                return VerifyReport(
                    ok=False,
                    records_checked=checked,
                    head_hash=walker.position.record_hash,
                    first_bad_seq=row.problem_seq,
                    reason=row.problem,
                )
            checked += 1
        last = walker.position
        if head is None:
            reason = "the head row is missing"
        elif head.seq > last.seq:
            reason = (
                f"the head names record {head.seq} but the chain ends at record {last.seq}: "
                "records were removed from the end"
            )
        elif (head.seq, head.record_hash) != (last.seq, last.record_hash):
            reason = f"the head (record {head.seq}) does not match the chain's last record"
        else:
            return VerifyReport(ok=True, records_checked=checked, head_hash=last.record_hash)
        return VerifyReport(
            ok=False,
            records_checked=checked,
            head_hash=last.record_hash,
            first_bad_seq=last.seq + 1,
            reason=reason,
        )


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
