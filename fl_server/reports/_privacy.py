"""The differential-privacy section: the ledger's numbers in NIST SP 800-226 terms.

Every epsilon shown comes from the privacy ledger: the total is
:meth:`fl_server.ledger.PrivacyLedger.run_epsilon`, the per-round values are
the ledger's stored totals after each round. The ``privacy.spent`` events only
add what the ledger does not keep (whether a round was abandoned, the clip
norm), and only from intact records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fedge.errors import FedgeError
from fl_server.reports._gather import ConfigView, RunRecords, as_float, as_int, median
from fl_server.reports.model import (
    ClientBudget,
    ClientBudgets,
    DifferentialPrivacy,
    DpRound,
    ExhaustionEvent,
)
from fl_server.reports.terms import DP_TERMS, NO_DP

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from fl_server.db.schema import LedgerRow
    from strategies.accounting import AccountantKind

__all__ = ["dp_section", "run_epsilon", "sample_withheld"]

_NEAR_CAP = 0.9


def sample_withheld(view: ConfigView) -> str | None:
    """Return why the round samples must not be listed, or None if they may be.

    Where a run claims amplification by (Poisson) client sampling, its
    guarantee rests on the sample staying secret: a report lists counts only.
    """
    if view.dp_mode == "central" and (view.poisson_sampling or view.fraction < 1):
        return (
            "this run samples clients for amplification by sampling; its guarantee rests on "
            "the sample staying secret, so the report gives counts only, never who took part "
            "in which round or how often"
        )
    return None


def _amplification(view: ConfigView) -> tuple[bool, str | None]:
    from fl_server.privacy import PrivacyMechanism, amplification
    from strategies.dp_mode import DpMode

    try:
        mechanism = PrivacyMechanism.of(DpMode(view.dp_mode))
    except ValueError:  # "off" (ConfigError) or a mode this fedge does not know
        return False, None
    claim = amplification(
        mechanism, poisson_sampling=view.poisson_sampling, fraction=max(view.fraction, 1e-9)
    )
    return claim.claimed, claim.reason


def _noise_multiplier(view: ConfigView, rows: Sequence[LedgerRow]) -> float | None:
    # Shared-noise DP-SGD sizes its noise from the budget: the ledger holds what was charged.
    if view.dp_mode == "sample-distributed":
        charged = [r.noise_multiplier for r in rows if r.noise_multiplier is not None]
        return min(charged, default=None)
    return view.noise_multiplier


def _per_round(
    rows: Sequence[LedgerRow], records: RunRecords, run_level: bool
) -> tuple[DpRound, ...]:
    by_round: dict[int, list[LedgerRow]] = defaultdict(list)
    for row in rows:
        by_round[row.server_round].append(row)
    abandoned = {
        as_int(p.get("round")) for p in records.intact("privacy.spent") if p.get("abandoned")
    }
    result: list[DpRound] = []
    previous = 0.0
    worst = 0.0
    for server_round in sorted(by_round):
        round_rows = by_round[server_round]
        clients = [r for r in round_rows if r.subject != "run"]
        own = next((r for r in round_rows if r.subject == "run"), None)
        if run_level:
            cumulative = own.epsilon if own is not None else None
        else:
            worst = max([worst, *(r.epsilon for r in clients)])
            cumulative = worst
        example = own if own is not None else (clients[0] if clients else None)
        result.append(
            DpRound(
                round=server_round,
                mechanism=example.mechanism if example is not None else "",
                epsilon_round=None if cumulative is None else max(cumulative - previous, 0.0),
                epsilon_cumulative=cumulative,
                rho=example.rho if example is not None and example.rho else None,
                noise_multiplier=example.noise_multiplier if example is not None else None,
                sample_rate=example.sample_rate if example is not None else None,
                clients_charged=len(clients),
                abandoned=server_round in abandoned,
            )
        )
        if cumulative is not None:
            previous = cumulative
    return tuple(result)


def _clients(
    engine: Engine,
    rows: Sequence[LedgerRow],
    *,
    cap: float | None,
    delta: float | None,
    accountant: str,
    listed: bool,
) -> ClientBudgets:
    from fl_server.ledger import PrivacyLedger
    from strategies.accounting import AccountantKind

    latest: dict[str, LedgerRow] = {}
    for row in rows:  # by round: the last row of a subject holds its total
        if row.subject != "run":
            latest[row.subject] = row
    ledger = PrivacyLedger(engine, accountant=AccountantKind(accountant))
    budgets: list[ClientBudget] = []
    over = 0
    verified = True
    for subject in sorted(latest):
        lifetime = None
        if delta is not None and 0 < delta < 1 and verified:
            try:
                lifetime = ledger.lifetime_spent(subject, delta=delta)
            except FedgeError:  # the ledger does not verify: no lifetime figure
                verified = False
        if cap is None:
            status = "no lifetime cap set"
        elif lifetime is None:
            status = "lifetime epsilon unavailable (the ledger does not verify)"
        elif lifetime > cap:
            status, over = "over the lifetime cap", over + 1
        elif lifetime >= _NEAR_CAP * cap:
            status = "within the lifetime cap (90 % or more used)"
        else:
            status = "within the lifetime cap"
        budgets.append(
            ClientBudget(
                subject=subject,
                run_epsilon=latest[subject].epsilon,
                lifetime_epsilon=lifetime,
                status=status,
            )
        )
    epsilons = [row.epsilon for row in latest.values()]
    return ClientBudgets(
        charged=len(latest),
        max_epsilon=max(epsilons, default=None),
        median_epsilon=median(epsilons),
        lifetime_cap=cap,
        over_lifetime_cap=over,
        listed=listed,
        clients=tuple(budgets) if listed else (),
    )


def run_epsilon(
    engine: Engine, run_id: str, accountant: AccountantKind, delta: float | None
) -> tuple[float | None, str | None]:
    """Return the ledger's run epsilon, or None and why the ledger refused to give it."""
    from fl_server.ledger import PrivacyLedger

    if delta is None:
        return None, None
    try:
        return PrivacyLedger(engine, accountant=accountant).run_epsilon(run_id, delta=delta), None
    except FedgeError as exc:  # the ledger does not verify against the trail: say so
        return None, f"the privacy ledger's epsilon cannot be verified: {exc}"


