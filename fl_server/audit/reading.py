"""Read the audit chain as stored, marking damage instead of failing on it.

:meth:`fl_server.audit.AuditLog.iter` refuses a record it cannot trust (an
unknown kind, a damaged payload); a listing or a compliance report must still
show such a record, say what is wrong with it and go on. :func:`checked_records`
returns every record with its problem named (``None``: intact), so a reader
decides what to trust.

Notes
-----
A record is checked against its own hash and against its predecessor's hash
(the record with the sequence number before it, whatever run it belongs to).
This catches an edited or re-linked record; it does not replace
:meth:`AuditLog.verify`, which also checks the head row and the numbering of
the whole chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedge.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["CheckedRecord", "checked_records"]


@dataclass(frozen=True, slots=True)
class CheckedRecord:
    """One audit record as stored, and what is wrong with it (``None``: intact).

    ``payload`` is the parsed payload of an intact record, else the stored text
    (or the parsed value, when only the hash or the link is wrong): a reader
    must not take numbers from a record whose ``problem`` is set.
    """

    seq: int
    recorded_at: str
    kind: str
    run_id: str | None
    payload: Any
    prev_hash: str
    record_hash: str
    problem: str | None

    @property
    def intact(self) -> bool:
        """Whether the record matches its hash and links to its predecessor."""
        return self.problem is None


def checked_records(
    engine: Engine, *, run_id: str | None = None, last: int | None = None
) -> list[CheckedRecord]:
    """Return the records (of ``run_id`` when given) in sequence order, each checked.

    Parameters
    ----------
    engine
        A migrated fedge database.
    run_id
        Only this run's records; ``None``: every record.
    last
        Only the newest ``last`` records (still returned oldest first); ``None``: all.

    Returns
    -------
    list[CheckedRecord]
        Every selected record as stored, with ``problem`` naming what is wrong:
        a payload that is not canonical JSON (or not a JSON object), content
        that does not match its hash, or a link that does not match its
        predecessor's hash.

    Raises
    ------
    ConfigError
        If ``last`` is not positive.
    StorageError
        If the database cannot be read.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from fl_server.audit.events import GENESIS_HASH
    from fl_server.db.schema import AuditRecordRow

    if last is not None and last < 1:
        raise ConfigError(f"last must be >= 1, got {last}")
    query = select(AuditRecordRow)
    if run_id is not None:
        query = query.where(AuditRecordRow.run_id == run_id)
    query = query.order_by(AuditRecordRow.seq.desc())
    if last is not None:
        query = query.limit(last)
    try:
        with Session(engine) as session:
            rows = list(reversed(list(session.execute(query).scalars())))
            wanted = sorted({row.seq - 1 for row in rows} - {0})
            before: dict[int, str] = {}
            # Chunked: a long run's predecessors would pass the database's parameter limit.
            for start in range(0, len(wanted), 500):
                links = session.execute(
                    select(AuditRecordRow.seq, AuditRecordRow.record_hash).where(
                        AuditRecordRow.seq.in_(wanted[start : start + 500])
                    )
                )
                before.update({seq: digest for seq, digest in links})
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the audit log: {exc}") from exc
    before[0] = GENESIS_HASH
    return [_checked(row, before.get(row.seq - 1)) for row in rows]


def _checked(row: Any, predecessor_hash: str | None) -> CheckedRecord:
    """Check one stored row against its hash and its predecessor's hash."""
    from fl_server.audit.chain import check_content

    checked = check_content(row)
    problem = checked.problem
    if problem is None and predecessor_hash is None:
        problem = f"its predecessor (record {row.seq - 1}) is missing"
    elif problem is None and predecessor_hash != row.prev_hash:
        problem = "it does not link to its predecessor"
    elif problem is None and not isinstance(checked.payload, dict):
        problem = "its payload is not a JSON object"
    return CheckedRecord(
        seq=row.seq,
        recorded_at=row.recorded_at,
        kind=row.kind,
        run_id=row.run_id,
        payload=checked.payload,
        prev_hash=row.prev_hash,
        record_hash=row.record_hash,
        problem=problem,
    )
