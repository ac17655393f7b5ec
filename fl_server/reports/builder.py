"""Build a compliance report from the database: once, as one typed document.

The builder only reads. It never trusts a damaged audit record for a number:
such a record is listed under "Trail verification" and announced in the
summary's banner, and the report is built from what remains. Epsilon always
comes from the privacy ledger (:meth:`fl_server.ledger.PrivacyLedger.run_epsilon`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fl_server.reports._gather import (
    RunRecords,
    as_float,
    as_int,
    config_sha256,
    config_view,
    ledger_rows,
    parse_time,
    run_records,
    trail,
)
from fl_server.reports._privacy import (
    device_epsilon,
    dp_section,
    run_epsilon,
    sample_withheld,
)
from fl_server.reports._sections import (
    lineage_section,
    participants_section,
    rounds_of,
    secure_section,
    security_section,
    verification_section,
)
from fl_server.reports.model import (
    DISCLAIMER,
    SCHEMA_VERSION,
    DataFlows,
    FleetReport,
    FleetRun,
    Provenance,
    RegulatoryMapping,
    Resumption,
    RunReport,
    Summary,
)
from fl_server.reports.terms import data_flows, regulatory_rows

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fl_server.audit.verify import TrailVerification


__all__ = ["build_fleet_report", "build_run_report", "verification_of"]


def verification_of(result: TrailVerification, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Return a :func:`~fl_server.audit.verify.verify_trail` result as the mapping builders take.

    Ledger and store problems (the ledger against its events, a version's epsilon
    against the trail) are the report's "ledger" problems; the chain's and the
    checkpoints' are its reason and first bad record.
    """
    document: dict[str, Any] = result.to_json()
    bound = [p.message for p in result.problems if p.part in ("ledger", "store")]
    return document | {
        "ledger": {"ok": not bound, "problems": bound},
        "notes": [*result.warnings, *notes],
    }


