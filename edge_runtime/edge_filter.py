"""Send upstream only what is worth sending: anomalies, drift reports, periodic aggregates.

:class:`EdgeFilter` turns a stream of inference results into a few JSON events,
never raw inputs; :func:`measure_egress` measures what that saves against
streaming every input and output (see :mod:`edge_runtime.telemetry` for the
buffer that holds the events while the device is offline).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import numpy as np

from edge_runtime._json import canonical_bytes as _canonical
from edge_runtime._json import utc_now as _utc_now
from edge_runtime.drift import DriftReport
from fedge.errors import ConfigError

__all__ = ["EdgeFilter", "EdgeFilterConfig", "OutputKind", "measure_egress"]


class OutputKind(Enum):
    """What the model's outputs are, for the confidence :class:`EdgeFilter` reads."""

    LOGITS = "logits"  # softmax is applied
    PROBABILITIES = "probabilities"  # used as given


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeFilterConfig:
    """What :class:`EdgeFilter` forwards: anomalies, and aggregates every ``period`` inputs."""

    confidence_threshold: float = 0.5
    input_range: tuple[float, float] | None = (0.0, 1.0)
    period: int = 1000
    outputs: OutputKind = OutputKind.LOGITS

    def __post_init__(self) -> None:
        if not 0 < self.confidence_threshold <= 1:
            raise ConfigError(
                f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}"
            )
        if self.input_range is not None:
            low, high = self.input_range
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ConfigError(f"input_range must be finite (low, high), got {self.input_range}")
        if type(self.period) is not int or self.period < 1:
            raise ConfigError(f"period must be an int >= 1, got {self.period!r:.40}")
        if not isinstance(self.outputs, OutputKind):
            raise ConfigError(f"outputs must be an OutputKind, got {self.outputs!r:.40}")


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


