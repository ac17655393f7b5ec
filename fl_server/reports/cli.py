"""``fedge audit report``: write a run's (or a period's) compliance report as HTML, PDF or JSON.

Read-only: the database must exist (it is never created), and the report is
written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge.errors import ConfigError, StorageError
from fedge.home import FedgeHome
from fl_server.cli_options import DbUrlOption as _DbUrl
from fl_server.cli_options import HomeOption as _Home
from fl_server.cli_options import open_existing

if TYPE_CHECKING:
    from fl_server.reports.model import FleetReport, RunReport

__all__ = ["ReportFormat", "parse_date", "report_command", "validate_report", "write_report"]

_SCHEMA = Path(__file__).with_name("schema.json")


class ReportFormat(Enum):
    """The file format of a report."""

    HTML = "html"
    PDF = "pdf"
    JSON = "json"


def parse_date(text: str | None, option: str) -> datetime | None:
    """Parse ``YYYY-MM-DD`` or an ISO date-time (UTC unless it names a zone).

    Raises
    ------
    ConfigError
        If ``text`` is not such a date.
    """
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"{option} {text!r} is not a date (YYYY-MM-DD or an ISO date-time)"
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def validate_report(document: dict[str, Any]) -> None:
    """Check ``document`` against ``schema.json`` (JSON Schema draft 2020-12).

    Raises
    ------
    ConfigError
        If it does not validate (a bug: the builder and the schema disagree).
    """
    import jsonschema  # type: ignore[import-untyped]

    schema = json.loads(_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "$"
        raise ConfigError(f"the report does not match its schema at {where}: {error.message}")


def _check_target(out: Path) -> None:
    if out.is_dir():
        raise StorageError(f"cannot write the report to {out}: it is a directory")
    if not out.parent.is_dir():
        raise StorageError(f"cannot write the report to {out}: {out.parent} is not a directory")


def write_report(report: RunReport | FleetReport, fmt: ReportFormat, out: Path) -> int | None:
    """Render ``report`` as ``fmt`` and write it atomically to ``out``; return PDF pages.

    Raises
    ------
    StorageError
        If ``out`` cannot be written.
    """
    from edge_runtime.durable import write_atomically

    pages = None
    if fmt is ReportFormat.JSON:
        document = report.to_json()
        validate_report(document)
        data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    elif fmt is ReportFormat.HTML:
        from fl_server.reports.render_html import render_html

        data = render_html(report).encode("utf-8")
    else:
        from fl_server.reports.render_pdf import render_pdf

        data, pages = render_pdf(report)
    _check_target(out)
    try:
        write_atomically(out, data)
    except OSError as exc:
        raise StorageError(f"cannot write the report to {out}: {exc.strerror or exc}") from exc
    return pages


def report_command(
    out: Annotated[Path, typer.Option("--out", help="Where to write the report.")],
    run_id: Annotated[
        str | None, typer.Option("--run", help="The run (default: the newest run started).")
    ] = None,
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="html, pdf or json.")
    ] = ReportFormat.HTML,
    fleet: Annotated[
        bool, typer.Option("--fleet", help="Summarise every run started in a period instead.")
    ] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="With --fleet: runs started on or after DATE.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="With --fleet: runs started before DATE.")
    ] = None,
    db_url: _DbUrl = None,
    home: _Home = None,
) -> None:
    """Write a compliance report for a data-protection officer or an auditor.

    A run's report covers provenance, participants, data flows, differential
    privacy (NIST SP 800-226 terms), secure aggregation, model lineage,
    security events, the trail's verification and a regulatory mapping
    (evidence, not legal advice). A damaged trail is reported, not fatal.
    """
    from fl_server.audit.trust import AuditTrust, verify_with_trust
    from fl_server.reports.builder import (
        build_fleet_report,
        build_run_report,
        verification_of,
    )

    if fleet and run_id is not None:
        raise typer.BadParameter("a fleet summary covers every run: drop --run", param_hint="--run")
    if not fleet and (since is not None or until is not None):
        raise typer.BadParameter("a period needs --fleet", param_hint="--since/--until")
    start, end = parse_date(since, "--since"), parse_date(until, "--until")
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"--since {since} is not before --until {until}")
    _check_target(out)
    engine = open_existing(db_url, home)
    report: RunReport | FleetReport
    try:
        result, notes = verify_with_trust(engine, AuditTrust(FedgeHome.resolve(home).audit_dir))
        verification = verification_of(result, notes)
        if fleet:
            report = build_fleet_report(engine, since=start, until=end, verification=verification)
            what = f"fleet summary of {len(report.runs)} runs"
        else:
            report = build_run_report(engine, run_id=run_id, verification=verification)
            what = f"report of run {report.summary.run_id}"
    finally:
        engine.dispose()
    pages = write_report(report, fmt, out)
    extra = f" ({pages} pages)" if pages is not None else ""
    typer.echo(f"{what} written to {out}{extra}")
