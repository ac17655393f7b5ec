"""A latency histogram in fixed log-spaced buckets: constant memory however long a device serves."""

from __future__ import annotations

import bisect
import math
import threading
import time
from typing import Any

import numpy as np

from fedge.errors import ConfigError

__all__ = ["LatencyHistogram", "time_session_runs"]


class LatencyHistogram:
    """Count durations in fixed log-spaced buckets; thread-safe.

    Parameters
    ----------
    lowest_s, highest_s
        The range the buckets cover (default 10 µs to 10 s); values outside it fall
        into an underflow or overflow bucket and are still counted exactly in
        ``count``, ``mean_ms`` and ``max_ms``.
    buckets_per_decade
        Resolution: a quantile is off by at most one bucket's relative width,
        ``10 ** (1 / buckets_per_decade)`` (about 12 % at the default 20).
    """

    def __init__(
        self, *, lowest_s: float = 1e-5, highest_s: float = 10.0, buckets_per_decade: int = 20
    ) -> None:
        if not (math.isfinite(lowest_s) and math.isfinite(highest_s) and 0 < lowest_s < highest_s):
            raise ConfigError(
                f"need 0 < lowest_s < highest_s (finite), got {lowest_s} and {highest_s}"
            )
        if buckets_per_decade < 1:
            raise ConfigError(f"buckets_per_decade must be at least 1, got {buckets_per_decade}")
        self._relative_width = 10 ** (1 / buckets_per_decade)
        num_edges = math.ceil(math.log10(highest_s / lowest_s) * buckets_per_decade) + 1
        self._edges = [lowest_s * 10 ** (index / buckets_per_decade) for index in range(num_edges)]
        self._counts = [0] * (num_edges + 1)  # [underflow, edges..., overflow]
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = 0.0
        self._lock = threading.Lock()

    @property
    def relative_width(self) -> float:
        """The ratio between a bucket's upper and lower edge."""
        return self._relative_width

    @property
    def count(self) -> int:
        """How many durations were recorded."""
        with self._lock:
            return self._count

    def record(self, seconds: float) -> None:
        """Count one duration.

        Raises
        ------
        ConfigError
            If ``seconds`` is negative or not finite.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ConfigError(f"a latency must be finite and non-negative, got {seconds}")
        index = bisect.bisect_right(self._edges, seconds)
        with self._lock:
            self._counts[index] += 1
            self._count += 1
            self._sum += seconds
            self._min = min(self._min, seconds)
            self._max = max(self._max, seconds)

    def quantile(self, q: float) -> float | None:
        """Return the estimated ``q``-quantile in seconds, or None before the first record.

        The estimate interpolates geometrically inside the bucket holding rank
        ``q * (count - 1)`` and is clamped to the exact minimum and maximum (which
        ``q`` = 0 and 1 return).

        Raises
        ------
        ConfigError
            If ``q`` is not in [0, 1].
        """
        if not 0 <= q <= 1:
            raise ConfigError(f"q must be in [0, 1], got {q}")
        with self._lock:
            counts, count, low, high = list(self._counts), self._count, self._min, self._max
        if count == 0:
            return None
        if q in (0, 1):  # the extremes are known exactly
            return low if q == 0 else high
        target = q * (count - 1)
        cumulative = 0
        for index, in_bucket in enumerate(counts):
            if in_bucket and cumulative + in_bucket > target:
                lower = max(self._edges[index - 1] if index > 0 else 0.0, low)
                upper = min(self._edges[index] if index < len(self._edges) else math.inf, high)
                fraction = (target - cumulative + 0.5) / in_bucket
                if lower > 0:
                    return float(lower * (upper / lower) ** fraction)
                return float(lower + (upper - lower) * fraction)
            cumulative += in_bucket
        return high  # pragma: no cover - target < count always lands in a bucket

    def snapshot(self) -> dict[str, float | int | None]:
        """Return count, p50_ms, p95_ms, p99_ms, mean_ms and max_ms (None when empty)."""
        with self._lock:
            count, total, high = self._count, self._sum, self._max

        def milliseconds(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e3, 6)

        return {
            "count": count,
            "p50_ms": milliseconds(self.quantile(0.50)),
            "p95_ms": milliseconds(self.quantile(0.95)),
            "p99_ms": milliseconds(self.quantile(0.99)),
            "mean_ms": milliseconds(total / count) if count else None,
            "max_ms": milliseconds(high) if count else None,
        }


def time_session_runs(session: Any, batch: np.ndarray, runs: int) -> list[float]:
    """Return the wall time in seconds of ``runs`` calls of an ONNX Runtime session on ``batch``.

    One untimed call comes first (allocation, kernel selection), so the samples
    describe the steady state a device serves in.
    """
    feed = {session.get_inputs()[0].name: batch}
    session.run(None, feed)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - started)
    return samples