def _now(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")


def _generator() -> str:
    from fedge.version import code_version

    return f"fedge {code_version()}"


def _status(records: RunRecords) -> tuple[str, str | None]:
    end = records.end
    if end is None:
        return "running or stopped without an end record", None
    if end.problem is not None:
        return "unknown (its end record is damaged)", None
    payload = end.payload
    if end.kind == "run.completed":
        return "completed", None
    error = payload.get("error")
    return str(payload.get("status") or "failed"), None if error is None else str(error)


def _provenance(records: RunRecords) -> Provenance:
    started = records.intact("run.started")
    payload: Mapping[str, Any] = started[0] if started else {}
    config = records.config
    recorded = payload.get("config_sha256")
    recomputed = config_sha256(config) if started else None
    packages = payload.get("packages")
    data = payload.get("data")
    status, error = _status(records)
    return Provenance(
        code_version=None
        if payload.get("code_version") is None
        else str(payload.get("code_version")),
        config_sha256=None if recorded is None else str(recorded),
        config_sha256_recomputed=recomputed,
        config_hash_matches=None
        if recorded is None or recomputed is None
        else recorded == recomputed,
        packages={str(k): str(v) for k, v in packages.items()}
        if isinstance(packages, Mapping)
        else {},
        config=config,
        data=data if isinstance(data, Mapping) else {},
        started_at=records.started.recorded_at if records.started else None,
        ended_at=records.end.recorded_at if records.end else None,
        end_status=status,
        end_error=error,
        resumptions=tuple(
            Resumption(
                recorded_at=r.recorded_at,
                after_round=as_int(r.payload.get("after_round")),
                abandoned_round=as_int(r.payload.get("abandoned_round")),
                code_version=None
                if r.payload.get("code_version") is None
                else str(r.payload.get("code_version")),
            )
            for r in records.intact_records("run.resumed")
        ),
    )


def build_run_report(
    engine: Engine,
    *,
    run_id: str | None = None,
    verification: Mapping[str, Any],
    now: datetime | None = None,
) -> RunReport:
    """Gather the compliance report of one run (default: the newest) from the database.

    Parameters
    ----------
    engine
        A migrated fedge database; only read.
    run_id
        The run; ``None``: the newest run started.
    verification
        The trail's verification result: ``ok``, ``records_checked``,
        ``head_hash``, ``first_bad_seq``, ``reason``, and optionally
        ``checkpoint`` (``seq``, ``head_hash``, ``signed_at``, ``key_id``,
        ``source``) and ``ledger`` (``ok``, ``problems``).
    now
        When the report is generated (default: the current time).

    Raises
    ------
    ConfigError
        If the run is not recorded (or no run is).
    StorageError
        If the database cannot be read.
    """
    everything, runs = trail(engine)
    records = run_records(runs, run_id)
    view = config_view(records.config)
    rows = ledger_rows(engine, records.run_id)
    withheld = sample_withheld(view)
    provenance = _provenance(records)
    start = parse_time(provenance.started_at)
    end = parse_time(provenance.ended_at)
    rounds = rounds_of(records)
    privacy = dp_section(engine, records, view, rows)
    secure = secure_section(records, enabled=view.secure, threat_model=view.threat_model)
    participants = participants_section(engine, records, rows, withheld=withheld, until=end)
    security = security_section(everything, records.run_id, start, end)
    damaged = [
        *records.damaged,
        *(
            r
            for r in everything
            if r.problem is not None
            and r.run_id != records.run_id
            and any(e.seq == r.seq for e in security.events)
        ),
    ]
    checked = verification_section(
        verification,
        damaged,
        len(records.records),
        ledger_problems=[privacy.ledger_problem] if privacy.ledger_problem else [],
    )
    upload = next((r.upload_bytes_per_client for r in secure.per_round), None)
    intact_rounds = [r for r in rounds if not r.damaged]
    banner = None
    if damaged or not checked.ok:
        parts = (
            [f"{len(damaged)} record(s) of this report fail their hash or link"] if damaged else []
        )
        if not verification.get("ok"):
            parts.append(f"the chain breaks at record {checked.first_bad_seq}: {checked.reason}")
        parts.extend(checked.ledger_problems)
        banner = (
            "The audit trail is damaged or does not verify: "
            + "; ".join(parts)
            + ". Damaged records are not used for any number; see Trail verification."
        )
    sizes = [p.completed for p in participants.per_round if p.completed is not None]
    summary = Summary(
        run_id=records.run_id,
        status=provenance.end_status,
        started_at=provenance.started_at,
        ended_at=provenance.ended_at,
        rounds_completed=len(intact_rounds),
        rounds_planned=view.rounds_planned,
        final_accuracy=intact_rounds[-1].accuracy if intact_rounds else None,
        dp_mode=view.dp_mode,
        epsilon=privacy.epsilon_total,
        delta=privacy.delta,
        epsilon_budget=privacy.epsilon_budget,
        secure_aggregation=secure.enabled,
        participants=participants.distinct_participants or (max(sizes) if sizes else None),
        trail_intact=checked.ok,
        damaged_records=len(damaged),
        banner=banner,
        statements=_statements(
            privacy.epsilon_total,
            privacy.delta,
            view.dp_mode,
            secure.enabled,
            checked.statement,
            ledger_problem=privacy.ledger_problem,
            device_epsilon=privacy.device_epsilon,
        ),
    )
    return RunReport(
        schema_version=SCHEMA_VERSION,
        report_kind="run",
        generated_at=_now(now),
        generator=_generator(),
        title=f"Compliance report of run {records.run_id}",
        summary=summary,
        provenance=provenance,
        participants=participants,
        data_flows=DataFlows(
            flows=data_flows(
                secure=secure.enabled,
                dp_mode=view.dp_mode,
                ring_bits=view.ring_bits,
                upload_bytes=upload,
            ),
            notes=(
                "Rows describe what fedge's protocol sends; the byte counts are the server's "
                "own measurements from the round records.",
            ),
        ),
        differential_privacy=privacy,
        secure_aggregation=secure,
        lineage=lineage_section(engine, records.run_id, everything),
        security_events=security,
        verification=checked,
        regulatory_mapping=RegulatoryMapping(disclaimer=DISCLAIMER, rows=regulatory_rows()),
        rounds=rounds,
    )


def _statements(
    epsilon: float | None,
    delta: float | None,
    mode: str,
    secure: bool,
    verified: str,
    *,
    ledger_problem: str | None,
    device_epsilon: float | None = None,
) -> tuple[str, ...]:
    lines = []
    if mode == "off":
        lines.append("The run used no differential privacy: no formal privacy guarantee.")
    elif epsilon is not None and delta is not None:
        lines.append(
            f"Differential privacy ({mode}): epsilon {epsilon:.4g} at delta {delta:g} "
            "(privacy ledger)."
        )
    elif ledger_problem is not None:
        lines.append(f"Differential privacy ({mode}): {ledger_problem}.")
    elif device_epsilon is not None:
        lines.append(
            f"Differential privacy ({mode}): worst device epsilon {device_epsilon:.4g}"
            + (f" at delta {delta:g}" if delta is not None else "")
            + " by the devices' own ledgers (the server ledger charges no one in this mode)."
        )
    else:
        lines.append(f"Differential privacy ({mode}): no spending recorded in the ledger.")
    lines.append(
        "Secure aggregation: the server saw only sums of updates."
        if secure
        else "No secure aggregation: the server saw each client's update."
    )
    lines.append(f"Trail: {verified}.")
    return tuple(lines)


def build_fleet_report(
    engine: Engine,
    *,
    since: datetime | None,
    until: datetime | None,
    verification: Mapping[str, Any],
    now: datetime | None = None,
) -> FleetReport:
    """Summarise every run started in [``since``, ``until``) (either bound open when None).

    Raises
    ------
    StorageError
        If the database cannot be read.
    """
    from strategies.accounting import AccountantKind

    everything, runs = trail(engine)
    listed: list[FleetRun] = []
    damaged = [r for r in everything if r.problem is not None]
    for records in runs.values():
        started = records.started
        moment = parse_time(started.recorded_at) if started else None
        if moment is None or (since and moment < since) or (until and moment >= until):
            continue
        view = config_view(records.config)
        rows = ledger_rows(engine, records.run_id)
        delta = rows[-1].delta if rows else view.delta
        accountant = AccountantKind.PRV if view.dp_mode == "sample" else AccountantKind.RDP
        epsilon, problem = run_epsilon(engine, records.run_id, accountant, delta if rows else None)
        subjects = {r.subject for r in rows if r.subject != "run"}
        replies = [r.replies for r in rounds_of(records) if not r.damaged and r.replies is not None]
        listed.append(
            FleetRun(
                run_id=records.run_id,
                started_at=started.recorded_at if started else None,
                status=_status(records)[0],
                rounds=len([r for r in rounds_of(records) if not r.damaged]),
                dp_mode=view.dp_mode,
                epsilon=as_float(epsilon),
                device_epsilon=device_epsilon(records),
                ledger_problem=problem,
                delta=delta if rows else None,
                secure_aggregation=view.secure,
                participants=len(subjects) or max(replies, default=None),
                damaged_records=len(records.damaged),
            )
        )
    listed.sort(key=lambda run: run.started_at or "")
    epsilons = [run.epsilon for run in listed if run.epsilon is not None]
    return FleetReport(
        schema_version=SCHEMA_VERSION,
        report_kind="fleet",
        generated_at=_now(now),
        generator=_generator(),
        title="Fleet compliance summary",
        since=None if since is None else since.isoformat(),
        until=None if until is None else until.isoformat(),
        runs=tuple(listed),
        total_rounds=sum(run.rounds for run in listed),
        max_epsilon=max(epsilons, default=None),
        verification=verification_section(verification, damaged, len(everything)),
        disclaimer=DISCLAIMER,
    )
