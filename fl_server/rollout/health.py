"""Cohort health from what devices report, and the gates' verdict on it.

Devices publish signed events (:mod:`edge_runtime.device_events`), which the
cloud stores once per (device, sequence number) (:mod:`fl_server.events`). This
module reads the ones of one model since a stage began, sums them per device
and per version, and judges the *target* group (devices that report the new
version) against the gates and against the *control* group (devices still on
the previous version): a canary is compared with the fleet beside it, under the
same traffic, not with a number measured once at publish time.

Event bodies the rollout agent sends (every field validated; a malformed body is
counted and ignored, never trusted)::

    health             {"model", "version", "inferences", "errors", "labelled",
                        "correct", "latency_p95_ms" (or null), "opted_out"}
    crash              {"model", "version"}
    model_rolled_back  {"model", "from_version", "to_version"}
    drift              {"model", "version", "drifted"}
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from edge_runtime.device_events import EventKind
from fl_server.events.store import StoredEvent
from fl_server.rollout.plan import HealthGates

__all__ = [
    "CohortHealth",
    "DeviceHealth",
    "GateResult",
    "Verdict",
    "collect",
    "evaluate",
]

HEALTH_KINDS = (EventKind.HEALTH, EventKind.CRASH, EventKind.MODEL_ROLLED_BACK, EventKind.DRIFT)


class Verdict(Enum):
    """What the gates say about a cohort."""

    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    WAIT = "wait"  # not enough data: never a reason to promote


@dataclass(slots=True)
class DeviceHealth:
    """One device's reports on one version since the stage began."""

    device: str
    version: int
    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    latencies: list[float] = field(default_factory=list)
    crashed: bool = False
    rolled_back: bool = False
    drifted: bool = False

    @property
    def reported(self) -> bool:
        """Whether the device has served (and reported) at least one inference."""
        return self.inferences > 0

    @property
    def error_rate(self) -> float:
        """Errors per inference."""
        return self.errors / self.inferences if self.inferences else 0.0

    @property
    def accuracy(self) -> float | None:
        """Accuracy on labelled feedback, if the device has any."""
        return self.correct / self.labelled if self.labelled else None

    @property
    def latency_p95_ms(self) -> float | None:
        """The median of the p95s it reported."""
        return statistics.median(self.latencies) if self.latencies else None


