"""The report sections that read the trail, the registry and the store (DP lives in _privacy)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fedge.errors import StorageError
from fl_server.reports._gather import RunRecords, as_float, as_int, parse_time
from fl_server.reports.model import (
    AliasMove,
    Artefact,
    Checkpoint,
    DamagedRecord,
    Device,
    Lineage,
    Participants,
    PublishedVersion,
    RoundParticipation,
    RoundRow,
    SecAggRound,
    SecureAggregation,
    SecurityEvent,
    SecurityEvents,
    Subject,
    Verification,
)
from fl_server.reports.terms import THREAT_MODELS, security_category

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fl_server.audit.reading import CheckedRecord
    from fl_server.db.schema import LedgerRow

__all__ = [
    "lineage_section",
    "participants_section",
    "rounds_of",
    "secure_section",
    "security_section",
    "verification_section",
]

_DESCRIPTION_CHARS = 240


def _refused(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if as_int(v) is not None}


def rounds_of(records: RunRecords) -> tuple[RoundRow, ...]:
    """Return one row per ``round.completed`` record; a damaged one with no numbers."""
    rows: list[RoundRow] = []
    for record in records.records:
        if record.kind != "round.completed":
            continue
        payload = record.payload if isinstance(record.payload, Mapping) else {}
        number = as_int(payload.get("round"))
        if number is None:
            continue  # nothing to place it by; it is listed among the damaged records
        intact = record.problem is None
        rows.append(
            RoundRow(
                round=number,
                accuracy=as_float(payload.get("accuracy")) if intact else None,
                loss=as_float(payload.get("loss")) if intact else None,
                replies=as_int(payload.get("replies")) if intact else None,
                failures=as_int(payload.get("failures")) if intact else None,
                seconds=as_float(payload.get("seconds")) if intact else None,
                model_sha256=str(payload.get("model_sha256")) if intact else None,
                damaged=not intact,
            )
        )
    return tuple(rows)


def _participation(record: CheckedRecord) -> RoundParticipation | None:
    payload = record.payload if isinstance(record.payload, Mapping) else {}
    number = as_int(payload.get("round"))
    if number is None:
        return None
    if record.problem is not None:
        return RoundParticipation(
            round=number,
            sampled=None,
            completed=None,
            dropped=None,
            failures=None,
            refused={},
            damaged=True,
        )
    secure = payload.get("secure_aggregation")
    secure = secure if isinstance(secure, Mapping) else {}
    replies, failures = as_int(payload.get("replies")), as_int(payload.get("failures"))
    sampled = as_int(payload.get("sampled"))
    if sampled is None:
        sampled = as_int(secure.get("sampled"))
    if sampled is None and replies is not None:
        sampled = replies + (failures or 0)
    completed = as_int(payload.get("completed"))
    if completed is None:
        completed = as_int(secure.get("completed"))
    if completed is None:
        completed = as_int(secure.get("survivors")) if secure else replies
    dropped = as_int(payload.get("dropped"))
    if dropped is None:
        dropped = as_int(secure.get("dropped"))
    if dropped is None and sampled is not None and completed is not None:
        dropped = max(sampled - completed, 0)
    refused = _refused(payload.get("refused")) or _refused(secure.get("refused"))
    return RoundParticipation(
        round=number,
        sampled=sampled,
        completed=completed,
        dropped=dropped,
        failures=failures,
        refused=refused,
        damaged=False,
    )


def _fingerprint(public_key: str) -> str:
    try:
        raw = bytes.fromhex(public_key)
    except ValueError:
        raw = public_key.encode()
    return hashlib.sha256(raw).hexdigest()


def _devices(engine: Engine, until: datetime | None) -> list[Any]:
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from fl_server.db.schema import DeviceRow

    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(DeviceRow).order_by(DeviceRow.enrolled_at)))
            session.expunge_all()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the device registry: {exc}") from exc
    if until is None:
        return rows
    kept = []
    for row in rows:
        enrolled = parse_time(row.enrolled_at)
        if enrolled is None or enrolled <= until:
            kept.append(row)
    return kept


def participants_section(
    engine: Engine,
    records: RunRecords,
    rows: Sequence[LedgerRow],
    *,
    withheld: str | None,
    until: datetime | None,
) -> Participants:
    """Return the participants: devices (or ledger subjects) and per-round counts only."""
    charged: dict[str, int] = {}
    latest: dict[str, float] = {}
    for row in rows:
        if row.subject != "run":
            charged[row.subject] = charged.get(row.subject, 0) + 1
            latest[row.subject] = row.epsilon
    devices = tuple(
        Device(
            device_id=row.device_id,
            node_id=row.node_id,
            identity_fingerprint=_fingerprint(row.identity_public_key),
            enrolled_at=row.enrolled_at,
            status=row.status,
            revoked_at=row.revoked_at,
            rounds_charged=None if withheld or not rows else charged.get(row.device_id, 0),
        )
        for row in _devices(engine, until)
    )
    subjects = (
        ()
        if withheld or devices
        else tuple(
            Subject(subject=s, rounds_charged=charged[s], epsilon=latest[s])
            for s in sorted(charged)
        )
    )
    per_round = tuple(
        p
        for p in (_participation(r) for r in records.records if r.kind == "round.completed")
        if p is not None
    )
    if devices:
        source = "enrolled devices (device registry)"
    elif charged:
        source = "privacy-ledger subjects (no enrolled devices: a simulation)"
    else:
        source = "round counts only (no enrolled devices and no ledger subjects)"
    return Participants(
        source=source,
        identity_note=(
            "participants are named by pseudonymous ids only (enrolment ids, Flower node ids); "
            "identity keys appear as SHA-256 fingerprints"
        ),
        sample_withheld=withheld is not None,
        sample_withheld_reason=withheld,
        devices=devices,
        subjects=subjects,
        distinct_participants=len(charged) if charged else None,
        per_round=per_round,
    )


def secure_section(
    records: RunRecords, *, enabled: bool, threat_model: str | None
) -> SecureAggregation:
    """Return the secure-aggregation section from the intact ``round.completed`` records."""
    per_round: list[SecAggRound] = []
    for payload in records.intact("round.completed"):
        secure = payload.get("secure_aggregation")
        number = as_int(payload.get("round"))
        if not isinstance(secure, Mapping) or number is None:
            continue
        sampled, survivors = as_int(secure.get("sampled")), as_int(secure.get("survivors"))
        dropped = as_int(secure.get("dropped"))
        if dropped is None and sampled is not None and survivors is not None:
            dropped = max(sampled - survivors, 0)
        aborted = secure.get("aborted")
        per_round.append(
            SecAggRound(
                round=number,
                sampled=sampled,
                survivors=survivors,
                dropped=dropped,
                refused=_refused(secure.get("refused")),
                degree=as_int(secure.get("degree")),
                threshold=as_int(secure.get("threshold")),
                ring_bits=as_int(secure.get("ring_bits")),
                quant_bits=as_int(secure.get("quant_bits")),
                aborted=None if aborted is None else str(aborted),
                upload_bytes_per_client=as_int(secure.get("upload_bytes_per_client")),
            )
        )
    enabled = enabled or bool(per_round)
    return SecureAggregation(
        enabled=enabled,
        protocol=(
            "SecAgg+ (Bell et al., CCS 2020): pairwise masks on a k-regular graph, "
            "t-out-of-k Shamir shares for dropout recovery"
            if enabled
            else None
        ),
        threat_model=threat_model if enabled else None,
        threat_model_description=THREAT_MODELS.get(threat_model or "") if enabled else None,
        per_round=tuple(per_round),
        dropouts_total=sum(r.dropped or 0 for r in per_round),
        aborted_rounds=sum(1 for r in per_round if r.aborted),
    )


def lineage_section(engine: Engine, run_id: str, trail: Sequence[CheckedRecord]) -> Lineage:
    """Return the versions the run published, their variants and any alias moves."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from fl_server.db.schema import ArtefactRow, ModelVersionRow

    query = (
        select(ModelVersionRow)
        .where(ModelVersionRow.run_id == run_id)
        .order_by(ModelVersionRow.model, ModelVersionRow.version)
    )
    try:
        with Session(engine) as session:
            versions = []
            for row in session.scalars(query):
                artefacts = session.scalars(
                    select(ArtefactRow)
                    .where(ArtefactRow.version_id == row.id)
                    .order_by(ArtefactRow.name)
                )
                versions.append(
                    PublishedVersion(
                        model=row.model,
                        version=row.version,
                        parent_version=row.parent_version,
                        server_round=row.server_round,
                        created_at=row.created_at,
                        dp_epsilon=row.dp_epsilon,
                        dp_delta=row.dp_delta,
                        participants=row.participants,
                        key_id=row.key_id,
                        artefacts=tuple(
                            Artefact(
                                name=a.name,
                                format=a.format,
                                precision=a.precision,
                                status=a.status,
                                digest=a.digest,
                                size=a.size,
                            )
                            for a in artefacts
                        ),
                    )
                )
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the model store: {exc}") from exc
    published = {(v.model, v.version) for v in versions}
    moves = []
    for record in trail:
        payload = record.payload if isinstance(record.payload, Mapping) else {}
        if record.kind != "store.alias_moved" or record.problem is not None:
            continue
        key = (payload.get("model"), as_int(payload.get("version")))
        if key in published:
            moves.append(
                AliasMove(
                    seq=record.seq,
                    recorded_at=record.recorded_at,
                    model=str(payload.get("model")),
                    alias=str(payload.get("alias")),
                    version=as_int(payload.get("version")),
                    previous=as_int(payload.get("previous")),
                )
            )
    statement = (
        f"{len(moves)} alias moves name versions of this run; no canary cohorts or "
        "rollbacks are recorded (fedge records rollouts once its rollout controller runs)"
        if moves
        else "no rollout is recorded for this run: no alias was moved to its versions and "
        "no canary cohort or rollback is recorded"
    )
    return Lineage(
        versions=tuple(versions),
        rollout_recorded=bool(moves),
        rollout_statement=statement,
        alias_moves=tuple(moves),
    )


