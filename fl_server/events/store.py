"""The ``device_events`` table: verified device events, one per (device, seq), and how to read them.

Notes
-----
Storing is idempotent: a batch is inserted with ``ON CONFLICT DO NOTHING`` on the
unique (device_id, seq), so an event delivered twice (MQTT QoS 1 is at least once,
and a device re-sends a batch cut by a disconnection) is stored once whatever the
order of arrival. An event whose (device, seq) is already held by a *different*
event (another signature) is a conflict: a device reused a number (a restored
backup, a bug) or its key is being misused; it is reported, never stored.

Ids grow in insertion order, so a reader can follow the table with ``since_id``.
With several ingestors writing to one PostgreSQL database, a transaction may commit
after one with higher ids; readers that must not miss a row re-read a margin below
their cursor (rows are immutable, duplicates are easy to skip by id).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, cast

from sqlalchemy import Engine, Table, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edge_runtime._json import canonical_bytes
from edge_runtime.device_events import DeviceEvent, EventKind
from fedge.errors import ConfigError, StorageError
from fl_server.db.schema import DeviceEventRow

__all__ = ["MAX_READ", "EventStore", "InsertOutcome", "StoredEvent", "stored_time"]

MAX_READ = 10_000
_LOOKUP_CHUNK = 400


def stored_time(moment: datetime) -> str:
    """Format ``moment`` as stored: fixed-width UTC ISO 8601, so strings order as times.

    Raises
    ------
    ConfigError
        If ``moment`` is not a timezone-aware datetime.
    """
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise ConfigError("times must be timezone-aware datetimes")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class InsertOutcome(Enum):
    """What storing one event did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same event was already stored
    CONFLICT = "conflict"  # another event holds its (device, seq)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredEvent:
    """One stored event, as the rollout controller reads it.

    Parameters
    ----------
    id
        Its row id, increasing in insertion order (a cursor for ``since_id``).
    device, seq, kind
        Who sent it, its sequence number and what it reports.
    event_time
        The device's clock when it made the event (reported, not trusted).
    received_at
        When the cloud stored it (the server's clock): what windows are measured on.
    body_json
        The body as canonical JSON; :attr:`body` parses it.
    """

    id: int
    device: str
    seq: int
    kind: EventKind
    event_time: float
    received_at: datetime
    body_json: str

    @property
    def body(self) -> dict[str, Any]:
        """The body as a fresh dict."""
        body: dict[str, Any] = json.loads(self.body_json)
        return body


