"""Read the per-round series of a run summary, tolerating older and partial summaries.

A summary's round entries grew over time: the oldest have ``accuracy``,
``loss``, ``replies`` and ``failures``; a secure round adds
``secure_aggregation`` (``sampled``, ``survivors``, ...); newer ones may carry
the ``round.completed`` audit event's counts (``sampled``, ``completed``,
``dropped``, ``refused`` as ``{category: count}``) and the run's cumulative
``epsilon`` after the round (as in the ``privacy.spent`` event). Each reader
here takes the most specific field present and falls back on the older ones,
so plots and exports work on every summary a fedge version wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedge.errors import ConfigError
from fl_server.run_summary import RunSummary

__all__ = ["RoundPoint", "RunSeries", "number", "read_series", "summary_document"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPoint:
    """One round's numbers; ``None`` where the summary does not say."""

    round: int
    accuracy: float | None = None
    loss: float | None = None
    epsilon: float | None = None
    sampled: int | None = None
    completed: int | None = None
    dropped: int | None = None
    refused: int | None = None
    replies: int | None = None
    failures: int | None = None
    seconds: float | None = None
    upload_bytes_per_client: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSeries:
    """A run's identity and its rounds, round 0 being the initial model."""

    run_id: str
    status: str
    points: tuple[RoundPoint, ...]
    dp_mode: str | None
    secure_agg: bool
    final_epsilon: float | None
    epsilon_budget: float | None

    @property
    def completed_rounds(self) -> tuple[RoundPoint, ...]:
        """Return the rounds after the initial model (round >= 1)."""
        return tuple(p for p in self.points if p.round > 0)

    @property
    def has_dp(self) -> bool:
        """Return whether the run spent privacy budget (or was configured to)."""
        return (
            self.dp_mode is not None
            or self.final_epsilon is not None
            or any(p.epsilon is not None for p in self.points)
        )

    def describe(self) -> str:
        """Return a short label of the run's mode, e.g. ``"run X · central DP · SecAgg+"``."""
        parts = [f"run {self.run_id}"] if self.run_id else []
        if self.dp_mode is not None:
            parts.append(f"{self.dp_mode} DP")
        if self.secure_agg:
            parts.append("SecAgg+")
        if self.status:
            parts.append(self.status)
        return " · ".join(parts)


def summary_document(summary: RunSummary | Mapping[str, Any]) -> dict[str, Any]:
    """Return ``summary`` as the JSON document a run writes (a plain dict, copied).

    A :class:`RunSummary` is converted without ``code_version`` (which would
    ask git): callers that need the exact file should pass its parsed JSON.
    """
    if isinstance(summary, RunSummary):
        return {
            "run_id": summary.run_id,
            "status": summary.status,
            "final_accuracy": summary.final_accuracy,
            "initial_accuracy": summary.initial_accuracy,
            "rounds": [dict(r) for r in summary.rounds],
            "config": dict(summary.config),
            "config_sha256": summary.config_sha256,
            "data": dict(summary.data),
            "wall_seconds": round(summary.wall_seconds, 3),
            "audit": {"db_url": summary.db_url, "head_hash": summary.audit_head},
            "error": summary.error,
            "privacy": summary.privacy,
        }
    if not isinstance(summary, Mapping):
        raise ConfigError(
            f"a run summary must be a RunSummary or a mapping, got {type(summary).__name__}"
        )
    return dict(summary)


def number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _count(value: Any) -> int | None:
    result = number(value)
    return None if result is None or result < 0 else int(result)


def _refused(value: Any) -> int | None:
    if isinstance(value, Mapping):
        counts = [_count(v) for v in value.values()]
        return sum(c for c in counts if c is not None)
    return _count(value)


def _point(entry: Mapping[str, Any], index: int) -> RoundPoint:
    secure = entry.get("secure_aggregation")
    secure = secure if isinstance(secure, Mapping) else {}
    replies = _count(entry.get("replies"))
    failures = _count(entry.get("failures"))
    completed = _count(entry.get("completed"))
    if completed is None:
        completed = replies
    sampled = _count(entry.get("sampled"))
    if sampled is None:
        sampled = _count(secure.get("sampled"))
    if sampled is None and replies is not None:
        sampled = replies + (failures or 0)
    dropped = _count(entry.get("dropped"))
    if dropped is None and sampled is not None and completed is not None:
        dropped = max(sampled - completed, 0)
    round_number = _count(entry.get("round"))
    return RoundPoint(
        round=index + 1 if round_number is None else round_number,
        accuracy=number(entry.get("accuracy")),
        loss=number(entry.get("loss")),
        epsilon=number(entry.get("epsilon")),
        sampled=sampled,
        completed=completed,
        dropped=dropped,
        refused=_refused(entry.get("refused")),
        replies=replies,
        failures=failures,
        seconds=number(entry.get("seconds")),
        upload_bytes_per_client=number(secure.get("upload_bytes_per_client")),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def read_series(summary: RunSummary | Mapping[str, Any]) -> RunSeries:
    """Return the per-round series of ``summary`` (a :class:`RunSummary` or its JSON).

    Missing fields read as ``None``; round 0 is present when the summary has
    an ``initial_accuracy`` (or an ``initial_loss``).

    Raises
    ------
    ConfigError
        If ``summary`` is not a mapping or its ``rounds`` is not a list of objects.
    """
    document = summary_document(summary)
    rounds = document.get("rounds") or []
    if not isinstance(rounds, list) or not all(isinstance(r, Mapping) for r in rounds):
        raise ConfigError("not a fedge run summary: rounds must be a list of objects")
    points: list[RoundPoint] = []
    initial_accuracy = number(document.get("initial_accuracy"))
    initial_loss = number(document.get("initial_loss"))
    if initial_accuracy is not None or initial_loss is not None:
        points.append(RoundPoint(round=0, accuracy=initial_accuracy, loss=initial_loss))
    points.extend(_point(entry, index) for index, entry in enumerate(rounds))
    config = _mapping(document.get("config"))
    privacy = _mapping(document.get("privacy"))
    dp = config.get("dp")
    dp_mode = str(dp) if dp not in (None, "", "off", "none", False) else None
    if dp_mode is None and privacy:
        dp_mode = str(privacy.get("mechanism") or "") or None
    return RunSeries(
        run_id=str(document.get("run_id") or ""),
        status=str(document.get("status") or ""),
        points=tuple(points),
        dp_mode=dp_mode,
        secure_agg=bool(config.get("secure_agg")),
        final_epsilon=number(privacy.get("epsilon")),
        epsilon_budget=number(privacy.get("budget")),
    )
