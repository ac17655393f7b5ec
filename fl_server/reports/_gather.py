"""Read what a report needs from the database: the checked trail, the run's config, the ledger."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fedge.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fl_server.audit.reading import CheckedRecord
    from fl_server.db.schema import LedgerRow

__all__ = [
    "ConfigView",
    "RunRecords",
    "as_float",
    "as_int",
    "config_sha256",
    "config_view",
    "ledger_rows",
    "median",
    "parse_time",
    "run_records",
    "trail",
]


def as_float(value: object) -> float | None:
    """Return ``value`` as a finite float, or None (a bool or text is not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def as_int(value: object) -> int | None:
    """Return ``value`` as an int, or None (a bool, a float or text is not an int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_time(text: str | None) -> datetime | None:
    """Parse a stored ISO time; None when absent or malformed (a damaged record)."""
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigView:
    """The settings a report reads, from a simulation's flat or a deployment's nested config."""

    dp_mode: str
    epsilon_budget: float | None
    delta: float | None
    clip: float | None
    noise_multiplier: float | None
    client_lifetime_epsilon: float | None
    poisson_sampling: bool
    fraction: float
    adaptive_clip: bool
    secure: bool
    threat_model: str | None
    ring_bits: int | None
    rounds_planned: int | None


def config_view(config: Mapping[str, Any]) -> ConfigView:
    """Read a ``run.started`` config defensively: a missing or mistyped key reads as unset."""
    privacy = _mapping(config.get("privacy"))
    secure_section = _mapping(config.get("secure_aggregation"))
    federation = _mapping(config.get("federation"))
    nested = bool(privacy) or bool(secure_section)
    mode = privacy.get("mode") if nested else config.get("dp")
    dp_mode = mode if isinstance(mode, str) else "off"
    source = privacy if nested else config
    secure = bool(secure_section.get("enabled")) if nested else bool(config.get("secure_agg"))
    if dp_mode == "distributed":
        secure = True  # distributed DP implies secure aggregation
    threat = (secure_section if nested else config).get("threat_model")
    clients = as_int(federation.get("clients_per_round"))
    minimum = as_int(federation.get("min_clients"))
    fraction = as_float(config.get("fraction_train"))
    if fraction is None:
        fraction = 1.0 if clients is None or minimum is None else min(1.0, minimum / clients)
    return ConfigView(
        dp_mode=dp_mode,
        epsilon_budget=None if dp_mode == "off" else as_float(source.get("epsilon")),
        delta=None if dp_mode == "off" else as_float(source.get("delta")),
        clip=as_float(source.get("clip" if nested else "dp_clip")),
        noise_multiplier=as_float(source.get("noise_multiplier")),
        client_lifetime_epsilon=as_float(source.get("client_lifetime_epsilon")),
        poisson_sampling=bool(config.get("poisson_sampling")),
        fraction=fraction,
        adaptive_clip=bool(config.get("adaptive_clip")),
        secure=secure,
        threat_model=threat if isinstance(threat, str) and secure else None,
        ring_bits=as_int((secure_section if nested else config).get("ring_bits")),
        rounds_planned=as_int(federation.get("rounds") if nested else config.get("num_rounds")),
    )


@dataclass(slots=True)
class RunRecords:
    """One run's records, sorted by kind; damaged records kept apart, never trusted."""

    run_id: str
    records: list[CheckedRecord] = field(default_factory=list)

    def intact(self, kind: str) -> list[Mapping[str, Any]]:
        """Return the payloads of the intact records of ``kind``, in sequence order."""
        return [r.payload for r in self.records if r.kind == kind and r.problem is None]

    def intact_records(self, kind: str) -> list[CheckedRecord]:
        """Return the intact records of ``kind``, in sequence order."""
        return [r for r in self.records if r.kind == kind and r.problem is None]

    @property
    def damaged(self) -> list[CheckedRecord]:
        """Records that fail their hash or their link."""
        return [r for r in self.records if r.problem is not None]

    @property
    def started(self) -> CheckedRecord | None:
        """The first ``run.started`` record, damaged or not."""
        return next((r for r in self.records if r.kind == "run.started"), None)

    @property
    def config(self) -> Mapping[str, Any]:
        """The configuration of an intact ``run.started``; empty when damaged or missing."""
        started = self.intact("run.started")
        return _mapping(started[0].get("config")) if started else {}

    @property
    def end(self) -> CheckedRecord | None:
        """The last ``run.completed`` or ``run.failed`` record, damaged or not."""
        ends = [r for r in self.records if r.kind in {"run.completed", "run.failed"}]
        return ends[-1] if ends else None


def trail(engine: Engine) -> tuple[list[CheckedRecord], dict[str, RunRecords]]:
    """Return every record of the trail, checked, and the records of each run."""
    from fl_server.audit.reading import checked_records

    records = checked_records(engine)
    runs: dict[str, RunRecords] = {}
    for record in records:
        if record.run_id is not None:
            runs.setdefault(record.run_id, RunRecords(record.run_id)).records.append(record)
    return records, runs


def run_records(runs: Mapping[str, RunRecords], run_id: str | None) -> RunRecords:
    """Return the records of ``run_id`` (default: the newest run started).

    Raises
    ------
    ConfigError
        If the database records no such run (or no run at all).
    """
    if run_id is None:
        started = [r for r in runs.values() if r.started is not None]
        if not started:
            raise ConfigError("no run is recorded in this database's audit trail")
        return max(started, key=lambda r: r.started.seq if r.started else 0)
    if run_id not in runs:
        raise ConfigError(f"run {run_id!r} is not recorded in this database's audit trail")
    return runs[run_id]


def ledger_rows(engine: Engine, run_id: str) -> list[LedgerRow]:
    """Return the run's privacy-ledger rows by round, then subject.

    Raises
    ------
    StorageError
        If the database cannot be read.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from fl_server.db.schema import LedgerRow

    query = (
        select(LedgerRow)
        .where(LedgerRow.run_id == run_id)
        .order_by(LedgerRow.server_round, LedgerRow.subject)
    )
    try:
        with Session(engine, expire_on_commit=False) as session:
            rows = list(session.scalars(query))
            session.expunge_all()
            return rows
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the privacy ledger: {exc}") from exc


def config_sha256(config: Mapping[str, Any]) -> str | None:
    """Return the SHA-256 of ``config`` as the coordinator computes it; None if not JSON."""
    from fl_server.audit.events import canonical_json

    try:
        return hashlib.sha256(canonical_json(dict(config)).encode()).hexdigest()
    except ConfigError:
        return None


def median(values: Sequence[float]) -> float | None:
    """Return the upper median (as ``fedge ledger show`` does), or None for no values."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None