def _to_stored(row: DeviceEventRow) -> StoredEvent:
    return StoredEvent(
        id=row.id,
        device=row.device_id,
        seq=row.seq,
        kind=EventKind(row.kind),
        event_time=row.event_time,
        received_at=datetime.fromisoformat(row.received_at),
        body_json=row.body,
    )


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class EventStore:
    """Store verified device events idempotently and read them back.

    Parameters
    ----------
    engine
        An engine whose schema :func:`fl_server.db.open_database` has migrated.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        dialect = engine.dialect.name
        insert: Callable[..., Any]
        if dialect == "sqlite":
            insert = sqlite.insert
        elif dialect == "postgresql":
            insert = postgresql.insert
        else:
            raise ConfigError(f"device events need SQLite or PostgreSQL, not {dialect}")
        table = cast(Table, DeviceEventRow.__table__)
        self._insert_statement = (
            insert(table)
            .on_conflict_do_nothing(index_elements=["device_id", "seq"])
            .returning(table.c.device_id, table.c.seq)
        )

    @property
    def engine(self) -> Engine:
        """The database the events live in."""
        return self._engine

    def insert(
        self, events: Sequence[DeviceEvent], *, received_at: datetime
    ) -> list[InsertOutcome]:
        """Store each event unless its (device, seq) is taken; return what happened to each.

        The whole batch commits in one transaction. The caller has verified the
        events; nothing is checked here but the uniqueness.

        Raises
        ------
        ConfigError
            If ``received_at`` is not timezone-aware.
        StorageError
            If the database refuses the transaction; nothing is stored then.
        """
        received = stored_time(received_at)
        outcomes: list[InsertOutcome | None] = [None] * len(events)
        first: dict[tuple[str, int], int] = {}  # key -> index of its first event in the batch
        rows: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            key = (event.device, event.seq)
            if key in first:
                continue
            first[key] = index
            rows.append(
                {
                    "device_id": event.device,
                    "seq": event.seq,
                    "kind": event.kind.value,
                    "event_time": event.time,
                    "received_at": received,
                    "body": event.body_json.decode("ascii"),
                    "certificate": canonical_bytes(event.certificate.to_json()).decode("ascii"),
                    "signature": event.signature.hex(),
                }
            )
        try:
            with Session(self._engine) as session, session.begin():
                inserted: set[tuple[str, int]] = set()
                if rows:
                    # One compiled statement, executed for many rows (SQLAlchemy batches them
                    # into multi-row INSERTs itself): compiling a 500-row VALUES clause each
                    # time cost more than the signature checks.
                    result = session.connection().execute(self._insert_statement, rows)
                    inserted.update((device, seq) for device, seq in result)
                held = self._signatures(session, [key for key in first if key not in inserted])
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot store device events: {type(exc).__name__}: {exc}") from exc
        for index, event in enumerate(events):
            key = (event.device, event.seq)
            if key in inserted and first[key] == index:
                outcomes[index] = InsertOutcome.STORED
            else:
                original = events[first[key]] if key in inserted else None
                signature = original.signature.hex() if original else held.get(key)
                outcomes[index] = (
                    InsertOutcome.DUPLICATE
                    if signature == event.signature.hex()
                    else InsertOutcome.CONFLICT
                )
        return [outcome for outcome in outcomes if outcome is not None]

    @staticmethod
    def _signatures(session: Session, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        held: dict[tuple[str, int], str] = {}
        for chunk in _chunks(keys, _LOOKUP_CHUNK):
            query = select(
                DeviceEventRow.device_id, DeviceEventRow.seq, DeviceEventRow.signature
            ).where(tuple_(DeviceEventRow.device_id, DeviceEventRow.seq).in_(list(chunk)))
            for device, seq, signature in session.execute(query):
                held[(device, seq)] = signature
        return held

    def events(
        self,
        *,
        kinds: Iterable[EventKind] | None = None,
        devices: Iterable[str] | None = None,
        since_id: int = 0,
        received_after: datetime | None = None,
        limit: int = 1_000,
    ) -> list[StoredEvent]:
        """Return stored events in id order, filtered.

        Parameters
        ----------
        kinds
            Only these kinds (``None``: all).
        devices
            Only these devices (``None``: all).
        since_id
            Only rows with an id above this (the last id a reader has seen).
        received_after
            Only events the cloud received at or after this time.
        limit
            At most this many rows, 1..``MAX_READ``.

        Raises
        ------
        ConfigError
            If ``limit`` or ``since_id`` is out of range, or a kind is not an ``EventKind``.
        StorageError
            If the database cannot be read.
        """
        if type(limit) is not int or not 1 <= limit <= MAX_READ:
            raise ConfigError(f"limit must be an int in 1..{MAX_READ}, got {limit!r:.40}")
        if type(since_id) is not int or since_id < 0:
            raise ConfigError(f"since_id must be an int >= 0, got {since_id!r:.40}")
        query = select(DeviceEventRow).where(DeviceEventRow.id > since_id)
        if kinds is not None:
            kind_list = list(kinds)
            if not all(isinstance(kind, EventKind) for kind in kind_list):
                raise ConfigError("kinds must be EventKind members")
            query = query.where(DeviceEventRow.kind.in_([kind.value for kind in kind_list]))
        if devices is not None:
            query = query.where(DeviceEventRow.device_id.in_(list(devices)))
        if received_after is not None:
            query = query.where(DeviceEventRow.received_at >= stored_time(received_after))
        query = query.order_by(DeviceEventRow.id).limit(limit)
        try:
            with Session(self._engine) as session:
                return [_to_stored(row) for row in session.execute(query).scalars()]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read device events: {type(exc).__name__}") from exc

    def all_events(
        self, *, kinds: Iterable[EventKind] | None = None, received_after: datetime | None = None
    ) -> list[StoredEvent]:
        """Return every matching event in id order, read ``MAX_READ`` rows at a time.

        Raises
        ------
        ConfigError, StorageError
            As :meth:`events`.
        """
        kind_list = None if kinds is None else list(kinds)
        found: list[StoredEvent] = []
        cursor = 0
        while True:
            page = self.events(
                kinds=kind_list, received_after=received_after, since_id=cursor, limit=MAX_READ
            )
            found.extend(page)
            if len(page) < MAX_READ:
                return found
            cursor = page[-1].id

    def latest_seq(self, device: str) -> int | None:
        """Return the highest sequence number stored for ``device``, or ``None``.

        Raises
        ------
        StorageError
            If the database cannot be read.
        """
        query = select(func.max(DeviceEventRow.seq)).where(DeviceEventRow.device_id == device)
        try:
            with Session(self._engine) as session:
                latest: int | None = session.execute(query).scalar_one()
                return latest
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read device events: {type(exc).__name__}") from exc

    def count(self, *, kinds: Iterable[EventKind] | None = None) -> int:
        """Return how many events are stored (of ``kinds``, if given).

        Raises
        ------
        StorageError
            If the database cannot be read.
        """
        query = select(func.count()).select_from(DeviceEventRow)
        if kinds is not None:
            query = query.where(DeviceEventRow.kind.in_([kind.value for kind in kinds]))
        try:
            with Session(self._engine) as session:
                total: int = session.execute(query).scalar_one()
                return total
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot count device events: {type(exc).__name__}") from exc

    def devices_reporting(
        self,
        kind: EventKind,
        *,
        received_after: datetime,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> set[str]:
        """Return the distinct devices with an event of ``kind`` received since a time.

        Parameters
        ----------
        kind
            The kind to look for.
        received_after
            The window's start (server clock).
        where
            A test of the body an event must pass to count (``None``: every event).

        Raises
        ------
        StorageError
            If the database cannot be read.
        """
        conditions = (
            DeviceEventRow.kind == kind.value,
            DeviceEventRow.received_at >= stored_time(received_after),
        )
        devices: set[str] = set()
        try:
            with Session(self._engine) as session:
                if where is None:
                    query = select(DeviceEventRow.device_id).where(*conditions).distinct()
                    return set(session.scalars(query))
                rows = select(DeviceEventRow.device_id, DeviceEventRow.body).where(*conditions)
                for device, body in session.execute(rows):
                    if device not in devices and where(json.loads(body)):
                        devices.add(device)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read device events: {type(exc).__name__}") from exc
        return devices
