"""What binding the privacy ledger to the audit chain costs, on SQLite and PostgreSQL.

Three questions, each answered side by side in one run, on each backend:

``record_round``
    One round of S subjects (the run and S clients, one zCDP spend each):
    :meth:`fl_server.ledger.PrivacyLedger.record_round` (``bound``: verifies
    the chain appended since its last check, compares the round's earlier rows
    with the verified events, composes, writes the rows and a ``privacy.spent``
    event whose ``ledger`` section lists them) against ``baseline``: the same
    rows and a ``privacy.spent`` event without the ledger section and without
    any verification, in one transaction, written here through SQLAlchemy
    (``LedgerRow`` and ``AuditLog.append_in``), each subject's total composed
    from its earlier rows of the run as an unbound ledger would. The two
    variants write to two separate databases, alternating round by round; the
    first round of each is a warm-up. Both must write the same totals.
``budget_check``
    The lifetime check of the S clients after those rounds
    (:meth:`~fl_server.ledger.PrivacyLedger.check_lifetime`): ``warm`` (the
    ledger that recorded the rounds: nothing new to walk), ``cold`` (a new
    ledger: walks and verifies the whole chain first) and ``rows_only`` (select
    the rows, compose with :func:`strategies.accounting.spent_epsilon`; no
    verification). All three must project the same epsilons. Measured again
    as ``budget_check_trail`` once the trail below is built (``cold`` then
    walks all of it; ``warm`` caught up during the warm-up pass).
``verify``
    The whole trail of about N records (the rounds above, more runs of rounds,
    and plain events appended in batches up to N), one signed checkpoint:
    :func:`fl_server.audit.verify.verify_trail` (``full``: chain, checkpoint,
    ledger rows against events, store) against :meth:`AuditLog.verify`
    (``chain_only``).

Writes ``benchmarks/results/audit_trail.json``: ``backends.{sqlite,postgresql}``
with ``record_round`` (``bound_s``, ``baseline_s``, ``ratio``), ``budget_check``
(``warm_s``, ``cold_s``, ``rows_only_s``, ``cold_over_rows_only``,
``warm_over_rows_only``, and the chain's ``records``), ``budget_check_trail``
(the same keys), ``verify`` (``records``, ``full_s``, ``chain_only_s``,
``ratio``, ``records_per_s`` of the full verification,
``chain_only_records_per_s``) and ``error``; seconds are medians (min and max
alongside). PostgreSQL runs in fresh schemas dropped afterwards (URL from
``$FEDGE_TEST_POSTGRES_URL``, else the local test server); if it does not
answer, its sections keep their keys with ``error`` set.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from benchmarks._common import RESULTS, machine, peak_rss_mb, summary, write
from fl_server._ledger_rows import new_row
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.chain import read_head
from fl_server.audit.events import JSONValue
from fl_server.audit.trust import AuditTrust, Checkpointer
from fl_server.audit.verify import SourcedCheckpoint, verify_trail
from fl_server.db import open_database
from fl_server.db.schema import LedgerRow
from fl_server.ledger import RUN_SUBJECT, PrivacyLedger
from fl_server.ledger_binding import charge_of_row
from strategies.accounting import AccountantKind, PrivacySpend, spent_epsilon

__all__ = ["main"]

_PG_ENV = "FEDGE_TEST_POSTGRES_URL"
_PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_DELTA = 1e-5
_BUDGET = 1e9  # never refuses: the check is timed, not the refusal
_SPEND = PrivacySpend(mechanism="ddgauss", rho=0.002)
_FILLER_BATCH = 500
_ROUND_KEYS = ("bound_s", "baseline_s", "ratio")
_CHECK_KEYS = ("warm_s", "cold_s", "rows_only_s", "cold_over_rows_only", "warm_over_rows_only")
_VERIFY_KEYS = ("records", "full_s", "chain_only_s", "ratio", "records_per_s")

Samples = dict[str, list[float]]
T = TypeVar("T")


def _timed(action: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def _failed(keys: Sequence[str], error: str) -> dict[str, Any]:
    return {**dict.fromkeys(keys), "error": error}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _all_failed(message: str) -> dict[str, Any]:
    """A backend that could not run: every section keeps its keys, with the error."""
    return {
        "record_round": _failed(_ROUND_KEYS, message),
        "budget_check": _failed(_CHECK_KEYS, message),
        "budget_check_trail": _failed(_CHECK_KEYS, message),
        "verify": _failed(_VERIFY_KEYS, message),
        "error": message,
    }


@contextmanager
def _database(pg_base: str | None, directory: Path, name: str) -> Iterator[Engine]:
    """Open a fresh, migrated database: a SQLite file, or a new PostgreSQL schema (then dropped)."""
    if pg_base is None:
        engine = open_database(f"sqlite:///{directory / name}.db")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    schema = f"bench_{name}_{secrets.token_hex(4)}"
    admin = create_engine(pg_base)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in pg_base else "?"
        engine = open_database(f"{pg_base}{separator}options=-csearch_path%3D{schema}")
        try:
            yield engine
        finally:
            engine.dispose()
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def _spend_of(row: LedgerRow) -> PrivacySpend:
    return charge_of_row(row)[1].spend


def _payload(server_round: int) -> Callable[[dict[str, float]], dict[str, JSONValue]]:
    def payload(totals: dict[str, float]) -> dict[str, JSONValue]:
        return {"round": server_round, "delta": _DELTA, "subjects": len(totals)}

    return payload


def _bound_round(
    ledger: PrivacyLedger, audit: AuditLog, run_id: str, server_round: int, subjects: list[str]
) -> dict[str, float]:
    spends = dict.fromkeys(subjects, _SPEND)
    return ledger.record_round(
        run_id, server_round, spends, delta=_DELTA, audit=audit, payload=_payload(server_round)
    )


def _baseline_round(
    engine: Engine, audit: AuditLog, run_id: str, server_round: int, subjects: list[str]
) -> dict[str, float]:
    """The same rows and event, unbound: no ledger section, no verification, one transaction."""
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    totals: dict[str, float] = {}
    with Session(engine) as session, session.begin():
        earlier: dict[str, list[PrivacySpend]] = {subject: [] for subject in subjects}
        query = select(LedgerRow).where(LedgerRow.run_id == run_id, LedgerRow.subject.in_(subjects))
        for row in session.scalars(query):
            earlier[row.subject].append(_spend_of(row))
        for subject in subjects:
            epsilon = spent_epsilon(
                [*earlier[subject], _SPEND], delta=_DELTA, kind=AccountantKind.RDP
            )
            session.add(
                new_row(
                    run_id,
                    subject,
                    server_round,
                    _SPEND,
                    delta=_DELTA,
                    epsilon=epsilon,
                    recorded_at=now,
                )
            )
            totals[subject] = epsilon
        session.flush()
        audit.append_in(
            session, AuditEventKind.PRIVACY_SPENT, _payload(server_round)(totals), run_id=run_id
        )
    return totals


def _same(first: Mapping[str, float], second: Mapping[str, float], what: str) -> None:
    if first.keys() != second.keys() or any(
        not math.isclose(first[k], second[k], rel_tol=1e-9) for k in first
    ):
        raise AssertionError(f"{what}: the variants disagree on the totals")


def _record_rounds(
    bound: tuple[PrivacyLedger, AuditLog],
    baseline: tuple[Engine, AuditLog],
    run_id: str,
    subjects: list[str],
    rounds: int,
) -> dict[str, Any]:
    samples: Samples = {"bound": [], "baseline": []}
    for server_round in range(rounds + 1):  # round 0 warms up
        runs: dict[str, Callable[[], dict[str, float]]] = {
            "bound": partial(_bound_round, *bound, run_id, server_round, subjects),
            "baseline": partial(_baseline_round, *baseline, run_id, server_round, subjects),
        }
        order = ["bound", "baseline"] if server_round % 2 == 0 else ["baseline", "bound"]
        totals: dict[str, dict[str, float]] = {}
        for name in order:
            seconds, totals[name] = _timed(runs[name])
            if server_round > 0:
                samples[name].append(seconds)
        _same(totals["bound"], totals["baseline"], f"round {server_round}")
    bound_s, baseline_s = (statistics.median(samples[k]) for k in ("bound", "baseline"))
    return {
        "bound_s": round(bound_s, 5),
        "baseline_s": round(baseline_s, 5),
        "ratio": round(bound_s / baseline_s, 3),
        "bound": _rounded(summary(samples["bound"])),
        "baseline": _rounded(summary(samples["baseline"])),
        "rounds": rounds,
        "error": None,
    }


def _rows_only_check(engine: Engine, subjects: list[str]) -> dict[str, float]:
    """Compose each client's rows of every run with the next spend: no verification."""
    history: dict[str, list[PrivacySpend]] = {subject: [] for subject in subjects}
    with Session(engine) as session:
        query = select(LedgerRow).where(LedgerRow.subject.in_(subjects)).order_by(LedgerRow.id)
        for row in session.scalars(query):
            history[row.subject].append(_spend_of(row))
    projected = {
        subject: spent_epsilon([*spends, _SPEND], delta=_DELTA, kind=AccountantKind.RDP)
        for subject, spends in history.items()
    }
    if any(epsilon > _BUDGET for epsilon in projected.values()):
        raise AssertionError("over the budget")
    return projected


