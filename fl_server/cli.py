"""``fedge audit`` (read and verify the audit chain) and ``fedge ledger`` (privacy spending).

Every command here only reads: on a database that does not exist it fails with
one line instead of creating one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import AuditIntegrityError, StorageError
from fedge.home import HOME_HELP, FedgeHome
from fl_server.db import DB_URL_ENV

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fl_server.ledger import LedgerEntry, PrivacyLedger

__all__ = ["audit_app", "ledger_app"]

audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="Show what each run spent of its privacy budget.", no_args_is_help=True
)

# SQLite and PostgreSQL integers are signed 64-bit.
_MAX_COUNT = 2**63 - 1

_DbUrl = Annotated[
    str | None,
    typer.Option(
        "--db-url", envvar=DB_URL_ENV, help="The database (default: HOME/fedge.db, SQLite)."
    ),
]
_Home = Annotated[Path | None, typer.Option("--home", help=HOME_HELP)]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def open_existing(db_url: str | None, home: Path | None) -> Engine:
    """Open the database ``db_url`` (else the home's) for reading; never create one.

    Raises
    ------
    StorageError
        If there is no fedge database there.
    """
    from fl_server.db import open_database

    return open_database(db_url or FedgeHome.resolve(home).db_url, create=False)


@audit_app.command("verify")
def verify_command(db_url: _DbUrl = None, home: _Home = None) -> None:
    """Re-hash the whole chain; exit 1 naming the first bad record if it does not verify."""
    from fl_server.audit import AuditLog

    engine = open_existing(db_url, home)
    try:
        report = AuditLog(engine).verify()
    finally:
        engine.dispose()
    if not report.ok:
        raise AuditIntegrityError(
            f"audit chain broken at record {report.first_bad_seq}: {report.reason} "
            f"({report.records_checked} records verified before it)"
        )
    typer.echo(f"audit chain verified: {report.records_checked} records, head {report.head_hash}")


@dataclass(frozen=True, slots=True)
class ListedRecord:
    """One audit record as stored, and what is wrong with it (``None``: intact)."""

    seq: int
    recorded_at: str
    kind: str
    run_id: str | None
    payload: Any
    problem: str | None


def latest_checked(engine: Engine, count: int, *, run_id: str | None) -> list[ListedRecord]:
    """Return the newest ``count`` records, oldest first, each checked against its hash.

    A damaged record (edited content, a broken link to its predecessor, a payload
    that is not JSON) is returned as stored with its problem named, so a listing
    can show it instead of failing on it.

    Raises
    ------
    StorageError
        If the database cannot be read.
    """
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from fl_server.audit.events import GENESIS_HASH, parse_canonical, record_hash
    from fl_server.db.schema import AuditRecordRow

    query = select(AuditRecordRow)
    if run_id is not None:
        query = query.where(AuditRecordRow.run_id == run_id)
    try:
        with Session(engine) as session:
            rows = list(
                session.execute(query.order_by(AuditRecordRow.seq.desc()).limit(count)).scalars()
            )
            wanted = {row.seq - 1 for row in rows}
            links = session.execute(
                select(AuditRecordRow.seq, AuditRecordRow.record_hash).where(
                    AuditRecordRow.seq.in_(sorted(wanted))
                )
            )
            before = {seq: digest for seq, digest in links}
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the audit log: {exc}") from exc
    before[0] = GENESIS_HASH
    listed = []
    for row in reversed(rows):
        problem = None
        try:
            payload: Any = parse_canonical(row.payload)
            digest = record_hash(
                seq=row.seq,
                recorded_at=row.recorded_at,
                kind=row.kind,
                run_id=row.run_id,
                payload_json=row.payload,
                prev_hash=row.prev_hash,
            )
        except ValueError as exc:  # ConfigError from parse_canonical is one
            payload, digest = row.payload, ""
            problem = f"its payload is not canonical JSON ({exc})"
        if problem is None and digest != row.record_hash:
            problem = "its content does not match its hash"
        elif problem is None and before.get(row.seq - 1) != row.prev_hash:
            problem = "it does not link to its predecessor"
        listed.append(
            ListedRecord(
                seq=row.seq,
                recorded_at=row.recorded_at,
                kind=row.kind,
                run_id=row.run_id,
                payload=payload,
                problem=problem,
            )
        )
    return listed


def _when(recorded_at: str) -> str:
    try:
        return f"{datetime.fromisoformat(recorded_at):%Y-%m-%d %H:%M:%S}"
    except ValueError:
        return recorded_at


@audit_app.command("list")
def list_command(
    db_url: _DbUrl = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Only the events of this run.")
    ] = None,
    last: Annotated[
        int, typer.Option("--last", min=1, max=_MAX_COUNT, help="Show the newest N events.")
    ] = 20,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Print the newest events: sequence number, time, kind, run and payload.

    Each record is checked against its hash as it is listed; a damaged one is
    shown as stored, marked DAMAGED, and the command exits 1.
    """
    engine = open_existing(db_url, home)
    try:
        records = latest_checked(engine, last, run_id=run_id)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps([asdict(record) for record in records], indent=2))
    for record in [] if as_json else records:
        if isinstance(record.payload, dict):
            payload = ", ".join(f"{key}={value}" for key, value in sorted(record.payload.items()))
        else:
            payload = repr(record.payload)
        mark = "" if record.problem is None else f"  DAMAGED: {record.problem}"
        typer.echo(
            f"{record.seq:>6}  {_when(record.recorded_at)}  {record.kind:<16} "
            f"{record.run_id or '-'}  {payload}{mark}"
        )
    damaged = [record.seq for record in records if record.problem is not None]
    if damaged:
        raise AuditIntegrityError(
            f"{len(damaged)} of the records listed are damaged (first: record {damaged[0]}); "
            "`fedge audit verify` checks the whole chain"
        )


