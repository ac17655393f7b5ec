"""A rollout plan: stages with bake times, the health gates a cohort must pass, abort rules.

The discipline is AWS IoT Greengrass v2's (rollout rate, abort thresholds on what
devices report, automatic rollback), applied to fedge's signed variants::

    [rollout]
    stages = [0.01, 0.10, 0.50, 1.0]   # fraction of the fleet in the cohort
    bake_s = 600                       # how long each stage runs before it may promote
    accuracy_floor = 0.80              # per device class, the fastest variant at least
                                       # this accurate (from device_profile events)

    [rollout.gates]
    min_devices = 5                    # distinct devices reporting before any decision
    min_report_fraction = 0.5          # ... and this share of the cohort
    max_error_rate = 0.01              # median per-device inference error rate
    max_accuracy_drop = 0.02           # pooled labelled accuracy vs the control group
    min_labelled = 300                 # labelled samples before the accuracy gate passes
    max_labelled_per_device = 1000     # what one device's feedback may weigh
    max_latency_p95_ms = 50.0          # median per-device p95
    max_crash_fraction = 0.02          # devices of the cohort that crashed
    max_rollback_fraction = 0.02       # devices that rolled back locally
    max_drift_fraction = 0.2           # devices whose inputs drifted
    min_failing_devices = 2            # a fraction gate fails only with this many devices

Notes
-----
No single device decides: error rate and latency are medians over devices (one
device's numbers move a median of three or more by at most one rank); accuracy is
pooled with each device's weight capped and must hold without the most extreme
device (a one-sided z-test at 1 % to fail, ``min_labelled`` samples to pass);
fraction gates need ``min_failing_devices`` distinct devices; nothing promotes before
``min_devices`` (and ``min_report_fraction`` of the cohort) have reported on the
new version. Missing data means *wait*, never *promote*.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedge.errors import ConfigError

__all__ = ["HealthGates", "RolloutPlan", "load_plan"]

_DEFAULT_STAGES = (0.01, 0.10, 0.50, 1.0)


def _number(where: str, value: object, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r:.40}")
    if not low <= value <= high:
        raise ConfigError(f"{where} must be in [{low}, {high}], got {value}")
    return float(value)


def _count(where: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {value!r:.40}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthGates:
    """What a cohort must show before its stage promotes; breaking one rolls back."""

    min_devices: int = 3
    min_report_fraction: float = 0.5
    max_error_rate: float = 0.01
    max_accuracy_drop: float = 0.02
    max_latency_p95_ms: float | None = None
    max_crash_fraction: float = 0.02
    max_rollback_fraction: float = 0.02
    max_drift_fraction: float = 0.25
    min_failing_devices: int = 2
    min_labelled: int = 300
    max_labelled_per_device: int = 1_000

    def __post_init__(self) -> None:
        # At least three reports before a median decides and two devices before a fraction
        # does: one device, however hostile its numbers, never promotes or aborts alone.
        _count("gates.min_devices", self.min_devices, low=3)
        _count("gates.min_failing_devices", self.min_failing_devices, low=2)
        _count("gates.min_labelled", self.min_labelled, low=1)
        _count("gates.max_labelled_per_device", self.max_labelled_per_device, low=1)
        _number("gates.min_report_fraction", self.min_report_fraction, low=0.0, high=1.0)
        for name in (
            "max_error_rate",
            "max_accuracy_drop",
            "max_crash_fraction",
            "max_rollback_fraction",
            "max_drift_fraction",
        ):
            _number(f"gates.{name}", getattr(self, name), low=0.0, high=1.0)
        if self.max_latency_p95_ms is not None:
            _number("gates.max_latency_p95_ms", self.max_latency_p95_ms, low=0.0)

    def to_json(self) -> dict[str, Any]:
        """Return the gates as JSON values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, raw: object) -> HealthGates:
        """Parse gates; every key is optional, an unknown one is refused by name."""
        return cls(**_known("gates", raw, {f.name for f in fields(cls)}))


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutPlan:
    """Stages (cohort fractions, increasing, ending at 1), bake time and gates."""

    stages: tuple[float, ...] = _DEFAULT_STAGES
    bake_s: float = 600.0
    gates: HealthGates = field(default_factory=HealthGates)
    # Per device class, the fastest offered variant whose signed accuracy is at least
    # this (from the devices' own measurements); None: every device uses its preference.
    accuracy_floor: float | None = None
    # The choice made at start (class -> artefact), signed into every directive.
    variants: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not self.stages:
            raise ConfigError("rollout.stages must be a non-empty list of fractions")
        previous = 0.0
        for index, stage in enumerate(self.stages):
            value = _number(f"rollout.stages[{index}]", stage, low=0.0, high=1.0)
            if value <= previous:
                raise ConfigError(
                    f"rollout.stages must increase strictly from above 0, got {list(self.stages)}"
                )
            previous = value
        if self.stages[-1] != 1.0:
            raise ConfigError(f"rollout.stages must end at 1.0 (the whole fleet): {self.stages}")
        _number("rollout.bake_s", self.bake_s, low=0.0)
        if not isinstance(self.gates, HealthGates):
            raise ConfigError("rollout.gates must be HealthGates")
        if self.accuracy_floor is not None:
            _number("rollout.accuracy_floor", self.accuracy_floor, low=0.0, high=1.0)
        if not isinstance(self.variants, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.variants.items()
        ):
            raise ConfigError("rollout.variants must map device classes to artefact names")
        object.__setattr__(self, "variants", MappingProxyType(dict(self.variants)))

    def to_json(self) -> dict[str, Any]:
        """Return the plan as JSON values (stored with the rollout)."""
        return {
            "stages": list(self.stages),
            "bake_s": self.bake_s,
            "gates": self.gates.to_json(),
            "accuracy_floor": self.accuracy_floor,
            "variants": dict(self.variants),
        }

    @classmethod
    def from_json(cls, raw: object) -> RolloutPlan:
        """Parse a plan (the ``[rollout]`` table of a plan file, or a stored plan)."""
        known = _known("rollout", raw, {"stages", "bake_s", "gates", "accuracy_floor", "variants"})
        stages = known.pop("stages", _DEFAULT_STAGES)
        if not isinstance(stages, list | tuple):
            raise ConfigError(f"rollout.stages must be a list of fractions, got {stages!r:.40}")
        gates = HealthGates.from_json(known.pop("gates", {}))
        variants = known.pop("variants", {})
        if not isinstance(variants, Mapping):
            raise ConfigError("rollout.variants must be a table of device class = artefact")
        return cls(stages=tuple(stages), gates=gates, variants=dict(variants), **known)


def _known(where: str, raw: object, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")
    return dict(raw)


def load_plan(path: Path) -> RolloutPlan:
    """Read a plan file (TOML with a ``[rollout]`` table); one clear error names a bad field."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"rollout plan {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read rollout plan {path}: {exc}") from exc
    unknown = sorted(set(document) - {"rollout"})
    if unknown or "rollout" not in document:
        raise ConfigError(f"rollout plan {path} must hold one [rollout] table (found {unknown})")
    try:
        return RolloutPlan.from_json(document["rollout"])
    except TypeError as exc:  # a value of the wrong shape reaching a constructor
        raise ConfigError(f"rollout plan {path}: {exc}") from exc
