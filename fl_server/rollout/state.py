"""The rollout state machine: its states, and which transitions exist.

::

    start ──> running(stage 0) ──promote/bake+gates pass──> running(stage i+1) ── ... ──> completed
                 │   ^                                                                  │
           pause │   │ resume                                                           │ rollback
                 v   │                                                                  v
               paused ──────────────── rollback / gates fail ─────────────────────> rolled_back

Every transition is persisted with a signed release directive and an audit event
in one transaction; ``completed`` and ``rolled_back`` admit no automatic moves
(a completed rollout can still be rolled back by hand, which the fleet follows).
"""

from __future__ import annotations

from enum import Enum

from fedge.errors import ConfigError

__all__ = ["RolloutState", "Transition", "check_transition"]


class RolloutState(Enum):
    """Where a rollout is."""

    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


class Transition(Enum):
    """What moves a rollout."""

    START = "start"
    ADVANCE = "advance"  # the next stage (or completed after the last)
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"


_ALLOWED: dict[Transition, frozenset[RolloutState | None]] = {
    Transition.START: frozenset({None}),
    Transition.ADVANCE: frozenset({RolloutState.RUNNING, RolloutState.PAUSED}),
    Transition.PAUSE: frozenset({RolloutState.RUNNING}),
    Transition.RESUME: frozenset({RolloutState.PAUSED}),
    Transition.ROLLBACK: frozenset(
        {RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED}
    ),
}


def check_transition(state: RolloutState | None, transition: Transition) -> None:
    """Raise :class:`ConfigError` if ``transition`` cannot happen from ``state``."""
    if state not in _ALLOWED[transition]:
        where = "a new rollout" if state is None else f"a {state.value} rollout"
        raise ConfigError(f"cannot {transition.value} {where}")
