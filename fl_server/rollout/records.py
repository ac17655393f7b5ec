"""What the rollout controller stores and reports: a rollout record and its live status."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edge_runtime.release import SignedDirective
from fedge.errors import ConfigError, StorageError
from fl_server.db.schema import RolloutRow
from fl_server.rollout.health import GateResult, Verdict
from fl_server.rollout.plan import RolloutPlan
from fl_server.rollout.state import RolloutState

__all__ = ["RolloutRecord", "RolloutStatus", "record_of"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutRecord:
    """A rollout as stored."""

    id: str
    model: str
    version: int
    previous: int | None
    plan: RolloutPlan
    state: RolloutState
    stage: int
    stage_started_at: float
    created_at: str
    updated_at: str
    reason: str | None

    @property
    def fraction(self) -> float:
        """The cohort fraction of the current stage."""
        return self.plan.stages[self.stage]

    @property
    def last_stage(self) -> bool:
        """Whether the current stage is the whole fleet."""
        return self.stage == len(self.plan.stages) - 1

    def to_json(self) -> dict[str, Any]:
        """Return the rollout as JSON values."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "previous": self.previous,
            "state": self.state.value,
            "stage": self.stage,
            "fraction": self.fraction,
            "stage_started_at": self.stage_started_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "reason": self.reason,
            "plan": self.plan.to_json(),
        }


def record_of(row: RolloutRow) -> RolloutRecord:
    """Return the record of a stored rollout row (its plan parsed and validated)."""
    try:
        plan = RolloutPlan.from_json(json.loads(row.plan))
    except (ValueError, ConfigError, TypeError) as exc:
        raise StorageError(f"rollout {row.id}: stored plan unreadable: {exc}") from exc
    return RolloutRecord(
        id=row.id,
        model=row.model,
        version=row.version,
        previous=row.previous_version,
        plan=plan,
        state=RolloutState(row.state),
        stage=row.stage,
        stage_started_at=row.stage_started_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reason=row.reason,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutStatus:
    """A rollout, what its cohort reported and what the gates make of it."""

    record: RolloutRecord
    verdict: Verdict
    gates: list[GateResult]
    expected_devices: int
    target_devices: int
    reporting_devices: int
    control_devices: int
    malformed_events: int
    bake_left_s: float
    directive: SignedDirective | None

    def to_json(self) -> dict[str, Any]:
        """Return the status as JSON values."""
        return {
            **self.record.to_json(),
            "verdict": self.verdict.value,
            "gates": [gate.to_json() for gate in self.gates],
            "cohort": {
                "expected": self.expected_devices,
                "on_new_version": self.target_devices,
                "reporting": self.reporting_devices,
                "control": self.control_devices,
                "malformed_events": self.malformed_events,
            },
            "bake_left_s": self.bake_left_s,
            "directive": None if self.directive is None else self.directive.to_json(),
        }