@dataclass(frozen=True, slots=True)
class CohortHealth:
    """The target group (new version), the control group (previous), what was malformed."""

    target: Mapping[str, DeviceHealth]
    control: Mapping[str, DeviceHealth]
    opted_out: frozenset[str]
    malformed: int


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate: its measured value, its limit and its verdict."""

    name: str
    value: float | None
    limit: float | None
    verdict: Verdict
    detail: str

    def to_json(self) -> dict[str, Any]:
        """Return the result as JSON values."""
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "verdict": self.verdict.value,
            "detail": self.detail,
        }


def _count(body: Mapping[str, Any], key: str) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ValueError(key)
    return value


def _version(body: Mapping[str, Any], key: str) -> int:
    value = _count(body, key)
    if value < 1:
        raise ValueError(key)
    return value


def _health_body(body: Mapping[str, Any]) -> tuple[int, int, int, int, float | None, bool]:
    inferences, errors = _count(body, "inferences"), _count(body, "errors")
    labelled, correct = _count(body, "labelled"), _count(body, "correct")
    latency = body.get("latency_p95_ms")
    opted = body.get("opted_out", False)
    if errors > inferences or correct > labelled or not isinstance(opted, bool):
        raise ValueError("counts")
    if latency is not None and (
        isinstance(latency, bool)
        or not isinstance(latency, int | float)
        or not math.isfinite(latency)
        or latency < 0
    ):
        raise ValueError("latency_p95_ms")
    return inferences, errors, labelled, correct, latency, opted


class _Groups:
    """Per-device health of the target version and of the previous one."""

    def __init__(self, version: int, previous: int | None) -> None:
        self.version, self.previous = version, previous
        self.target: dict[str, DeviceHealth] = {}
        self.control: dict[str, DeviceHealth] = {}
        self.opted_out: set[str] = set()

    def entry(self, device: str, reported: int) -> DeviceHealth | None:
        if reported == self.version:
            group = self.target
        elif self.previous is not None and reported == self.previous:
            group = self.control
        else:
            return None
        return group.setdefault(device, DeviceHealth(device=device, version=reported))

    def add(self, event: StoredEvent, body: Mapping[str, Any]) -> None:
        if event.kind is EventKind.HEALTH:
            inferences, errors, labelled, correct, latency, opted = _health_body(body)
            entry = self.entry(event.device, _version(body, "version"))
            if opted:
                self.opted_out.add(event.device)
            if entry is not None:
                entry.inferences += inferences
                entry.errors += errors
                entry.labelled += labelled
                entry.correct += correct
                if latency is not None:
                    entry.latencies.append(float(latency))
        elif event.kind is EventKind.CRASH:
            if (entry := self.entry(event.device, _version(body, "version"))) is not None:
                entry.crashed = True
        elif event.kind is EventKind.MODEL_ROLLED_BACK:
            _version(body, "to_version")
            if (entry := self.entry(event.device, _version(body, "from_version"))) is not None:
                entry.rolled_back = True
        elif event.kind is EventKind.DRIFT:
            drifted = body["drifted"]
            if not isinstance(drifted, bool):
                raise ValueError("drifted")
            entry = self.entry(event.device, _version(body, "version"))
            if entry is not None and drifted:
                entry.drifted = True


def collect(
    events: Iterable[StoredEvent], *, model: str, version: int, previous: int | None
) -> CohortHealth:
    """Sum the events of ``model`` per device into the target and control groups."""
    groups = _Groups(version, previous)
    malformed = 0
    for event in events:
        try:
            body = event.body
            if body.get("model") == model:
                groups.add(event, body)
        except (KeyError, ValueError, TypeError, AttributeError):
            malformed += 1
    return CohortHealth(
        target=groups.target,
        control=groups.control,
        opted_out=frozenset(groups.opted_out),
        malformed=malformed,
    )


# One-sided 1 %: a good variant is rarely rolled back by the noise of small samples.
_Z_FAIL = 2.326
# One-sided 5 % non-inferiority: a stage passes only when its accuracy is shown to be
# within the allowed drop, not merely when too few samples fail to show it is not.
_Z_PASS = 1.645


def _pooled(devices: Iterable[DeviceHealth], cap: int) -> tuple[float, float] | None:
    """Return (accuracy, samples) pooled over devices, each counting at most ``cap`` samples."""
    samples = correct = 0.0
    for device in devices:
        if device.labelled:
            weight = min(device.labelled, cap) / device.labelled
            samples += device.labelled * weight
            correct += device.correct * weight
    return (correct / samples, samples) if samples else None


def _accuracy_gate(
    gates: HealthGates,
    reporting: list[DeviceHealth],
    control: Iterable[DeviceHealth],
    baseline_accuracy: float | None,
) -> GateResult:
    """Compare the canary's labelled accuracy with the control group's (or the signed metric).

    Pooled accuracy, each device capped at ``max_labelled_per_device`` samples and the
    best and the worst device set aside (a trimmed estimate): it fails only when
    significantly below the limit (one-sided z-test at 1 %) and passes only with
    ``min_labelled`` samples that show it significantly above the limit (a one-sided
    non-inferiority test at 5 %); in between it waits for more feedback. No single
    device, however many samples it claims, decides either way.
    """
    cap = gates.max_labelled_per_device
    labelled = sorted(
        (d for d in reporting if d.labelled), key=lambda d: (d.correct / d.labelled, d.device)
    )
    if not labelled and len(reporting) >= gates.min_devices:
        # A fleet without labelled feedback is judged on errors, latency, crashes,
        # local rollbacks and drift; an accuracy gate that waited for labels that never
        # come would freeze every rollout.
        return GateResult(
            "accuracy", None, None, Verdict.PASS, "no labelled feedback from the cohort"
        )
    if len(labelled) < gates.min_devices:
        return GateResult(
            "accuracy", None, None, Verdict.WAIT, f"{len(labelled)} devices with labelled feedback"
        )
    controls = [d for d in control if d.labelled]
    if len(controls) >= gates.min_devices:
        base = _pooled(controls, cap)
        assert base is not None
        base_accuracy, base_samples, source = base[0], base[1], "control group"
    elif baseline_accuracy is not None:
        base_accuracy, base_samples, source = baseline_accuracy, math.inf, "signed metric"
    else:
        canary = _pooled(labelled, cap)
        value = None if canary is None else canary[0]
        return GateResult("accuracy", value, None, Verdict.PASS, "no baseline to compare with")
    limit = base_accuracy - gates.max_accuracy_drop
    canary, trimmed = _pooled(labelled, cap), _pooled(labelled[1:-1], cap)
    assert canary is not None and trimmed is not None
    accuracy, samples = canary
    p, n = trimmed
    spread = p * (1 - p) / n + (
        0.0 if math.isinf(base_samples) else base_accuracy * (1 - base_accuracy) / base_samples
    )
    z = (p - limit) / math.sqrt(spread) if spread > 0 else (-math.inf if p < limit else math.inf)
    detail = (
        f"{p:.4f} pooled over {len(labelled) - 2} of {len(labelled)} devices (the best and "
        f"the worst set aside; {samples:.0f} samples in all) vs {base_accuracy:.4f} "
        f"({source}), z {z:.2f}"
    )
    if z < -_Z_FAIL:
        return GateResult("accuracy", p, limit, Verdict.FAIL, detail)
    if n >= gates.min_labelled and z > _Z_PASS:
        return GateResult("accuracy", p, limit, Verdict.PASS, detail)
    return GateResult("accuracy", accuracy, limit, Verdict.WAIT, detail)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def evaluate(
    gates: HealthGates,
    cohort: CohortHealth,
    *,
    expected_devices: int,
    baseline_accuracy: float | None = None,
) -> tuple[Verdict, list[GateResult]]:
    """Judge the target group.

    Parameters
    ----------
    gates
        The plan's gates.
    cohort
        What :func:`collect` gathered.
    expected_devices
        How many devices the stage's cohort holds (the fleet's devices, not opted
        out, whose bucket is below the stage's fraction).
    baseline_accuracy
        The accuracy to compare with when the control group has too few labelled
        reports (the previous version's signed accuracy), or ``None``.

    Returns
    -------
    The verdict (``FAIL`` if any gate fails, else ``WAIT`` until enough devices
    reported, else ``PASS``) and each gate's result.
    """
    target = list(cohort.target.values())
    reporting = [d for d in target if d.reported]
    results: list[GateResult] = []
    enough = len(reporting) >= gates.min_devices

    def fraction_gate(name: str, failing: int, limit: float) -> None:
        share = failing / len(target) if target else 0.0
        fails = failing >= gates.min_failing_devices and share > limit
        results.append(
            GateResult(
                name,
                share,
                limit,
                Verdict.FAIL if fails else Verdict.PASS,
                f"{failing} of {len(target)} devices",
            )
        )

    fraction_gate("crashes", sum(d.crashed for d in target), gates.max_crash_fraction)
    fraction_gate(
        "local rollbacks", sum(d.rolled_back for d in target), gates.max_rollback_fraction
    )
    fraction_gate("drift", sum(d.drifted for d in target), gates.max_drift_fraction)

    error_rate = _median([d.error_rate for d in reporting])
    results.append(
        GateResult(
            "error rate",
            error_rate,
            gates.max_error_rate,
            Verdict.WAIT
            if not enough or error_rate is None
            else Verdict.FAIL
            if error_rate > gates.max_error_rate
            else Verdict.PASS,
            f"median of {len(reporting)} devices",
        )
    )

    results.append(_accuracy_gate(gates, reporting, cohort.control.values(), baseline_accuracy))

    if gates.max_latency_p95_ms is not None:
        p95 = _median([p for d in reporting if (p := d.latency_p95_ms) is not None])
        results.append(
            GateResult(
                "latency p95 ms",
                p95,
                gates.max_latency_p95_ms,
                Verdict.WAIT
                if not enough or p95 is None
                else Verdict.FAIL
                if p95 > gates.max_latency_p95_ms
                else Verdict.PASS,
                f"median of {len(reporting)} devices",
            )
        )

    required = max(gates.min_devices, math.ceil(gates.min_report_fraction * expected_devices))
    results.append(
        GateResult(
            "devices reporting",
            float(len(reporting)),
            float(required),
            Verdict.PASS if len(reporting) >= required else Verdict.WAIT,
            f"{len(reporting)} of {expected_devices} expected in the cohort"
            + (
                f" (fewer than gates.min_devices {gates.min_devices}: this stage can never "
                "decide; use a larger first stage)"
                if expected_devices < gates.min_devices
                else ""
            ),
        )
    )
    if any(r.verdict is Verdict.FAIL for r in results):
        return Verdict.FAIL, results
    if any(r.verdict is Verdict.WAIT for r in results):
        return Verdict.WAIT, results
    return Verdict.PASS, results