def _budget_checks(
    engine: Engine, warm: PrivacyLedger, clients: list[str], repeats: int
) -> dict[str, Any]:
    variants: dict[str, Callable[[], dict[str, float]]] = {
        "warm": lambda: warm.check_lifetime(clients, _SPEND, budget=_BUDGET, delta=_DELTA),
        "cold": lambda: PrivacyLedger(engine).check_lifetime(
            clients, _SPEND, budget=_BUDGET, delta=_DELTA
        ),
        "rows_only": lambda: _rows_only_check(engine, clients),
    }
    names = list(variants)
    samples: Samples = {name: [] for name in names}
    for attempt in range(repeats + 1):  # the first pass warms up
        results: dict[str, dict[str, float]] = {}
        for name in names[attempt % 3 :] + names[: attempt % 3]:
            seconds, results[name] = _timed(variants[name])
            if attempt > 0:
                samples[name].append(seconds)
        _same(results["warm"], results["rows_only"], "budget check (warm)")
        _same(results["cold"], results["rows_only"], "budget check (cold)")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "warm_s": round(medians["warm"], 5),
        "cold_s": round(medians["cold"], 5),
        "rows_only_s": round(medians["rows_only"], 5),
        "cold_over_rows_only": round(medians["cold"] / medians["rows_only"], 3),
        "warm_over_rows_only": round(medians["warm"] / medians["rows_only"], 3),
        **{name: _rounded(summary(values)) for name, values in samples.items()},
        "subjects": len(clients),
        "records": _head_seq(engine),
        "error": None,
    }


