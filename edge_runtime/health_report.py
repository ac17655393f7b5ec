"""Turn a serving device's inference metrics into the health events the rollout gates read.

:class:`HealthReporter` reads an :class:`~edge_runtime.server.InferenceServer`'s
counters every ``interval_s`` and emits one ``health`` event with what happened
since the last one: instances served, server errors (5xx: the model failed, not
the client), and the model's p95 latency. Devices without labelled feedback
report ``labelled = 0``, which the accuracy gate treats as "not applicable".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from edge_runtime.device_events import EventKind
from fedge.errors import ConfigError, FedgeError

__all__ = ["HealthReporter"]

logger = logging.getLogger(__name__)


def _server_errors(requests: Mapping[str, Any]) -> int:
    by_status = requests.get("by_status", {})
    return sum(int(count) for status, count in by_status.items() if int(status) >= 500)


class HealthReporter:
    """Emit a ``health`` event of a serving model every ``interval_s``.

    Parameters
    ----------
    metrics
        Returns the server's metrics document (``InferenceServer.metrics``).
    model, version
        What is being served.
    emit
        Signs and publishes an event (``EventPublisher.emit``).
    interval_s
        How often a report goes out (nothing is sent for an idle interval).
    opted_out
        Carried in every report, so the controller leaves this device out of cohorts.
    """

    def __init__(
        self,
        metrics: Callable[[], Mapping[str, Any]],
        *,
        model: str,
        version: int,
        emit: Callable[[EventKind, dict[str, Any]], object],
        interval_s: float = 60.0,
        opted_out: bool = False,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"interval_s must be > 0, got {interval_s!r}")
        self._metrics = metrics
        self._model, self._version = model, version
        self._emit = emit
        self._interval_s = interval_s
        self._opted_out = opted_out
        self._last_instances = self._last_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def report_once(self) -> dict[str, Any] | None:
        """Emit the report of the interval since the last one; return it (``None``: idle)."""
        document = self._metrics()
        requests = document.get("requests", {})
        instances, errors = int(requests.get("instances", 0)), _server_errors(requests)
        served = instances - self._last_instances
        failed = errors - self._last_errors
        if served <= 0 and failed <= 0:
            return None
        self._last_instances, self._last_errors = instances, errors
        p95 = document.get("model_latency", {}).get("p95_ms")
        body: dict[str, Any] = {
            "model": self._model,
            "version": self._version,
            "inferences": max(served, failed),
            "errors": min(failed, max(served, failed)),
            "labelled": 0,
            "correct": 0,
            "latency_p95_ms": None if p95 is None else round(float(p95), 4),
            "opted_out": self._opted_out,
        }
        self._emit(EventKind.HEALTH, body)
        return body

    def start(self) -> None:
        """Report in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="health-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send the last interval's report and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._report_logged()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._report_logged()

    def _report_logged(self) -> None:
        try:
            self.report_once()
        except FedgeError as exc:  # a full outbox or a disk error never stops serving
            logger.error("health reporter: %s", exc)