def _describe(record: CheckedRecord) -> str:
    if record.problem is not None:
        return f"payload not trusted: {record.problem}"
    payload = record.payload if isinstance(record.payload, Mapping) else {}
    text = ", ".join(f"{key}={payload[key]}" for key in sorted(payload))
    return text if len(text) <= _DESCRIPTION_CHARS else text[: _DESCRIPTION_CHARS - 3] + "..."


def security_section(
    trail: Sequence[CheckedRecord], run_id: str, start: datetime | None, end: datetime | None
) -> SecurityEvents:
    """Return the run's security events and the fleet's ones inside the run's time window."""
    events = []
    for record in trail:
        category = security_category(record.kind)
        if category is None:
            continue
        if record.run_id != run_id:
            moment = parse_time(record.recorded_at)
            if record.run_id is not None or moment is None or start is None:
                continue
            if moment < start or (end is not None and moment > end):
                continue
        events.append(
            SecurityEvent(
                seq=record.seq,
                recorded_at=record.recorded_at,
                kind=record.kind,
                category=category,
                run_id=record.run_id,
                description=_describe(record),
                damaged=record.problem is not None,
            )
        )
    window = (
        f"this run's events, and fleet events (enrolment, revocation, ...) recorded from "
        f"{start.isoformat() if start else 'the run start'} to "
        f"{end.isoformat() if end else 'now (no end of run recorded)'}"
    )
    return SecurityEvents(window=window, events=tuple(events))