def _head_seq(engine: Engine) -> int:
    head = read_head(engine)
    return 0 if head is None else head.seq


def _fill(audit: AuditLog, engine: Engine, count: int, run_id: str) -> None:
    """Append ``count`` plain events, a batch per transaction (building, not timed)."""
    done = 0
    while done < count:
        batch = min(_FILLER_BATCH, count - done)
        with Session(engine) as session, session.begin():
            for index in range(done, done + batch):
                audit.append_in(
                    session,
                    AuditEventKind.ROUND_COMPLETED,
                    {"round": index, "loss": 1.0 / (index + 1), "clients": 10},
                    run_id=run_id,
                )
        done += batch


def _build_trail(
    engine: Engine,
    subjects: list[str],
    *,
    records: int,
    extra_runs: int,
    rounds: int,
) -> None:
    """Extend the chain to about ``records``: more runs of rounds, plain events between them."""
    audit = AuditLog(engine)
    ledger = PrivacyLedger(engine)
    fillers = max(0, records - _head_seq(engine) - extra_runs * rounds)
    share = fillers // (extra_runs + 1)
    for run in range(extra_runs):
        run_id = f"fill-{run}-{secrets.token_hex(3)}"
        _fill(audit, engine, share, run_id)
        for server_round in range(rounds):
            _bound_round(ledger, audit, run_id, server_round, subjects)
    _fill(audit, engine, fillers - share * extra_runs, "fill-tail")