def _entry_json(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "run_id": entry.run_id,
        "subject": entry.subject,
        "round": entry.server_round,
        "mechanism": entry.mechanism,
        "rho": entry.rho,
        "epsilon": entry.epsilon,
        "delta": entry.delta,
        "recorded_at": entry.recorded_at,
    }


@ledger_app.command("show")
def ledger_show_command(
    db_url: _DbUrl = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="The run (default: the newest in the ledger).")
    ] = None,
    client: Annotated[
        str | None, typer.Option("--client", help="Show this client's rounds instead.")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="Show every client's rounds too.")
    ] = False,
    subject: Annotated[
        str | None,
        typer.Option(
            "--subject",
            help="Show this client (its enrolment id, else its node id) in every run: its "
            "epsilon per run and its lifetime epsilon across runs, which "
            "--client-lifetime-epsilon caps.",
        ),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            "--delta",
            help="With --subject: the lifetime epsilon's delta (default: the newest row's).",
        ),
    ] = None,
    home: _Home = None,
    as_json: _Json = False,
) -> None:
    """Print a run's privacy spending round by round (epsilon at delta so far), and its clients.

    By default: the run's own rows, then a summary of the clients charged (how
    many, the median and the worst client's epsilon). With ``--subject``: one
    client's total in each run it took part in, and over all of them.
    """
    from fl_server.ledger import RUN_SUBJECT, PrivacyLedger

    if subject is not None and (run_id is not None or client is not None or show_all):
        raise typer.BadParameter(
            "it shows one client across every run: drop --run-id, --client and --all",
            param_hint="--subject",
        )
    if delta is not None and subject is None:
        raise typer.BadParameter(
            "the lifetime epsilon's delta needs --subject", param_hint="--delta"
        )
    engine = open_existing(db_url, home)
    if subject is not None:
        try:
            _show_subject(PrivacyLedger(engine), subject, delta, as_json=as_json)
        finally:
            engine.dispose()
        return
    try:
        ledger = PrivacyLedger(engine)
        chosen = run_id or ledger.latest_run_id()
        entries = [] if chosen is None else ledger.entries(chosen)
    finally:
        engine.dispose()
    shown = [
        e
        for e in entries
        if show_all or (e.subject == client if client is not None else e.subject == RUN_SUBJECT)
    ]
    latest: dict[str, float] = {}
    for entry in entries:
        if entry.subject != RUN_SUBJECT:
            latest[entry.subject] = entry.epsilon  # entries come in round order
    if as_json:
        typer.echo(json.dumps(_run_json(chosen, shown, latest), indent=2))
        return
    if not entries:
        typer.echo("no privacy spending recorded" + (f" for run {chosen}" if chosen else ""))
        return
    typer.echo(f"run {chosen}")
    typer.echo(f"{'subject':<16} {'round':>5}  {'mechanism':<16} {'rho':>10}  epsilon (delta)")
    for entry in shown:
        typer.echo(
            f"{entry.subject:<16} {entry.server_round:>5}  {entry.mechanism:<16} "
            f"{entry.rho:>10.5f}  {entry.epsilon:.4f} ({entry.delta:g})"
        )
    if client is not None and not shown:
        typer.echo(f"client {client} was never charged in this run")
    if latest and client is None:
        ordered = sorted(latest.values())
        worst = max(latest, key=lambda subject: latest[subject])
        typer.echo(
            f"clients charged: {len(latest)}; epsilon median {ordered[len(ordered) // 2]:.4f}, "
            f"worst {latest[worst]:.4f} (client {worst}); --client ID or --all for their rounds"
        )


