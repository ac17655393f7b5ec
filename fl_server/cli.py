"""``fedge audit`` (read and verify the audit chain) and ``fedge ledger`` (privacy spending).

Every command here only reads: on a database that does not exist it fails with
one line instead of creating one.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import AuditIntegrityError
from fedge.home import FedgeHome
from fl_server.cli_options import DbUrlOption, HomeOption, JsonOption, open_existing
from fl_server.reports.cli import report_command

if TYPE_CHECKING:
    from fl_server.audit.verify import TrailVerification
    from fl_server.ledger import LedgerEntry, PrivacyLedger

__all__ = ["audit_app", "ledger_app", "open_existing"]

audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="Show what each run spent of its privacy budget.", no_args_is_help=True
)

# SQLite and PostgreSQL integers are signed 64-bit.
_MAX_COUNT = 2**63 - 1

_DbUrl = DbUrlOption
_Home = HomeOption
_Json = JsonOption


audit_app.command("report")(report_command)


@audit_app.command("verify")
def verify_command(
    db_url: _DbUrl = None,
    home: _Home = None,
    checkpoint_files: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoint",
            help="A checkpoint file kept outside the system (`fedge audit checkpoint --out`); "
            "repeatable. The chain must still reach it and match it.",
        ),
    ] = None,
    expect_head: Annotated[
        str | None,
        typer.Option(
            "--expect-head",
            help="A head hash kept from earlier (a run summary's audit_head): it must still be "
            "in the chain.",
        ),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="Trust only checkpoints signed by this key (64 hex digits; default: "
            "HOME/audit/checkpoint-key.pub).",
        ),
    ] = None,
    store_key: Annotated[
        Path | None,
        typer.Option(
            "--store-key",
            help="Also check each model version's manifest signature with the store's public "
            "key (`fedge store key --out FILE`).",
        ),
    ] = None,
    as_json: _Json = False,
) -> None:
    """Verify the whole trail; exit 1 naming the first bad record if it does not verify.

    Checks every record's link and hash, the head, every signed checkpoint (the
    database's, HOME/audit/checkpoints.jsonl and each --checkpoint file: a cut
    tail or a rewrite is named against them), the privacy ledger against the
    privacy.spent events that state its rows, and each model version's epsilon
    against the run's epsilon in the trail when it was published.
    """
    from fl_server.audit.checkpoints import read_public_key
    from fl_server.audit.trust import AuditTrust, verify_with_trust

    if expect_head is not None and not _is_digest(expect_head):
        raise typer.BadParameter(
            "a head hash is 64 lowercase hex digits", param_hint="--expect-head"
        )
    trust = AuditTrust(FedgeHome.resolve(home).audit_dir)
    engine = open_existing(db_url, home)
    try:
        result, unreadable = verify_with_trust(
            engine,
            trust,
            checkpoint_files=checkpoint_files or [],
            public_key=read_public_key(public_key) if public_key else None,
            expect_head=expect_head,
            store_public_key=read_public_key(store_key) if store_key else None,
        )
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(result.to_json() | {"unreadable_checkpoints": unreadable}, indent=2))
    else:
        _print_verification(result, unreadable)
    if not result.ok:
        more = (
            f" (and {len(result.problems) - 1} more problems)" if len(result.problems) > 1 else ""
        )
        where = "" if result.first_bad_seq is None else f" at record {result.first_bad_seq}"
        raise AuditIntegrityError(f"audit trail broken{where}: {result.reason}{more}")


def _is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _print_verification(result: TrailVerification, unreadable: list[str]) -> None:
    for problem in result.problems:
        where = f"record {problem.seq}: " if problem.seq is not None else ""
        typer.echo(f"FAILED {problem.part}: {where}{problem.message}")
    for line in unreadable:
        typer.echo(f"unreadable checkpoint: {line}")
    if not result.ok:
        return
    typer.echo(f"audit chain verified: {result.records_checked} records, head {result.head_hash}")
    if result.checkpoint is not None:
        cp = result.checkpoint
        typer.echo(
            f"checked against {result.checkpoints_checked} signed checkpoints; newest matched: "
            f"record {cp['seq']} signed at {cp['signed_at']} by key {cp['key_id']} "
            f"({cp['source']})"
        )
    typer.echo(
        f"privacy ledger: {result.ledger_rows_checked} rows stated by "
        f"{result.spent_events_checked} privacy.spent events; model store: "
        f"{result.store_versions_checked} versions' epsilon match the trail"
    )
    for warning in result.warnings:
        typer.echo(f"warning: {warning}")


@audit_app.command("checkpoint")
def checkpoint_command(
    db_url: _DbUrl = None,
    home: _Home = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Also export the checkpoint, with every record's hash, to this file for "
            "safekeeping outside the system (`fedge audit verify --checkpoint FILE`).",
        ),
    ] = None,
) -> None:
    """Sign a checkpoint of the chain's head now and append it to HOME/audit/checkpoints.jsonl.

    The chain is verified first: a checkpoint is never signed over a damaged
    trail. The key (HOME/audit/checkpoint-key.pem) is created on first use.
    """
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from fl_server.audit.anchors import write_checkpoint_file
    from fl_server.audit.checkpoints import checkpoint_now
    from fl_server.audit.trust import AuditTrust, verify_with_trust
    from fl_server.db.schema import AuditRecordRow

    trust = AuditTrust(FedgeHome.resolve(home).audit_dir)
    engine = open_existing(db_url, home)
    try:
        result, _ = verify_with_trust(engine, trust)
        if not result.ok:
            raise AuditIntegrityError(
                f"refusing to sign a checkpoint over a trail that does not verify: {result.reason}"
            )
        checkpoint = checkpoint_now(engine, trust.signer(), [trust.anchor], reason="manual")
        if out is not None:
            # The chain was just verified: its stored hashes up to the checkpoint are exported.
            query = (
                select(AuditRecordRow.record_hash)
                .where(AuditRecordRow.seq <= checkpoint.seq)
                .order_by(AuditRecordRow.seq)
            )
            with Session(engine) as session:
                hashes = list(session.scalars(query))
            write_checkpoint_file(out, checkpoint, hashes)
    finally:
        engine.dispose()
    typer.echo(
        f"checkpoint: record {checkpoint.seq}, head {checkpoint.head_hash}, signed at "
        f"{checkpoint.signed_at} by key {checkpoint.key_id}"
        + (f"; exported to {out}" if out is not None else "")
    )


@audit_app.command("adopt-ledger")
def adopt_ledger_command(db_url: _DbUrl = None, home: _Home = None) -> None:
    """Bind privacy-ledger rows written before fedge bound them to the chain (an upgrade).

    Each (run, round) group of rows that no chained event states gets one
    privacy.ledger_adopted event stating them as they are now, so budget checks
    accept them again. Run it once after upgrading, on a trail you trust: it
    vouches for the rows' current values. Refused over a trail that does not verify.
    """
    from fl_server.audit import AuditLog
    from fl_server.audit.trust import AuditTrust
    from fl_server.ledger_binding import VerifiedSpends, adopt_unbound_rows

    trust = AuditTrust(FedgeHome.resolve(home).audit_dir)
    engine = open_existing(db_url, home)
    try:
        checkpoints, _ = trust.trusted_checkpoints(engine, trust.trusted_key())
        adopted = adopt_unbound_rows(
            engine, VerifiedSpends(engine, checkpoints=checkpoints), AuditLog(engine)
        )
    finally:
        engine.dispose()
    typer.echo(
        f"adopted {adopted} ledger rows into the audit chain"
        if adopted
        else "every ledger row is already stated by the audit chain: nothing to adopt"
    )


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
    from fl_server.audit.reading import checked_records

    engine = open_existing(db_url, home)
    try:
        records = checked_records(engine, run_id=run_id, last=last)
    finally:
        engine.dispose()
    if as_json:
        fields = ("seq", "recorded_at", "kind", "run_id", "payload", "problem")
        listed = [{name: getattr(record, name) for name in fields} for record in records]
        typer.echo(json.dumps(listed, indent=2))
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
