"""What the server-side DP wrapper reads from train replies: metrics, models as flat vectors."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedge.errors import ConfigError
from strategies import vectors
from strategies.accounting import GaussianSteps

__all__ = [
    "DPSGD_METRICS",
    "flat",
    "log_failures",
    "metrics_of",
    "number",
    "only_arrays",
    "reported_dpsgd",
    "same_layout",
    "unflatten",
]

logger = logging.getLogger("fl_server")

# What a device reports of its own DP-SGD spend (plain rounds only).
DPSGD_METRICS = ("dp-noise-multiplier", "dp-sample-rate", "dp-steps")


def number(metrics: MetricRecord, key: str) -> float:
    """Return the metric ``key`` as a float.

    Raises
    ------
    ConfigError
        If it is missing, a bool, a list or not a number.
    """
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"metric {key!r} must be a number")
    return float(value)


def metrics_of(reply: Message) -> MetricRecord:
    """Return the reply's only MetricRecord (an empty one if it has none or several)."""
    records = reply.content.metric_records
    return next(iter(records.values())) if len(records) == 1 else MetricRecord()


def only_arrays(reply: Message) -> ArrayRecord:
    """Return the reply's only ArrayRecord.

    Raises
    ------
    ConfigError
        If the reply carries none or several.
    """
    records = reply.content.array_records
    if len(records) != 1:
        raise ConfigError("a train reply must carry exactly one ArrayRecord")
    return next(iter(records.values()))


def same_layout(model: ArrayRecord, template: ArrayRecord) -> bool:
    """Return whether ``model`` holds ``template``'s arrays, in its order and shapes."""
    keys = list(template.keys())
    return list(model.keys()) == keys and all(
        tuple(model[k].shape) == tuple(template[k].shape) for k in keys
    )


def flat(model: ArrayRecord) -> npt.NDArray[np.float64]:
    """Return every array of ``model`` in key order as one float64 vector."""
    return vectors.flatten({k: model[k].numpy() for k in model})


def unflatten(template: ArrayRecord, vector: np.ndarray[Any, Any]) -> ArrayRecord:
    """Return ``vector`` cut into ``template``'s keys, shapes and dtypes."""
    arrays = vectors.unflatten({k: template[k].numpy() for k in template}, vector)
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def reported_dpsgd(reply: Message) -> GaussianSteps | None:
    """Return the DP-SGD spend a device reported in its reply, or None if it reported none.

    Raises
    ------
    ConfigError
        If the reported values are not numbers or out of range.
    """
    reported = metrics_of(reply)
    if not all(key in reported for key in DPSGD_METRICS):
        return None
    try:
        return GaussianSteps(
            noise_multiplier=number(reported, "dp-noise-multiplier"),
            sample_rate=number(reported, "dp-sample-rate"),
            steps=int(number(reported, "dp-steps")),
        )
    except (OverflowError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise ConfigError(str(exc)) from None


def log_failures(server_round: int, replies: Iterable[Message]) -> int:
    """Log a round's failed replies once per distinct reason; return how many failed.

    A secure round that aborts fails every client with the same reason: one line, not n.
    """
    reasons = Counter(r.error.reason or "?" for r in replies if r.has_error())
    for reason, count in reasons.items():
        who = "a client" if count == 1 else f"{count} clients"
        logger.warning("round %d: %s failed: %s", server_round, who, reason)
    return sum(reasons.values())