def _verify(engine: Engine, directory: Path, repeats: int) -> dict[str, Any]:
    trust = AuditTrust(directory / "audit")
    checkpointer = Checkpointer(engine, trust)
    checkpointer.checkpoint("manual")
    sourced: list[SourcedCheckpoint]
    sourced, notes = trust.checkpoints(engine)
    if notes:
        raise AssertionError(f"unreadable checkpoints: {notes}")
    keys = {checkpointer.public_key}
    audit = AuditLog(engine)

    def full() -> int:
        result = verify_trail(engine, checkpoints=sourced, trusted_keys=keys)
        if not result.ok or result.checkpoints_checked < 1:
            raise AssertionError(f"the trail does not verify: {result.reason}")
        return result.records_checked

    def chain_only() -> int:
        report = audit.verify()
        if not report.ok:
            raise AssertionError(f"the chain does not verify: {report.reason}")
        return report.records_checked

    variants: dict[str, Callable[[], int]] = {"full": full, "chain_only": chain_only}
    samples: Samples = {name: [] for name in variants}
    records = 0
    for attempt in range(repeats + 1):  # the first pass warms up
        order = ["full", "chain_only"] if attempt % 2 == 0 else ["chain_only", "full"]
        counts: dict[str, int] = {}
        for name in order:
            seconds, counts[name] = _timed(variants[name])
            if attempt > 0:
                samples[name].append(seconds)
        if counts["full"] != counts["chain_only"]:
            raise AssertionError("the two verifications read different numbers of records")
        records = counts["full"]
    full_s, chain_s = (statistics.median(samples[k]) for k in ("full", "chain_only"))
    return {
        "records": records,
        "full_s": round(full_s, 4),
        "chain_only_s": round(chain_s, 4),
        "ratio": round(full_s / chain_s, 3),
        "records_per_s": round(records / full_s),
        "chain_only_records_per_s": round(records / chain_s),
        "full": _rounded(summary(samples["full"])),
        "chain_only": _rounded(summary(samples["chain_only"])),
        "error": None,
    }


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {key: round(value, 5) for key, value in values.items()}


