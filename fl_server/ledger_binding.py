"""The privacy ledger bound to the audit chain: every row is stated by a chained event.

Each round's ledger rows are written in one transaction with a
``privacy.spent`` event whose ``ledger`` section lists them (what each subject
was charged, and its total after the round). The chain's hashes protect the
events; the rows are an index for queries. Budgets are checked against the
*events* (:class:`VerifiedSpends`), and every row read for a check is compared
with them, so deleting or editing rows is detected and never re-opens a
budget; cutting the events off the chain's tail is what signed checkpoints
(:mod:`fl_server.audit.checkpoints`) detect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import AuditIntegrityError, ConfigError, StorageError
from fl_server.audit.chain import ChainPosition, ChainWalker, read_head
from fl_server.audit.checkpoints import Checkpoint
from fl_server.audit.events import AuditEventKind, JSONValue, canonical_json
from fl_server.audit.log import AuditLog
from fl_server.db.schema import LedgerRow
from strategies.accounting import PrivacySpend

__all__ = [
    "LEDGER_SECTION",
    "STATING_KINDS",
    "Charge",
    "ChargeKey",
    "VerifiedSpends",
    "adopt_unbound_rows",
    "charge_of_row",
    "charges_in",
    "check_rows",
    "ledger_section",
    "unbound_rows",
]

LEDGER_SECTION = "ledger"
# The events whose ledger section states rows: a round's spend, and rows written before the
# ledger was bound to the chain that an operator adopted (`fedge audit adopt-ledger`).
STATING_KINDS = frozenset({AuditEventKind.PRIVACY_SPENT.value, AuditEventKind.LEDGER_ADOPTED.value})


@dataclass(frozen=True, slots=True)
class ChargeKey:
    """Which row: a run, a subject and a round (the ledger's unique key)."""

    run_id: str
    subject: str
    server_round: int


@dataclass(frozen=True, slots=True)
class Charge:
    """What one row states: the round's spend, the subject's total after it, and its delta."""

    spend: PrivacySpend
    epsilon: float
    delta: float


def ledger_section(
    server_round: int,
    spends: Mapping[str, PrivacySpend],
    totals: Mapping[str, float],
    *,
    delta: float,
) -> dict[str, JSONValue]:
    """Return the ``ledger`` section of a ``privacy.spent`` payload: exactly the rows written.

    Subjects charged the same spend are listed together, so a round of a
    thousand clients states one spend and a thousand names.
    """
    groups: dict[str, list[str]] = {}
    shapes: dict[str, dict[str, JSONValue]] = {}
    for subject in sorted(spends):
        shape = spends[subject].to_json()
        text = canonical_json(shape)
        shapes[text] = shape
        groups.setdefault(text, []).append(subject)
    charges: list[JSONValue] = [
        {**shapes[text], "subjects": list(subjects)} for text, subjects in groups.items()
    ]
    return {
        "round": server_round,
        "delta": delta,
        "charges": charges,
        "totals": {subject: float(totals[subject]) for subject in sorted(spends)},
    }


def charges_in(payload: Mapping[str, object], run_id: str | None) -> dict[ChargeKey, Charge]:
    """Return the rows a ``privacy.spent`` payload states (none if it has no ledger section).

    Raises
    ------
    ConfigError
        If the section is malformed (the payload verified, so a bug or a forger
        with the checkpoint key wrote it).
    """
    section = payload.get(LEDGER_SECTION)
    if section is None:
        return {}
    if not isinstance(section, dict) or run_id is None:
        raise ConfigError("a privacy.spent event's ledger section must be an object of a run")
    try:
        server_round = section["round"]
        delta = float(section["delta"])
        totals = section["totals"]
        charges = section["charges"]
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise ConfigError("round must be an integer")
        if not isinstance(totals, dict) or not isinstance(charges, list):
            raise ConfigError("totals must be an object and charges a list")
        stated: dict[ChargeKey, Charge] = {}
        for charge in charges:
            if not isinstance(charge, dict) or not isinstance(charge.get("subjects"), list):
                raise ConfigError("each charge must be an object with a list of subjects")
            spend = PrivacySpend.from_json(charge)
            for subject in charge["subjects"]:
                key = ChargeKey(run_id, str(subject), server_round)
                if key in stated:
                    raise ConfigError(f"subject {subject!r} is charged twice")
                stated[key] = Charge(spend=spend, epsilon=float(totals[subject]), delta=delta)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed ledger section: {exc}") from exc
    if len(stated) != len(totals):
        raise ConfigError("the ledger section's totals and charges name different subjects")
    return stated


def charge_of_row(row: LedgerRow) -> tuple[ChargeKey, Charge]:
    """Return what a stored ledger row states, in the events' terms."""
    spend = PrivacySpend.from_json(
        {
            "mechanism": row.mechanism,
            "rho": row.rho,
            "noise_multiplier": row.noise_multiplier,
            "sample_rate": row.sample_rate,
            "steps": row.steps,
        }
    )
    return (
        ChargeKey(row.run_id, row.subject, row.server_round),
        Charge(spend=spend, epsilon=row.epsilon, delta=row.delta),
    )


class VerifiedSpends:
    """Every charge the chain states, read once and then incrementally, checked on the way.

    Parameters
    ----------
    engine
        The database of the audit log and the ledger.
    checkpoints
        Signed checkpoints the chain must still reach and match (their
        signatures checked by the caller against a trusted key).

    Notes
    -----
    The first :meth:`refresh` walks the whole chain; later ones only the
    records appended since. Any damage (a bad link or hash, a head that moved
    back, a checkpoint the chain no longer matches) raises
    :class:`AuditIntegrityError`: a budget is never checked against a trail
    that does not verify.
    """

    def __init__(self, engine: Engine, *, checkpoints: Sequence[Checkpoint] = ()) -> None:
        self._engine = engine
        self._position = ChainPosition()
        self._subjects: dict[str, dict[tuple[str, int], Charge]] = {}
        self._runs: dict[str, dict[ChargeKey, Charge]] = {}
        self._checkpoints = sorted(checkpoints, key=lambda c: c.seq)

    @property
    def position(self) -> ChainPosition:
        """The last record verified."""
        return self._position

    def refresh(self) -> None:
        """Verify and fold the records appended since the last refresh.

        Raises
        ------
        AuditIntegrityError
            If the chain, its head or a checkpoint does not verify.
        StorageError
            If the database cannot be read.
        """
        head = read_head(self._engine)
        if head is None:
            raise AuditIntegrityError("the audit log's head row is missing")
        if head.seq < self._position.seq:
            raise AuditIntegrityError(
                f"the audit head moved back from record {self._position.seq} to {head.seq}: "
                "records were cut off the chain"
            )
        walker = ChainWalker(self._engine, self._position)
        wanted = {c.seq: c for c in self._checkpoints if c.seq > self._position.seq}
        for row in walker.walk(upto=head.seq):
            if row.problem:
                raise AuditIntegrityError(f"the audit trail does not verify: {row.problem}")
            checkpoint = wanted.get(row.seq)
            if checkpoint is not None and checkpoint.head_hash != row.record_hash:
                raise AuditIntegrityError(
                    f"record {row.seq} differs from the checkpoint signed at "
                    f"{checkpoint.signed_at}: the chain was rewritten"
                )
            if row.kind in STATING_KINDS and row.payload is not None:
                try:
                    stated = charges_in(row.payload, row.run_id)
                except ConfigError as exc:
                    raise AuditIntegrityError(f"record {row.seq}: {exc}") from exc
                for key, charge in stated.items():
                    by_subject = self._subjects.setdefault(key.subject, {})
                    by_subject[(key.run_id, key.server_round)] = charge
                    self._runs.setdefault(key.run_id, {})[key] = charge
        last = walker.position
        if (last.seq, last.record_hash) != (head.seq, head.record_hash):
            raise AuditIntegrityError(
                f"the audit head names record {head.seq} but the chain ends at record {last.seq}"
            )
        beyond = [c for c in self._checkpoints if c.seq > last.seq]
        if beyond:
            newest = beyond[-1]
            raise AuditIntegrityError(
                f"the chain ends at record {last.seq} but a checkpoint signed at "
                f"{newest.signed_at} names record {newest.seq}: its tail was cut off"
            )
        self._position = last

    def charges(self, subject: str, run_id: str | None = None) -> dict[tuple[str, int], Charge]:
        """Return ``subject``'s verified charges by (run, round), of one run or of all."""
        found = self._subjects.get(subject, {})
        if run_id is None:
            return dict(found)
        return {key: c for key, c in found.items() if key[0] == run_id}

    def subject_charges(
        self, subjects: Sequence[str], run_id: str | None = None
    ) -> dict[ChargeKey, Charge]:
        """Return the verified charges of ``subjects`` (in ``run_id``, else every run)."""
        return {
            ChargeKey(run, subject, server_round): charge
            for subject in subjects
            for (run, server_round), charge in self.charges(subject, run_id).items()
        }

    def all_charges(self) -> dict[ChargeKey, Charge]:
        """Return every verified charge of every run."""
        return {key: charge for charges in self._runs.values() for key, charge in charges.items()}

    def run_charges(self, run_id: str, server_round: int | None = None) -> dict[ChargeKey, Charge]:
        """Return the verified charges of a run (of one of its rounds when given)."""
        found = self._runs.get(run_id, {})
        if server_round is None:
            return dict(found)
        return {key: c for key, c in found.items() if key.server_round == server_round}


def check_rows(rows: Sequence[LedgerRow], expected: Mapping[ChargeKey, Charge]) -> None:
    """Raise unless ``rows`` state exactly the ``expected`` (verified) charges.

    Raises
    ------
    AuditIntegrityError
        Naming the first row that was edited, added or deleted.
    """
    stored = dict(charge_of_row(row) for row in rows)
    for key, charge in expected.items():
        found = stored.pop(key, None)
        where = f"{key.subject} in round {key.server_round} of run {key.run_id}"
        if found is None:
            raise AuditIntegrityError(
                f"the privacy ledger lost the row of {where}: the audit trail records it "
                "(run `fedge audit verify`)"
            )
        if found != charge:
            raise AuditIntegrityError(
                f"the privacy ledger row of {where} differs from the audit trail: it was edited"
            )
    if stored:
        key = next(iter(stored))
        raise AuditIntegrityError(
            f"the privacy ledger holds a row of {key.subject} in round {key.server_round} of "
            f"run {key.run_id} that no audit event records: it was inserted (or written by a "
            "fedge older than the bound ledger: `fedge audit adopt-ledger`)"
        )


def unbound_rows(engine: Engine, stated: Mapping[ChargeKey, Charge]) -> list[LedgerRow]:
    """Return the ledger rows no chained event states, in the order they were written.

    Raises
    ------
    StorageError
        If the ledger cannot be read.
    """
    try:
        with Session(engine) as session:
            rows = list(session.scalars(select(LedgerRow).order_by(LedgerRow.id)))
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the privacy ledger: {exc}") from exc
    return [row for row in rows if charge_of_row(row)[0] not in stated]


def adopt_unbound_rows(engine: Engine, verified: VerifiedSpends, audit: AuditLog) -> int:
    """State every unbound ledger row in a chained ``privacy.ledger_adopted`` event.

    For a database written before the ledger was bound to the chain (its
    ``privacy.spent`` events have no ledger section): each (run, round) group of
    rows gets one event stating them exactly, so budgets can be checked again.
    The rows are adopted *as they are now*: the operator vouches that they
    were not edited before adoption, and the event records when that happened.

    Returns
    -------
    int
        How many rows were adopted.

    Raises
    ------
    AuditIntegrityError
        If the chain does not verify (nothing is adopted over a damaged trail).
    """
    verified.refresh()
    stated = verified.all_charges()
    rows = unbound_rows(engine, stated)
    groups: dict[tuple[str, int], list[LedgerRow]] = {}
    for row in rows:
        groups.setdefault((row.run_id, row.server_round), []).append(row)
    for (run_id, server_round), members in groups.items():
        charges = dict(charge_of_row(row) for row in members)
        deltas = {charge.delta for charge in charges.values()}
        if len(deltas) != 1:
            raise ConfigError(
                f"round {server_round} of run {run_id} has rows at several deltas: adopt by hand"
            )
        section = ledger_section(
            server_round,
            {key.subject: charge.spend for key, charge in charges.items()},
            {key.subject: charge.epsilon for key, charge in charges.items()},
            delta=deltas.pop(),
        )
        audit.append(
            AuditEventKind.LEDGER_ADOPTED,
            {"round": server_round, "rows": len(members), LEDGER_SECTION: section},
            run_id=run_id,
        )
    return len(rows)