class EdgeFilter:
    """Reduce a stream of inference results to anomalies and periodic aggregates.

    An input is an anomaly when its confidence (the top class probability) is below
    ``confidence_threshold``, a value lies outside ``input_range`` or is not finite, or
    the output is not finite. Each anomaly becomes one ``inference.anomaly`` event; every
    ``period`` inputs one ``inference.stats`` event sums up the rest; a drifted
    :class:`~edge_runtime.drift.DriftReport` passed in is forwarded as its event.
    Events carry summary numbers only, never input values.

    Parameters
    ----------
    config
        Thresholds and the aggregation period; defaults if None.
    clock
        Returns the timezone-aware time stamped on events.
    """

    def __init__(
        self, config: EdgeFilterConfig | None = None, *, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        config = EdgeFilterConfig() if config is None else config
        if not isinstance(config, EdgeFilterConfig):
            raise ConfigError(f"config must be an EdgeFilterConfig, got {type(config).__name__}")
        self._config = config
        self._clock = clock
        self._egress_bytes = 0
        self._raw_bytes = 0
        self._anomalies_forwarded = 0
        self._seen = 0
        self._num_classes: int | None = None
        self._reset_period()

    def _reset_period(self) -> None:
        self._period_start = self._seen
        self._histogram = np.zeros(self._num_classes or 0, dtype=np.int64)
        self._period_anomalies = 0
        self._confidences: list[np.ndarray] = []
        self._latencies: list[np.ndarray] = []

    @property
    def egress_bytes(self) -> int:
        """Bytes of canonical JSON in every event returned so far."""
        return self._egress_bytes

    @property
    def raw_bytes(self) -> int:
        """Bytes that streaming every input and output array as given would have cost."""
        return self._raw_bytes

    @property
    def anomalies_forwarded(self) -> int:
        """How many ``inference.anomaly`` events were returned so far."""
        return self._anomalies_forwarded

    def savings(self) -> float:
        """Return the fraction of bytes saved against streaming raw inputs and outputs."""
        return 1 - self._egress_bytes / self._raw_bytes if self._raw_bytes else 0.0

    def _now(self) -> str:
        at = self._clock()
        if at.utcoffset() is None:
            raise ConfigError("the edge filter clock must return timezone-aware datetimes")
        return at.isoformat()

    def _emit(self, event: dict[str, Any], events: list[dict[str, Any]]) -> None:
        self._egress_bytes += len(_canonical(event))
        events.append(event)

    def observe(
        self,
        inputs: np.ndarray,
        outputs: np.ndarray,
        *,
        latencies_ms: np.ndarray | None = None,
        drift: DriftReport | None = None,
    ) -> list[dict[str, Any]]:
        """Account for one batch of results; return the events to send upstream.

        Parameters
        ----------
        inputs
            (N, ...) the batch the model saw.
        outputs
            (N, classes) its logits or probabilities (see ``config.outputs``).
        latencies_ms
            Optional (N,) per-input inference latencies, for the aggregates.
        drift
            The detector's latest report, forwarded if it drifted.

        Raises
        ------
        ConfigError
            If the shapes do not agree, or the number of classes changes.
        """
        inputs, given = np.asarray(inputs), np.asarray(outputs)
        outputs = given.astype(np.float64)
        count = len(inputs)
        if count == 0 or inputs.ndim < 2 or outputs.shape[:1] != (count,) or outputs.ndim != 2:
            raise ConfigError(
                f"need (N, ...) inputs and (N, classes) outputs with N > 0, "
                f"got {inputs.shape} and {outputs.shape}"
            )
        if self._num_classes is None:
            self._num_classes = outputs.shape[1]
            self._histogram = np.zeros(self._num_classes, dtype=np.int64)
        elif outputs.shape[1] != self._num_classes:
            raise ConfigError(f"expected {self._num_classes} classes, got {outputs.shape[1]}")
        latencies = None
        if latencies_ms is not None:
            latencies = np.asarray(latencies_ms, dtype=np.float64)
            if latencies.shape != (count,):
                raise ConfigError(f"latencies_ms must have shape ({count},), got {latencies.shape}")
        self._raw_bytes += inputs.nbytes + given.nbytes
        events: list[dict[str, Any]] = []
        if drift is not None and drift.drifted:
            self._emit(drift.to_event(), events)
        flat = inputs.reshape(count, -1).astype(np.float64)
        finite_outputs = np.isfinite(outputs).all(axis=1)
        if self._config.outputs is OutputKind.LOGITS:
            with np.errstate(invalid="ignore"):  # rows with inf/NaN are flagged, not scored
                shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
                outputs = shifted / shifted.sum(axis=1, keepdims=True)
        confidence, predicted = outputs.max(axis=1), outputs.argmax(axis=1)
        low, high = self._config.input_range or (-math.inf, math.inf)
        lowest, highest = flat.min(axis=1), flat.max(axis=1)
        out_of_range = ~np.isfinite(flat).all(axis=1) | (lowest < low) | (highest > high)
        unsure = finite_outputs & (confidence < self._config.confidence_threshold)
        now = self._now()
        anomalous = out_of_range | unsure | ~finite_outputs
        start = 0
        while start < count:  # in pieces that end where a period ends
            stop = min(count, start + self._config.period - (self._seen - self._period_start))
            for index in np.flatnonzero(anomalous[start:stop]) + start:
                reasons = [
                    reason
                    for reason, hit in (
                        ("low-confidence", unsure[index]),
                        ("out-of-range", out_of_range[index]),
                        ("non-finite-output", not finite_outputs[index]),
                    )
                    if hit
                ]
                event = {
                    "kind": "inference.anomaly",
                    "index": self._seen + int(index - start),
                    "reasons": reasons,
                    "predicted": int(predicted[index]),
                    "confidence": _rounded(float(confidence[index])),
                    "input_min": _rounded(float(lowest[index])),
                    "input_max": _rounded(float(highest[index])),
                    "at": now,
                }
                self._emit(event, events)
                self._anomalies_forwarded += 1
                self._period_anomalies += 1
            good = finite_outputs[start:stop]
            self._histogram += np.bincount(predicted[start:stop][good], minlength=self._num_classes)
            self._confidences.append(confidence[start:stop][good])
            if latencies is not None:
                self._latencies.append(latencies[start:stop])
            self._seen += stop - start
            start = stop
            if self._seen - self._period_start == self._config.period:
                events.extend(self.finish())
        return events

    def finish(self) -> list[dict[str, Any]]:
        """Close the current period early (e.g. at shutdown); return its aggregate, if any."""
        count = self._seen - self._period_start
        if count == 0:
            return []
        confidences = np.concatenate(self._confidences)
        latencies = np.concatenate(self._latencies) if self._latencies else np.empty(0)
        p50, p95 = np.percentile(latencies, [50, 95]) if len(latencies) else (math.nan, math.nan)
        event = {
            "kind": "inference.stats",
            "first_index": self._period_start,
            "count": count,
            "anomalies": self._period_anomalies,
            "class_histogram": self._histogram.tolist(),
            "confidence_mean": _rounded(float(confidences.mean())) if len(confidences) else None,
            "confidence_min": _rounded(float(confidences.min())) if len(confidences) else None,
            "latency_p50_ms": _rounded(float(p50)),
            "latency_p95_ms": _rounded(float(p95)),
            "at": self._now(),
        }
        events: list[dict[str, Any]] = []
        self._emit(event, events)
        self._reset_period()
        return events


def measure_egress(
    inputs: np.ndarray,
    logits: np.ndarray,
    config: EdgeFilterConfig | None = None,
    *,
    batch_size: int = 64,
) -> dict[str, float | int]:
    """Return what :class:`EdgeFilter` sends for a stream against raw streaming.

    Returns
    -------
    dict
        ``raw_bytes`` (every input and output as binary arrays), ``filtered_bytes``
        (the JSON events, the final partial aggregate included), ``ratio``
        (filtered / raw), ``savings`` (1 - ratio), ``anomalies_forwarded`` and ``events``.

    Raises
    ------
    ConfigError
        As :meth:`EdgeFilter.observe`, or if ``batch_size`` is below 1.
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r:.40}")
    edge_filter = EdgeFilter(config)
    events = 0
    for start in range(0, len(inputs), batch_size):
        stop = start + batch_size
        events += len(edge_filter.observe(inputs[start:stop], logits[start:stop]))
    events += len(edge_filter.finish())
    ratio = edge_filter.egress_bytes / edge_filter.raw_bytes if edge_filter.raw_bytes else 0.0
    return {
        "raw_bytes": edge_filter.raw_bytes,
        "filtered_bytes": edge_filter.egress_bytes,
        "ratio": ratio,
        "savings": 1 - ratio,
        "anomalies_forwarded": edge_filter.anomalies_forwarded,
        "events": events,
    }
