"""The privacy ledger: what every round of a run spent, per subject, and the budget check.

A subject is ``"run"`` (the population-level guarantee of the aggregate) or a
client's enrolment id. Each entry stores the round's spend (rho of a zCDP
mechanism such as the distributed discrete Gaussian, or a subsampled Gaussian
event) and epsilon(delta) of *everything* the subject has spent so far,
recomputed by composing all its entries (:func:`strategies.composed_epsilon`),
so the stored totals never drift from the analysis. Before a round, the
coordinator asks :meth:`PrivacyLedger.check` whether it fits the run's budget
and :meth:`PrivacyLedger.check_lifetime` whether it fits each participant's
lifetime cap, and refuses it if not; the ledger itself never deletes or
rewrites an entry.

The stored totals are per run. A client's *lifetime* spend composes its rows
of every run (:meth:`PrivacyLedger.lifetime_spent`): a subject is the client's
enrolled identity, which outlives a run id, so a new run does not start it at zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, Select, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from fedge.errors import ConfigError, FedgeError, StorageError
from fl_server._ledger_rows import (
    RUN_SUBJECT,
    LedgerEntry,
    check_client,
    client_subjects,
    composed,
    entry_of,
    lifetime_query,
    named,
    new_row,
)
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.audit.checkpoints import Checkpoint
from fl_server.audit.events import JSONValue
from fl_server.db.schema import AuditHeadRow, LedgerRow
from fl_server.ledger_binding import (
    LEDGER_SECTION,
    Charge,
    ChargeKey,
    VerifiedSpends,
    check_rows,
    ledger_section,
)
from strategies.accounting import AccountantKind, PrivacySpend

__all__ = [
    "RUN_SUBJECT",
    "BudgetExceeded",
    "LedgerEntry",
    "PrivacyBudget",
    "PrivacyLedger",
    "RoundSpend",
]

_ROUND_ATTEMPTS = 20


class BudgetExceeded(FedgeError):  # noqa: N818 - reads as what happened
    """A round would take a subject past its privacy budget; it must not run."""


# What one round spends: a zCDP rho, a (subsampled) Gaussian event, or both.
RoundSpend = PrivacySpend


class PrivacyLedger:
    """Record and check privacy spending in the fedge database (SQLite or PostgreSQL).

    Every figure a budget check or a total uses comes from the ``privacy.spent``
    events of the audit chain, verified on the way (:class:`VerifiedSpends`);
    the rows it reads are compared with them first, so an edited, deleted or
    inserted row raises :class:`~fedge.errors.AuditIntegrityError` instead of
    changing a total.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        accountant: AccountantKind = AccountantKind.RDP,
        checkpoints: Sequence[Checkpoint] = (),
    ) -> None:
        """Use ``engine``; Gaussian-only subjects are accounted with ``accountant``.

        Zero-concentrated spends (distributed DP) and mixes always compose as RDP.
        ``checkpoints`` (signatures already checked against a trusted key) are
        what the chain must still reach: a tail cut off with its events is
        detected against them.
        """
        self._engine = engine
        self.accountant = accountant
        self._verified = VerifiedSpends(engine, checkpoints=checkpoints)

    def verify_trail(self) -> None:
        """Verify the chain (incrementally after the first call) against the known checkpoints.

        Raises
        ------
        AuditIntegrityError
            If the chain, its head or a checkpoint does not verify.
        """
        self._verified.refresh()

    def _verified_spends(
        self, subjects: Sequence[str], run_id: str | None
    ) -> dict[str, list[RoundSpend]]:
        """Return each subject's verified spends (in ``run_id``, else every run).

        Raises
        ------
        AuditIntegrityError
            If the trail does not verify or the rows disagree with it.
        """
        query = select(LedgerRow).where(LedgerRow.subject.in_(list(subjects)))
        if run_id is not None:
            query = query.where(LedgerRow.run_id == run_id)
        self._check(query, lambda: self._verified.subject_charges(subjects, run_id))
        return {
            subject: [c.spend for c in self._verified.charges(subject, run_id).values()]
            for subject in subjects
        }

    def spent(self, run_id: str, *, delta: float, subject: str = RUN_SUBJECT) -> float:
        """Return epsilon(delta) of everything ``subject`` has spent in ``run_id``."""
        spends = self._verified_spends([subject], run_id)[subject]
        return composed(spends, None, delta, self.accountant)

    def check(
        self,
        run_id: str,
        spend: RoundSpend,
        *,
        budget: float,
        delta: float,
        subject: str = RUN_SUBJECT,
    ) -> float:
        """Return the epsilon the round would bring ``subject`` to.

        Raises
        ------
        BudgetExceeded
            If that is above ``budget``.
        AuditIntegrityError
            If the trail or the rows behind the total do not verify.
        """
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"the epsilon budget must be a finite number > 0, got {budget}")
        spends = self._verified_spends([subject], run_id)[subject]
        projected = composed(spends, spend, delta, self.accountant)
        if projected > budget:
            who = "the run" if subject == RUN_SUBJECT else f"client {subject}"
            raise BudgetExceeded(
                f"the next round would take {who} to epsilon {projected:.4g} > "
                f"budget {budget:g} (delta {delta:g})"
            )
        return projected

    def lifetime_entries(self, subject: str) -> list[LedgerEntry]:
        """Return a client's entries of every run, in the order they were recorded.

        Raises
        ------
        ConfigError
            If ``subject`` is the run-level subject or not 1..128 characters.
        AuditIntegrityError
            If the rows disagree with the audit trail.
        """
        check_client(subject)
        self._verified_spends([subject], None)
        query = lifetime_query(subject)
        try:
            with Session(self._engine) as session:
                return [entry_of(row) for row in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the privacy ledger: {exc}") from exc

    def lifetime_spent(self, subject: str, *, delta: float) -> float:
        """Return epsilon(delta) of everything client ``subject`` has spent, over every run.

        Raises
        ------
        ConfigError
            If ``subject`` is the run-level subject or not 1..128 characters,
            or ``delta`` is outside (0, 1).
        AuditIntegrityError
            If the trail or the rows behind the total do not verify.
        """
        check_client(subject)
        spends = self._verified_spends([subject], None)[subject]
        return composed(spends, None, delta, self.accountant)

    def check_lifetime(
        self,
        subjects: Sequence[str],
        spend: RoundSpend,
        *,
        budget: float,
        delta: float,
    ) -> dict[str, float]:
        """Return the lifetime epsilon the round would bring each client in ``subjects`` to.

        Each subject's verified spends of every run are composed with ``spend`` added.

        Raises
        ------
        BudgetExceeded
            If any projection is above ``budget``; the message names the worst
            (at most five, then how many more) and nothing is recorded.
        ConfigError
            If ``budget`` is not a finite number > 0, ``delta`` is outside (0, 1),
            ``spend`` is not a spend, or a subject is the run-level one or not
            1..128 characters.
        AuditIntegrityError
            If the trail or the rows behind the totals do not verify.

        Notes
        -----
        A subject is the client's enrolled identity where it has one, so the cap
        holds across runs and run ids; a client known only by its Flower node id
        is capped only as long as it keeps that id.
        """
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError(
                f"the lifetime epsilon budget must be a finite number > 0, got {budget}"
            )
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if not isinstance(spend, RoundSpend):
            raise ConfigError(f"spend must be a PrivacySpend, got {type(spend).__name__}")
        wanted = client_subjects(subjects)
        if not wanted:
            return {}
        history = self._verified_spends(wanted, None)
        projected = {
            subject: composed(spends, spend, delta, self.accountant)
            for subject, spends in history.items()
        }
        over = sorted(
            (subject for subject, epsilon in projected.items() if epsilon > budget),
            key=lambda subject: (-projected[subject], subject),
        )
        if over:
            raise BudgetExceeded(
                f"the next round would take {named(over)} past the lifetime budget "
                f"{budget:g}: epsilon up to {projected[over[0]]:.4g} (delta {delta:g})"
            )
        return projected

    def record(
        self,
        run_id: str,
        server_round: int,
        spend: RoundSpend,
        *,
        delta: float,
        subject: str = RUN_SUBJECT,
    ) -> LedgerEntry:
        """Store one subject's spend for a round, with its own ``privacy.spent`` event.

        Raises
        ------
        StorageError
            If the round is already recorded for this subject or the database fails.
        """
        if not 0 < len(subject) <= 128:
            raise ConfigError("invalid run id, subject or round for the privacy ledger")
        totals = self.record_many(run_id, server_round, {subject: spend}, delta=delta)
        return LedgerEntry(
            run_id=run_id,
            subject=subject,
            server_round=server_round,
            mechanism=spend.mechanism,
            rho=spend.rho,
            delta=delta,
            epsilon=totals[subject],
            recorded_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        )

    def record_many(
        self,
        run_id: str,
        server_round: int,
        spends: Mapping[str, RoundSpend],
        *,
        delta: float,
    ) -> dict[str, float]:
        """Store one round's spend for many subjects, with one ``privacy.spent`` event.

        Raises
        ------
        StorageError
            If a subject already has this round or the database fails.
        """
        if not spends:
            return {}

        def payload(totals: dict[str, float]) -> dict[str, JSONValue]:
            return {"round": server_round, "delta": delta, "subjects": len(totals)}

        return self.record_round(
            run_id,
            server_round,
            spends,
            delta=delta,
            audit=AuditLog(self._engine),
            payload=payload,
        )

    def record_round(
        self,
        run_id: str,
        server_round: int,
        spends: Mapping[str, RoundSpend],
        *,
        delta: float,
        audit: AuditLog,
        payload: Callable[[dict[str, float]], Mapping[str, JSONValue]],
    ) -> dict[str, float]:
        """Store one round's rows (run and participants) and its audit event in ONE transaction.

        ``spends`` maps each subject (:data:`RUN_SUBJECT` for the run itself) to
        its spend; ``payload`` turns the new totals into the ``privacy.spent``
        event's payload, to which the ledger adds its own ``ledger`` section:
        exactly the rows written, which is what binds them to the chain. Totals
        compose the subject's *verified* earlier spends. A crash leaves either
        the rows and the event, or neither.

        Raises
        ------
        StorageError
            If a subject already has this round or the database fails.
        AuditIntegrityError
            If the trail or the subjects' rows do not verify.
        """
        if server_round < 0 or not 0 < len(run_id) <= 64:
            raise ConfigError("invalid run id or round for the privacy ledger")
        if any(not 0 < len(subject) <= 128 for subject in spends):
            raise ConfigError("a ledger subject has 1..128 characters")
        if audit.engine is not self._engine:
            raise ConfigError("the ledger and its audit log must share one database")
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        for attempt in range(_ROUND_ATTEMPTS):
            try:
                with Session(self._engine) as session, session.begin():
                    # Hold the head (PostgreSQL) so no other writer appends between the
                    # verification below and this round's event.
                    session.execute(
                        select(AuditHeadRow).where(AuditHeadRow.id == 1).with_for_update()
                    )
                    history = self._verified_spends(list(spends), run_id)
                    totals = self._add_rows(
                        session, run_id, server_round, spends, history, delta=delta, now=now
                    )
                    content = dict(payload(totals))
                    if LEDGER_SECTION in content:
                        raise ConfigError(f"the payload may not set {LEDGER_SECTION!r}")
                    content[LEDGER_SECTION] = ledger_section(
                        server_round, spends, totals, delta=delta
                    )
                    audit.append_in(session, AuditEventKind.PRIVACY_SPENT, content, run_id=run_id)
                    return totals
            except (IntegrityError, OperationalError) as exc:
                # Another writer (the gateway auditing a refusal, another run) moved the audit
                # head first, or SQLite refused to upgrade a stale snapshot: retry on a fresh
                # transaction; a duplicate row fails every time.
                if attempt + 1 == _ROUND_ATTEMPTS:
                    if isinstance(exc, IntegrityError):
                        raise StorageError(
                            f"round {server_round} of run {run_id} is already in the ledger"
                        ) from exc
                    raise StorageError(f"cannot write the privacy ledger: {exc}") from exc
                time.sleep(0.01 * (attempt + 1))
            except SQLAlchemyError as exc:
                raise StorageError(f"cannot write the privacy ledger: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _add_rows(
        self,
        session: Session,
        run_id: str,
        server_round: int,
        spends: Mapping[str, RoundSpend],
        history: Mapping[str, Sequence[RoundSpend]],
        *,
        delta: float,
        now: str,
    ) -> dict[str, float]:
        totals: dict[str, float] = {}
        for subject, spend in spends.items():
            epsilon = composed(history[subject], spend, delta, self.accountant)
            session.add(
                new_row(
                    run_id,
                    subject,
                    server_round,
                    spend,
                    delta=delta,
                    epsilon=epsilon,
                    recorded_at=now,
                )
            )
            totals[subject] = epsilon
        session.flush()
        return totals

    def _verified_run(
        self, run_id: str, server_round: int | None = None
    ) -> dict[ChargeKey, Charge]:
        """Return a run's verified charges (of one round), its rows checked against them."""
        query = select(LedgerRow).where(LedgerRow.run_id == run_id)
        if server_round is not None:
            query = query.where(LedgerRow.server_round == server_round)
        return self._check(query, lambda: self._verified.run_charges(run_id, server_round))

    def _check(
        self, query: Select[LedgerRow], expected: Callable[[], dict[ChargeKey, Charge]]
    ) -> dict[ChargeKey, Charge]:
        """Refresh the verified trail, then check the rows ``query`` selects against it.

        Raises
        ------
        AuditIntegrityError
            If the trail does not verify or the rows differ from ``expected()``.
        """
        self._verified.refresh()
        try:
            with Session(self._engine) as session:
                rows = list(session.scalars(query))
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the privacy ledger: {exc}") from exc
        charges = expected()
        check_rows(rows, charges)
        return charges

    def round_spends(self, run_id: str, server_round: int) -> dict[str, RoundSpend]:
        """Return what round ``server_round`` of ``run_id`` cost each subject (run included).

        Raises
        ------
        AuditIntegrityError
            If the trail or the round's rows do not verify.
        """
        charges = self._verified_run(run_id, server_round)
        return {key.subject: charge.spend for key, charge in charges.items()}

    def run_epsilon(self, run_id: str, *, delta: float) -> float | None:
        """Return the run's epsilon so far: its own spend, else its worst participant's.

        Client-level mechanisms charge the run itself; with sample-level DP only
        participants are charged, and the worst of them stands for the run.
        """
        run_level = self.spent(run_id, delta=delta)
        if run_level:
            return run_level
        worst = self.max_subject_epsilon(run_id)
        return None if worst is None else worst[1]

    def max_subject_epsilon(self, run_id: str) -> tuple[str, float] | None:
        """Return the client (not the run) with the largest verified epsilon, or None."""
        clients = [
            (charge.epsilon, key.subject)
            for key, charge in self._verified_run(run_id).items()
            if key.subject != RUN_SUBJECT
        ]
        if not clients:
            return None
        epsilon, subject = max(clients, key=lambda item: (item[0], item[1]))
        return subject, epsilon

    def latest_run_id(self) -> str | None:
        """Return the run of the newest entry, or None for an empty ledger."""
        query = select(LedgerRow.run_id).order_by(LedgerRow.id.desc()).limit(1)
        try:
            with Session(self._engine) as session:
                return session.scalars(query).first()
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the privacy ledger: {exc}") from exc

    def entries(self, run_id: str, *, subject: str | None = None) -> list[LedgerEntry]:
        """Return a run's entries in round order (every subject unless one is named).

        Raises
        ------
        AuditIntegrityError
            If the trail or the run's rows do not verify.
        """
        self._verified_run(run_id)
        query = select(LedgerRow).where(LedgerRow.run_id == run_id)
        if subject is not None:
            query = query.where(LedgerRow.subject == subject)
        try:
            with Session(self._engine) as session:
                rows = session.scalars(query.order_by(LedgerRow.subject, LedgerRow.server_round))
                return [entry_of(row) for row in rows]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read the privacy ledger: {exc}") from exc


@dataclass(slots=True, kw_only=True)
class PrivacyBudget:
    """A run's budget and where its spending is recorded (the server fills ``exhausted``).

    Parameters
    ----------
    ledger
        Where every round's spend goes.
    epsilon
        The run's epsilon budget; ``None`` records spending without a limit.
    delta
        The delta every epsilon is computed at, in (0, 1).
    client_lifetime_epsilon
        Each client's cap over every run it took part in (its rows of the whole
        ledger composed); ``None``: no cap.
    subject_name
        Maps a participant as the round names it (a Flower node id in a plain
        round) to the name the ledger keeps (the enrolled device id), so one id
        names a device in every ledger; ``None``: kept as given.
    """

    ledger: PrivacyLedger
    epsilon: float | None
    delta: float
    client_lifetime_epsilon: float | None = None
    exhausted: str | None = None
    subject_name: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"the epsilon budget must be a finite number > 0, got {self.epsilon}")
        lifetime = self.client_lifetime_epsilon
        if lifetime is not None and not (math.isfinite(lifetime) and lifetime > 0):
            raise ConfigError(
                f"the client lifetime epsilon must be a finite number > 0, got {lifetime}"
            )