def _run_json(
    run_id: str | None, shown: list[LedgerEntry], latest: dict[str, float]
) -> dict[str, Any]:
    clients: dict[str, Any] = {"charged": len(latest)}
    if latest:
        ordered = sorted(latest.values())
        worst = max(latest, key=lambda subject: latest[subject])
        clients |= {
            "median_epsilon": ordered[len(ordered) // 2],
            "worst_epsilon": latest[worst],
            "worst_client": worst,
        }
    return {"run_id": run_id, "entries": [_entry_json(e) for e in shown], "clients": clients}


def _show_subject(
    ledger: PrivacyLedger, subject: str, delta: float | None, *, as_json: bool
) -> None:
    """Print one client's stored total in each run and its lifetime epsilon over all runs."""
    entries = ledger.lifetime_entries(subject)
    if not entries:
        if as_json:
            typer.echo(json.dumps({"subject": subject, "runs": [], "lifetime_epsilon": None}))
        else:
            typer.echo(f"client {subject} was never charged")
        return
    at = entries[-1].delta if delta is None else delta
    lifetime = ledger.lifetime_spent(subject, delta=at)
    runs: dict[str, list[LedgerEntry]] = {}
    for entry in entries:  # in recorded order: a run's last entry holds its total
        runs.setdefault(entry.run_id, []).append(entry)
    if as_json:
        document = {
            "subject": subject,
            "runs": [
                {
                    "run_id": run,
                    "rounds": len(rows),
                    "mechanisms": list(dict.fromkeys(row.mechanism for row in rows)),
                    "epsilon": rows[-1].epsilon,
                    "delta": rows[-1].delta,
                }
                for run, rows in runs.items()
            ],
            "lifetime_epsilon": lifetime,
            "delta": at,
            "rounds": len(entries),
        }
        typer.echo(json.dumps(document, indent=2))
        return
    typer.echo(f"subject {subject}")
    typer.echo(f"{'run':<24} {'rounds':>6}  {'mechanism':<16} epsilon in the run (delta)")
    for run, rows in runs.items():
        mechanisms = ",".join(dict.fromkeys(row.mechanism for row in rows))
        total = rows[-1]
        typer.echo(
            f"{run:<24} {len(rows):>6}  {mechanisms:<16} {total.epsilon:.4f} ({total.delta:g})"
        )
    typer.echo(
        f"lifetime epsilon {lifetime:.4f} (delta {at:g}) over {len(runs)} runs, "
        f"{len(entries)} rounds"
    )