def _backend(pg_base: str | None, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    clients = [f"client-{index:05d}" for index in range(args.subjects)]
    subjects = [RUN_SUBJECT, *clients]
    result: dict[str, Any] = {
        "record_round": _failed(_ROUND_KEYS, "not run"),
        "budget_check": _failed(_CHECK_KEYS, "not run"),
        "budget_check_trail": _failed(_CHECK_KEYS, "not run"),
        "verify": _failed(_VERIFY_KEYS, "not run"),
        "error": None,
    }
    with ExitStack() as stack:
        try:
            bound_db = stack.enter_context(_database(pg_base, directory, "bound"))
            baseline_db = stack.enter_context(_database(pg_base, directory, "baseline"))
        except Exception as exc:  # the JSON records the failure
            return _all_failed(_error(exc))
        ledger = PrivacyLedger(bound_db)
        run_id = f"bench-{secrets.token_hex(3)}"
        sections: list[tuple[str, Sequence[str], Callable[[], dict[str, Any]]]] = [
            (
                "record_round",
                _ROUND_KEYS,
                lambda: _record_rounds(
                    (ledger, AuditLog(bound_db)),
                    (baseline_db, AuditLog(baseline_db)),
                    run_id,
                    subjects,
                    args.rounds,
                ),
            ),
            (
                "budget_check",
                _CHECK_KEYS,
                lambda: _budget_checks(bound_db, ledger, clients, args.repeats),
            ),
            (
                "budget_check_trail",
                _CHECK_KEYS,
                lambda: _budget_checks(bound_db, ledger, clients, args.repeats),
            ),
            ("verify", _VERIFY_KEYS, lambda: _verify(bound_db, directory, args.repeats)),
        ]
        for index, (name, keys, section) in enumerate(sections):
            if name == "budget_check_trail":
                started = time.perf_counter()
                try:
                    _build_trail(
                        bound_db,
                        subjects,
                        records=args.records,
                        extra_runs=args.runs - 1,
                        rounds=args.rounds,
                    )
                except Exception as exc:  # the JSON records the failure
                    message = f"building the trail: {_error(exc)}"
                    for later, keys_later, _ in sections[index:]:
                        result[later] = _failed(keys_later, message)
                    result["error"] = result["error"] or message
                    break
                print(f"  trail built in {time.perf_counter() - started:.1f} s", flush=True)
            started = time.perf_counter()
            try:
                result[name] = section()
            except Exception as exc:  # the JSON records the failure
                result[name] = _failed(keys, _error(exc))
                result["error"] = result["error"] or f"{name}: {_error(exc)}"
            print(f"  {name} in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def _table(backends: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        f"{'backend':10} {'round bound':>11} {'baseline':>9} {'ratio':>6} | "
        f"{'check warm':>10} {'cold':>8} {'rows':>8} {'cold/rows':>9} {'@trail':>7} | "
        f"{'records':>7} {'verify full':>11} {'chain':>8} {'ratio':>6} {'rec/s full':>10}"
    ]

    def cell(section: Mapping[str, Any], key: str, width: int, form: str = ".4f") -> str:
        value = section.get(key)
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{form}}"

    for name, result in backends.items():
        rr, bc, vf = result["record_round"], result["budget_check"], result["verify"]
        lines.append(
            f"{name:10} {cell(rr, 'bound_s', 11)} {cell(rr, 'baseline_s', 9)} "
            f"{cell(rr, 'ratio', 6, '.2f')} | {cell(bc, 'warm_s', 10)} {cell(bc, 'cold_s', 8)} "
            f"{cell(bc, 'rows_only_s', 8)} {cell(bc, 'cold_over_rows_only', 9, '.2f')} "
            f"{cell(result['budget_check_trail'], 'cold_over_rows_only', 7, '.2f')} | "
            f"{cell(vf, 'records', 7, 'd')} {cell(vf, 'full_s', 11)} "
            f"{cell(vf, 'chain_only_s', 8)} {cell(vf, 'ratio', 6, '.2f')} "
            f"{cell(vf, 'records_per_s', 10, 'd')}"
        )
        if result["error"]:
            lines.append(f"{'':10} error: {result['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=1000, help="clients per round")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per variant")
    parser.add_argument("--records", type=int, default=10_000, help="records of the trail")
    parser.add_argument("--runs", type=int, default=2, help="runs of rounds in the trail")
    parser.add_argument("--repeats", type=int, default=3, help="timed budget checks, verifies")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(_PG_ENV) or _PG_DEFAULT,
        help=f"PostgreSQL [default: ${_PG_ENV}, else {_PG_DEFAULT}]",
    )
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument(
        "--quick", action="store_true", help="200 subjects, 5 rounds, 2,000 records, 2 runs"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.rounds, args.records, args.runs = 200, 5, 2000, 2
    if min(args.subjects, args.rounds, args.records, args.runs, args.repeats) < 1:
        parser.error("--subjects, --rounds, --records, --runs and --repeats must be >= 1")
    backends: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-audit-bench-") as tmp:
        work = Path(tmp)
        print("sqlite", flush=True)
        backends["sqlite"] = _backend(None, work / "sqlite", args)
        print("postgresql", flush=True)
        if args.no_pg:
            backends["postgresql"] = _all_failed("skipped (--no-pg)")
        else:
            backends["postgresql"] = _backend(args.pg_url, work / "pg", args)
    document = {
        "benchmark": "audit_trail",
        "machine": machine(),
        "parameters": {
            "subjects": args.subjects,
            "rounds": args.rounds,
            "records": args.records,
            "runs": args.runs,
            "repeats": args.repeats,
            "delta": _DELTA,
            "spend": _SPEND.to_json(),
            "quick": args.quick,
        },
        "backends": backends,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write(args.out or RESULTS / "audit_trail.json", document)
    print(_table(backends))
    return document


if __name__ == "__main__":
    main()
