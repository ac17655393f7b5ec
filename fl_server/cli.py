"""``fedge audit`` (read and verify the audit chain) and ``fedge ledger`` (privacy spending)."""

from __future__ import annotations

from typing import Annotated

import typer

from fedge.errors import AuditIntegrityError
from fl_server.audit import AuditLog
from fl_server.db import DB_URL_ENV, open_database
from fl_server.ledger import RUN_SUBJECT, LedgerEntry, PrivacyLedger

__all__ = ["audit_app", "ledger_app"]

audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="Show what each run spent of its privacy budget.", no_args_is_help=True
)

_DbUrl = Annotated[
    str | None,
    typer.Option(
        "--db-url", envvar=DB_URL_ENV, help="The database [default: sqlite:///runs/fedge.db]."
    ),
]


@audit_app.command("verify")
def verify_command(db_url: _DbUrl = None) -> None:
    """Re-hash the whole chain; exit 1 naming the first bad record if it does not verify."""
    engine = open_database(db_url)
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


@audit_app.command("list")
def list_command(
    db_url: _DbUrl = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Only the events of this run.")
    ] = None,
    last: Annotated[int, typer.Option("--last", min=1, help="Show the newest N events.")] = 20,
) -> None:
    """Print the newest events: sequence number, time, kind, run and payload."""
    engine = open_database(db_url)
    try:
        events = AuditLog(engine).latest(last, run_id=run_id)
    finally:
        engine.dispose()
    for event in events:
        payload = ", ".join(f"{key}={value}" for key, value in sorted(event.payload.items()))
        typer.echo(
            f"{event.seq:>6}  {event.recorded_at:%Y-%m-%d %H:%M:%S}  {event.kind.value:<16} "
            f"{event.run_id or '-'}  {payload}"
        )


@ledger_app.command("show")
def ledger_show_command(
    db_url: _DbUrl = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="The run [default: the newest in the ledger].")
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
) -> None:
    """Print a run's privacy spending round by round (epsilon at delta so far), and its clients.

    By default: the run's own rows, then a summary of the clients charged (how
    many, the median and the worst client's epsilon). With ``--subject``: one
    client's total in each run it took part in, and over all of them.
    """
    if subject is not None and (run_id is not None or client is not None or show_all):
        raise typer.BadParameter(
            "it shows one client across every run: drop --run-id, --client and --all",
            param_hint="--subject",
        )
    if delta is not None and subject is None:
        raise typer.BadParameter(
            "the lifetime epsilon's delta needs --subject", param_hint="--delta"
        )
    engine = open_database(db_url)
    if subject is not None:
        try:
            _show_subject(PrivacyLedger(engine), subject, delta)
        finally:
            engine.dispose()
        return
    try:
        ledger = PrivacyLedger(engine)
        chosen = run_id or ledger.latest_run_id()
        entries = [] if chosen is None else ledger.entries(chosen)
    finally:
        engine.dispose()
    if not entries:
        typer.echo("no privacy spending recorded" + (f" for run {chosen}" if chosen else ""))
        return
    shown = [
        e
        for e in entries
        if show_all or (e.subject == client if client is not None else e.subject == RUN_SUBJECT)
    ]
    typer.echo(f"run {chosen}")
    typer.echo(f"{'subject':<16} {'round':>5}  {'mechanism':<16} {'rho':>10}  epsilon (delta)")
    for entry in shown:
        typer.echo(
            f"{entry.subject:<16} {entry.server_round:>5}  {entry.mechanism:<16} "
            f"{entry.rho:>10.5f}  {entry.epsilon:.4f} ({entry.delta:g})"
        )
    if client is not None and not shown:
        typer.echo(f"client {client} was never charged in this run")
    latest: dict[str, float] = {}
    for entry in entries:
        if entry.subject != RUN_SUBJECT:
            latest[entry.subject] = entry.epsilon  # entries come in round order
    if latest and client is None:
        ordered = sorted(latest.values())
        worst = max(latest, key=lambda subject: latest[subject])
        typer.echo(
            f"clients charged: {len(latest)}; epsilon median {ordered[len(ordered) // 2]:.4f}, "
            f"worst {latest[worst]:.4f} (client {worst}); --client ID or --all for their rounds"
        )


def _show_subject(ledger: PrivacyLedger, subject: str, delta: float | None) -> None:
    """Print one client's stored total in each run and its lifetime epsilon over all runs."""
    entries = ledger.lifetime_entries(subject)
    if not entries:
        typer.echo(f"client {subject} was never charged")
        return
    at = entries[-1].delta if delta is None else delta
    lifetime = ledger.lifetime_spent(subject, delta=at)
    runs: dict[str, list[LedgerEntry]] = {}
    for entry in entries:  # in recorded order: a run's last entry holds its total
        runs.setdefault(entry.run_id, []).append(entry)
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