def device_epsilon(records: RunRecords) -> float | None:
    """Return the worst device epsilon the run's end record states, if it states one."""
    end = records.end
    if end is None or end.problem is not None or not isinstance(end.payload, Mapping):
        return None
    privacy = end.payload.get("privacy")
    if not isinstance(privacy, Mapping):
        return None
    return as_float(privacy.get("max_device_epsilon"))


def dp_section(
    engine: Engine, records: RunRecords, view: ConfigView, rows: Sequence[LedgerRow]
) -> DifferentialPrivacy:
    """Return the DP section of the run: NIST terms, the ledger's epsilons, budget status."""
    from strategies.accounting import AccountantKind

    enabled = view.dp_mode != "off"
    terms = DP_TERMS.get(view.dp_mode, NO_DP) if enabled else NO_DP
    accountant = AccountantKind.PRV if view.dp_mode == "sample" else AccountantKind.RDP
    delta = rows[-1].delta if rows else view.delta
    run_level = any(row.subject == "run" for row in rows)
    total, problem = run_epsilon(engine, records.run_id, accountant, delta if rows else None)
    stored = [r.epsilon for r in rows if r.subject == "run"] or [r.epsilon for r in rows]
    spent = records.intact("privacy.spent")
    clips = [as_float(p.get("l2_clip")) for p in spent]
    clip = next((c for c in clips if c is not None), view.clip)
    exhausted = tuple(
        ExhaustionEvent(
            seq=r.seq,
            recorded_at=r.recorded_at,
            reason=str(r.payload.get("reason")) if r.payload.get("reason") is not None else None,
        )
        for r in records.intact_records("privacy.budget_exhausted")
    )
    if not enabled:
        status = "no differential privacy"
    elif problem is not None:
        status = "cannot be verified: the privacy ledger does not match the audit trail"
    elif exhausted:
        status = "exhausted: the run stopped before a round would exceed a budget"
    elif view.epsilon_budget is None:
        status = "no run budget set (spending recorded without a limit)"
    elif total is None and device_epsilon(records) is not None:
        device = device_epsilon(records)
        status = (
            "enforced by each device's own ledger: worst device "
            + ("over" if device is not None and device > view.epsilon_budget else "within")
            + " budget"
        )
    elif total is not None and total > view.epsilon_budget:
        status = "over budget"
    else:
        status = "within budget"
    claimed, reason = _amplification(view)
    sampling = f"client fraction {view.fraction:g}, " + (
        "Poisson (independent CSPRNG coin flips)" if view.poisson_sampling else "fixed size"
    )
    return DifferentialPrivacy(
        enabled=enabled,
        mode=view.dp_mode,
        mechanism=rows[-1].mechanism if rows else None,
        unit_of_privacy=terms.unit_of_privacy,
        neighbouring_relation=terms.neighbouring_relation,
        noise_added_where=terms.noise_added_where,
        protects_against=terms.protects_against,
        trusted=terms.trusted,
        clip_norm=clip if enabled else None,
        adaptive_clipping=view.adaptive_clip,
        noise_multiplier=_noise_multiplier(view, rows) if enabled else None,
        sampling=sampling,
        amplification_claimed=claimed,
        amplification_reason=reason,
        accountant=terms.accountant,
        delta=delta if enabled else None,
        epsilon_budget=view.epsilon_budget,
        epsilon_total=total,
        epsilon_stored=max(stored, default=None),
        device_epsilon=device_epsilon(records),
        ledger_problem=problem,
        budget_status=status,
        per_round=_per_round(rows, records, run_level),
        clients=_clients(
            engine,
            rows,
            cap=view.client_lifetime_epsilon,
            delta=delta,
            accountant=accountant.value,
            listed=sample_withheld(view) is None,
        ),
        exhaustion_events=exhausted,
    )