def verification_section(
    verification: Mapping[str, Any],
    damaged: Sequence[CheckedRecord],
    run_records: int,
    *,
    ledger_problems: Sequence[str] = (),
) -> Verification:
    """Return the verification result, against a checkpoint or stated as unanchored."""
    raw = verification.get("checkpoint")
    checkpoint = (
        Checkpoint(
            seq=as_int(raw.get("seq")),
            head_hash=None if raw.get("head_hash") is None else str(raw.get("head_hash")),
            signed_at=None if raw.get("signed_at") is None else str(raw.get("signed_at")),
            key_id=None if raw.get("key_id") is None else str(raw.get("key_id")),
            source=None if raw.get("source") is None else str(raw.get("source")),
        )
        if isinstance(raw, Mapping)
        else None
    )
    if checkpoint is not None:
        statement = (
            f"verified against checkpoint at record {checkpoint.seq} (head "
            f"{checkpoint.head_hash}, signed {checkpoint.signed_at} by key "
            f"{checkpoint.key_id}, from {checkpoint.source})"
        )
    else:
        statement = (
            "not verified against any external checkpoint: the chain was re-hashed from the "
            "database alone, which shows it is consistent, not that it was never rewritten "
            "as a whole"
        )
    ledger = verification.get("ledger")
    ledger = ledger if isinstance(ledger, Mapping) else {}
    listed = ledger.get("problems")
    problems = (
        [*(str(p) for p in listed), *ledger_problems]
        if isinstance(listed, list)
        else [*ledger_problems]
    )
    ok = bool(verification.get("ok")) and not damaged and not problems
    return Verification(
        ok=ok,
        records_checked=as_int(verification.get("records_checked")) or 0,
        head_hash=str(verification.get("head_hash", "")),
        first_bad_seq=as_int(verification.get("first_bad_seq")),
        reason=str(verification.get("reason") or ""),
        checkpoint=checkpoint,
        statement=statement,
        ledger_ok=False
        if ledger_problems
        else (None if "ok" not in ledger else bool(ledger.get("ok"))),
        ledger_problems=tuple(problems),
        run_records=run_records,
        damaged_records=tuple(
            DamagedRecord(
                seq=r.seq, recorded_at=r.recorded_at, kind=r.kind, problem=r.problem or ""
            )
            for r in damaged
        ),
    )
