"""The privacy ledger's rows: building them, reading them back, and naming subjects in errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, select

from fedge.errors import ConfigError
from fl_server.db.schema import LedgerRow
from strategies.accounting import AccountantKind, PrivacySpend, spent_epsilon

__all__ = [
    "RUN_SUBJECT",
    "LedgerEntry",
    "check_client",
    "client_subjects",
    "composed",
    "entry_of",
    "lifetime_query",
    "named",
    "new_row",
]

RUN_SUBJECT = "run"
_NAMED_IN_ERRORS = 5  # subjects a refusal names before "and N more"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One stored round for one subject, with the subject's total after it."""

    run_id: str
    subject: str
    server_round: int
    mechanism: str
    rho: float
    delta: float
    epsilon: float
    recorded_at: str


def entry_of(row: LedgerRow) -> LedgerEntry:
    return LedgerEntry(
        run_id=row.run_id,
        subject=row.subject,
        server_round=row.server_round,
        mechanism=row.mechanism,
        rho=row.rho,
        delta=row.delta,
        epsilon=row.epsilon,
        recorded_at=row.recorded_at,
    )


def composed(
    spends: Sequence[PrivacySpend],
    extra: PrivacySpend | None,
    delta: float,
    kind: AccountantKind = AccountantKind.RDP,
) -> float:
    return spent_epsilon([*spends, *([extra] if extra else [])], delta=delta, kind=kind)


def client_subjects(subjects: Sequence[str]) -> list[str]:
    """Return ``subjects`` without repeats, each checked to be a client's subject."""
    if isinstance(subjects, str):
        raise ConfigError("subjects must be a sequence of client subjects, not one string")
    unique = list(dict.fromkeys(subjects))
    for subject in unique:
        check_client(subject)
    return unique


def check_client(subject: str) -> None:
    if not isinstance(subject, str) or not 0 < len(subject) <= 128:
        raise ConfigError("a ledger subject has 1..128 characters")
    if subject == RUN_SUBJECT:
        raise ConfigError(
            f"{RUN_SUBJECT!r} is the run-level subject: a lifetime total belongs to a client"
        )


def lifetime_query(subject: str) -> Select[LedgerRow]:
    """Select every row of ``subject``, of every run, in the order they were recorded."""
    return select(LedgerRow).where(LedgerRow.subject == subject).order_by(LedgerRow.id)


def named(subjects: Sequence[str]) -> str:
    """Name at most :data:`_NAMED_IN_ERRORS` subjects, then how many more there are."""
    shown = ", ".join(subjects[:_NAMED_IN_ERRORS])
    rest = len(subjects) - _NAMED_IN_ERRORS
    noun = "client" if len(subjects) == 1 else "clients"
    return f"{noun} {shown}" + (f" and {rest} more" if rest > 0 else "")


def new_row(
    run_id: str,
    subject: str,
    server_round: int,
    spend: PrivacySpend,
    *,
    delta: float,
    epsilon: float,
    recorded_at: str,
) -> LedgerRow:
    fields = spend.to_json()
    return LedgerRow(
        run_id=run_id,
        subject=subject,
        server_round=server_round,
        mechanism=spend.mechanism,
        rho=spend.rho,
        noise_multiplier=fields["noise_multiplier"],
        sample_rate=fields["sample_rate"],
        steps=fields["steps"],
        delta=delta,
        epsilon=epsilon,
        recorded_at=recorded_at,
    )
