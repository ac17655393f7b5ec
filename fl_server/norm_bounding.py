"""Norm bounding on the server, as a wrapper around any Flower strategy (runs without SecAgg).

:class:`NormBounding` wraps a ``flwr.serverapp.strategy.Strategy`` the way
:class:`fl_server.dp_strategy.DifferentialPrivacy` does: the wrapped strategy
samples and builds the train messages; the wrapper remembers the round's global
model and, when the replies come back, bounds every reply's update
``reply - global`` to an L2 norm of at most ``max_l2`` before the wrapped
strategy aggregates them (Sun et al. 2019, "Can you really backdoor federated
learning?"). Evaluation and the summary are delegated unchanged.

With ``median_factor`` the round's bound is ``min(max_l2, median_factor *
median norm)``: the median of the round's update norms stays among the honest
clients' as long as fewer than half are Byzantine, so the bound follows the
honest updates as they shrink over training while ``max_l2`` remains a hard cap.

Notes
-----
The server must see every update in the clear, so this wrapper is for runs
*without* secure aggregation; a secure round's single aggregate reply is
refused (under secure aggregation the bound is enforced on the device, by
:func:`fl_client.norm_bound_mod.make_norm_bound_mod`). Robust rules (Flower's
``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``MultiKrum``, ``Bulyan``) can be
wrapped too: they then choose among bounded updates. With central DP, wrap the
DP wrapper (``NormBounding(DifferentialPrivacy(...))``): the DP wrapper clips
again to its own bound and adds noise to the mean it computes.

A reply whose model cannot be bounded (not one ArrayRecord, arrays that differ
from the global model's, NaN or infinity) is left out of the round with a
warning; error replies are handed on for the wrapped strategy to count.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.errors import ConfigError
from fl_server._dp_records import flat, metrics_of, only_arrays, same_layout, unflatten
from fl_server.participants import SURVIVORS_METRIC
from fl_server.secagg_config import PARTICIPANTS_RECORD_KEY
from strategies.norm_bound import bound_update, median_norm_bound, update_norm

__all__ = ["NormBounding", "NormBoundingRound"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class NormBoundingRound:
    """What the wrapper did in one round: the bound, how many updates it scaled or left out."""

    server_round: int
    bound: float
    bounded: int
    clipped: int
    left_out: int


@dataclass(frozen=True, slots=True)
class _Start:
    template: ArrayRecord
    origin: npt.NDArray[np.float64]


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _is_secure_aggregate(reply: Message) -> bool:
    return (
        PARTICIPANTS_RECORD_KEY in reply.content.config_records
        or SURVIVORS_METRIC in metrics_of(reply)
    )


class NormBounding(Strategy):
    """Bound every reply's update to an L2 norm before the wrapped strategy aggregates.

    Parameters
    ----------
    strategy
        The strategy to wrap; it samples, builds the train messages and aggregates.
    max_l2
        The bound on each update's L2 norm, finite and > 0 (with ``median_factor``:
        the cap on the adaptive bound).
    median_factor
        ``None``: the bound is ``max_l2`` every round. A number > 0: each round's
        bound is ``min(max_l2, median_factor * median of the round's update norms)``.

    Raises
    ------
    ConfigError
        If ``strategy`` is not a Strategy, is already a ``NormBounding``, or a bound
        is not a finite number > 0.
    """

    def __init__(
        self, strategy: Strategy, max_l2: float, *, median_factor: float | None = None
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                "strategy must be a flwr.serverapp.strategy.Strategy, "
                f"got {type(strategy).__name__}"
            )
        if isinstance(strategy, NormBounding):
            raise ConfigError("the strategy already bounds update norms: wrap it once")
        self._strategy = strategy
        self.max_l2 = _check_positive("max_l2", max_l2)
        self.median_factor = (
            None if median_factor is None else _check_positive("median_factor", median_factor)
        )
        self.history: list[NormBoundingRound] = []
        self._starts: dict[int, _Start] = {}

    def __repr__(self) -> str:
        """Name the wrapper, its bound and the wrapped strategy."""
        adaptive = "" if self.median_factor is None else f", median x{self.median_factor:g}"
        return f"NormBounding({self._strategy!r}, max_l2={self.max_l2:g}{adaptive})"

    @property
    def strategy(self) -> Strategy:
        """The wrapped strategy."""
        return self._strategy

    def summary(self) -> None:
        """Log the bound, then the wrapped strategy's summary."""
        if self.median_factor is None:
            logger.info("\t├──> norm bound: L2 %g", self.max_l2)
        else:
            logger.info(
                "\t├──> norm bound: L2 min(%g, %g x median)", self.max_l2, self.median_factor
            )
        self._strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model, then delegate to the wrapped strategy."""
        # Flattened now: the updates are relative to the model as it was sent.
        self._starts = {server_round: _Start(template=arrays, origin=flat(arrays))}
        return self._strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Bound every valid reply's update, then let the wrapped strategy aggregate.

        Raises
        ------
        ConfigError
            If the round was never configured, or a reply is a secure round's aggregate.
        """
        start = self._starts.pop(server_round, None)
        if start is None:
            raise ConfigError(f"round {server_round} was aggregated but never configured")
        errors: list[Message] = []
        kept: list[tuple[Message, npt.NDArray[np.float64], float]] = []
        left_out = 0
        for reply in replies:
            if reply.has_error():
                errors.append(reply)
                continue
            if _is_secure_aggregate(reply):
                raise ConfigError(
                    "NormBounding needs every client's update, and a secure round hands the "
                    "server only their sum: bound on the device instead "
                    "(fl_client.norm_bound_mod)"
                )
            try:
                model = only_arrays(reply)
                if not same_layout(model, start.template):
                    raise ConfigError("the reply's model does not match the global one")
                update = flat(model) - start.origin
                kept.append((reply, update, update_norm(update)))
            except ConfigError as exc:
                logger.warning("round %d: a reply was left out: %s", server_round, exc)
                left_out += 1
        bound = self.max_l2
        if self.median_factor is not None and kept:
            median = median_norm_bound([norm for _, _, norm in kept], self.median_factor)
            bound = min(bound, median)
        bounded: list[Message] = []
        clipped = 0
        for reply, update, _ in kept:
            short, was_clipped = bound_update(update, bound)
            clipped += int(was_clipped)
            key = next(iter(reply.content.array_records))
            content = RecordDict(dict(reply.content))
            content[key] = unflatten(start.template, start.origin + short)
            rebuilt = copy.copy(reply)
            rebuilt.content = content
            bounded.append(rebuilt)
        self.history.append(
            NormBoundingRound(
                server_round=server_round,
                bound=bound,
                bounded=len(bounded),
                clipped=clipped,
                left_out=left_out,
            )
        )
        logger.info(
            "round %d: norm bound %g scaled down %d of %d updates (%d left out)",
            server_round,
            bound,
            clipped,
            len(bounded),
            left_out,
        )
        return self._strategy.aggregate_train(server_round, [*bounded, *errors])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self._strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self._strategy.aggregate_evaluate(server_round, replies)
