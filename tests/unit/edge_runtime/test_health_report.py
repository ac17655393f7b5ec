"""The health reporter: what a serving device tells the rollout gates, interval by interval."""

from __future__ import annotations

from typing import Any

import pytest

from edge_runtime.device_events import EventKind
from edge_runtime.health_report import HealthReporter
from fedge.errors import ConfigError, StorageError


class Metrics:
    def __init__(self) -> None:
        self.instances = 0
        self.by_status: dict[str, int] = {}
        self.p95: float | None = None

    def __call__(self) -> dict[str, Any]:
        return {
            "requests": {"instances": self.instances, "by_status": dict(self.by_status)},
            "model_latency": {"p95_ms": self.p95},
        }


def test_each_report_covers_the_interval_since_the_last_one() -> None:
    metrics, sent = Metrics(), []
    reporter = HealthReporter(
        metrics, model="cnn", version=3, emit=lambda kind, body: sent.append((kind, body))
    )
    assert reporter.report_once() is None  # idle: nothing sent

    metrics.instances, metrics.by_status, metrics.p95 = 40, {"200": 38, "400": 1, "500": 1}, 1.2345
    first = reporter.report_once()
    metrics.instances, metrics.by_status = 50, {"200": 45, "400": 1, "500": 3}
    second = reporter.report_once()

    assert first is not None and second is not None
    assert (first["inferences"], first["errors"], first["latency_p95_ms"]) == (40, 1, 1.2345)
    # Client errors (4xx) are not the model's; the second interval holds only its own.
    assert (second["inferences"], second["errors"]) == (10, 2)
    assert all(kind is EventKind.HEALTH for kind, _ in sent)
    assert first["labelled"] == 0 and first["version"] == 3 and first["model"] == "cnn"


def test_a_failing_emit_never_stops_serving() -> None:
    metrics = Metrics()

    def full(kind: EventKind, body: dict[str, Any]) -> None:
        raise StorageError("outbox full")

    reporter = HealthReporter(metrics, model="cnn", version=1, emit=full, interval_s=0.01)
    metrics.instances = 5
    reporter.start()
    reporter.stop()  # logs, does not raise


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="interval_s"):
        HealthReporter(Metrics(), model="cnn", version=1, emit=print, interval_s=0)
