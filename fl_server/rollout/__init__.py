"""Canary rollout of signed model versions: plans, cohort health gates, the controller."""

from fl_server.rollout.controller import PRODUCTION, RolloutController
from fl_server.rollout.health import CohortHealth, DeviceHealth, GateResult, Verdict
from fl_server.rollout.plan import HealthGates, RolloutPlan, load_plan
from fl_server.rollout.records import RolloutRecord, RolloutStatus
from fl_server.rollout.state import RolloutState, Transition

__all__ = [
    "PRODUCTION",
    "CohortHealth",
    "DeviceHealth",
    "GateResult",
    "HealthGates",
    "RolloutController",
    "RolloutPlan",
    "RolloutRecord",
    "RolloutState",
    "RolloutStatus",
    "Transition",
    "Verdict",
    "load_plan",
]
