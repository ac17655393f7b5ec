"""Where a run's privacy spending goes: the :class:`SpendSink` protocol and the ledger's sink.

Every DP mechanism of a run records through one sink: the server-side wrapper
(:class:`fl_server.dp_strategy.DifferentialPrivacy`: central, local and
sample-level DP) and the secure Grid's distributed DP. :class:`LedgerSink`
writes to the privacy ledger (the run and each participant) and appends one
``privacy.spent`` audit event per round, and refuses a round that would take
a participant past its lifetime cap (the budget's ``client_lifetime_epsilon``,
composed over every run). A user's own sink (a metrics exporter, a second
ledger) only has to implement the three methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from fedge.errors import ConfigError
from fl_server.audit import AuditLog
from fl_server.ledger import RUN_SUBJECT, PrivacyBudget
from strategies.accounting import PrivacySpend

__all__ = ["LedgerSink", "SpendSink"]


@runtime_checkable
class SpendSink(Protocol):
    """Where a private strategy reports spending (the ledger, the audit log)."""

    def check(self, spend: PrivacySpend) -> None:
        """Raise (e.g. ``BudgetExceeded``) if the round would exceed the run's budget."""
        ...

    def check_participants(self, subjects: Sequence[str], spend: PrivacySpend) -> None:
        """Raise (e.g. ``BudgetExceeded``) if ``spend`` would take a participant past its cap.

        Called once the round's participants are known (``subjects``: enrolment
        ids, else Flower node ids as text) and before anything of the round is
        released or recorded.
        """
        ...

    def spent(
        self,
        server_round: int,
        spend: PrivacySpend | None,
        participants: Mapping[str, PrivacySpend],
        details: dict[str, Any],
    ) -> None:
        """Record the run-level spend (if any) and each participant's own.

        ``participants`` maps each subject inside the round's aggregate (an
        enrolment id, else a Flower node id as text) to what the round cost it.
        """
        ...


class LedgerSink:
    """Hand a run's spending to the privacy ledger (run and participants) and the audit log.

    Parameters
    ----------
    budget
        The run's ledger, budget (epsilon, or None for no limit) and delta.
    audit
        Where each round's ``privacy.spent`` event goes.
    run_id
        The run the rows and events belong to.
    mechanism
        The mechanism's name in the events (``PrivacyMechanism.value``).
    """

    def __init__(self, budget: PrivacyBudget, audit: AuditLog, run_id: str, mechanism: str) -> None:
        self._budget = budget
        self._audit = audit
        self._run_id = run_id
        self._mechanism = mechanism

    def check(self, spend: PrivacySpend) -> None:
        """Raise ``BudgetExceeded`` if ``spend`` would take the run past its budget."""
        if self._budget.epsilon is not None:
            self._budget.ledger.check(
                self._run_id, spend, budget=self._budget.epsilon, delta=self._budget.delta
            )

    def check_participants(self, subjects: Sequence[str], spend: PrivacySpend) -> None:
        """Raise ``BudgetExceeded`` if ``spend`` would take a subject past its lifetime cap.

        Does nothing without a ``client_lifetime_epsilon`` in the budget. The
        refused round is recorded nowhere: the caller stops before :meth:`spent`.
        """
        cap = self._budget.client_lifetime_epsilon
        if cap is not None:
            self._budget.ledger.check_lifetime(
                [self._name(s) for s in subjects], spend, budget=cap, delta=self._budget.delta
            )

    def _name(self, subject: str) -> str:
        namer = self._budget.subject_name
        return subject if namer is None else namer(subject)

    def spent(
        self,
        server_round: int,
        spend: PrivacySpend | None,
        participants: Mapping[str, PrivacySpend],
        details: dict[str, Any],
    ) -> None:
        """Record the run's spend and each participant's, then append the audit event."""
        ledger, delta = self._budget.ledger, self._budget.delta
        payload: dict[str, Any] = {
            "round": server_round,
            "mechanism": self._mechanism,
            "delta": delta,
            "budget": self._budget.epsilon,
            **details,
        }
        spends: dict[str, PrivacySpend] = {self._name(k): v for k, v in participants.items()}
        if spend is not None:
            if RUN_SUBJECT in spends:
                raise ConfigError(f"a participant may not be named {RUN_SUBJECT!r}")
            spends[RUN_SUBJECT] = spend
            if spend.rho > 0:
                payload["rho"] = spend.rho
            if spend.gaussian is not None:
                payload["noise_multiplier"] = spend.gaussian.noise_multiplier
                payload["sample_rate"] = spend.gaussian.sample_rate

        def event(totals: dict[str, float]) -> dict[str, Any]:
            clients = {k: v for k, v in totals.items() if k != RUN_SUBJECT}
            if RUN_SUBJECT in totals:
                payload["epsilon"] = totals[RUN_SUBJECT]
            if clients:
                payload["max_client_epsilon"] = max(clients.values())
                payload["clients_charged"] = len(clients)
            return payload

        # The run's row, every participant's row and the audit event: one transaction.
        ledger.record_round(
            self._run_id, server_round, spends, delta=delta, audit=self._audit, payload=event
        )
