"""The round loop of a run, able to start at any round (a resumed run continues its numbering).

Flower's ``Strategy.start`` always numbers rounds from 1. A run that resumes
after a crash must keep its numbers (the ledger, the audit trail, the store's
versions and the devices' ledgers all name rounds), so fedge drives the
strategy's own steps here: ``configure_train``, ``Grid.send_and_receive``,
``aggregate_train`` and the central evaluation, as Flower's loop does (no
client-side evaluation: fedge evaluates centrally).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.errors import ConfigError

__all__ = ["run_rounds"]

logger = logging.getLogger(__name__)


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    *,
    initial_arrays: ArrayRecord,
    first_round: int,
    last_round: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
) -> ArrayRecord:
    """Train rounds ``first_round..last_round``; return the final global model.

    ``evaluate_fn(first_round - 1, initial_arrays)`` runs first (round 0: the
    initial model; on a resumed run, the model it resumes from), then after
    every round.

    Raises
    ------
    ConfigError
        If the round range is empty or starts below 1.
    """
    if first_round < 1 or last_round < first_round:
        raise ConfigError(f"cannot run rounds {first_round}..{last_round}")
    evaluate_fn(first_round - 1, initial_arrays)
    arrays = initial_arrays
    for server_round in range(first_round, last_round + 1):
        logger.info("round %d of %d", server_round, last_round)
        messages = strategy.configure_train(server_round, arrays, train_config, grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        aggregated, _metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        evaluate_fn(server_round, arrays)
    return arrays
