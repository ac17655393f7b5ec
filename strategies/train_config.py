"""How a device trains in one round: the hyper-parameters the server sends, typed and validated.

Both Flower sides share this codec: the server encodes :class:`TrainConfig`
with :func:`train_fields` into the round's ``config`` record, the device decodes
it (``fl_client.messages``) and validates every value once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from fedge.errors import ConfigError

__all__ = ["PROXIMAL_MU", "TRAIN_FIELDS", "TrainConfig", "train_fields"]

LOCAL_EPOCHS: Final = "local-epochs"
BATCH_SIZE: Final = "batch-size"
LEARNING_RATE: Final = "learning-rate"
MOMENTUM: Final = "momentum"
SEED: Final = "seed"
SERVER_ROUND: Final = "server-round"
PROXIMAL_MU: Final = "proximal-mu"
"""FedProx's key (``flwr.serverapp.strategy.FedProx`` adds it to the round's config)."""
MAX_PROXIMAL_MU: Final = 1e4
TRAIN_FIELDS: Final = (LOCAL_EPOCHS, BATCH_SIZE, LEARNING_RATE, MOMENTUM, SEED)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of one client's local training in one round.

    Parameters
    ----------
    local_epochs
        Passes over the local data per round, >= 1.
    batch_size
        Examples per SGD step, >= 1.
    learning_rate
        SGD step size, > 0.
    momentum
        SGD momentum in [0, 1).
    proximal_mu
        FedProx's proximal weight: the local loss adds ``mu / 2 * ||w - w_global||^2``
        (Li et al., MLSys 2020); 0 is plain local SGD. Set by the strategy, not
        by :func:`train_fields`.
    """

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ConfigError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate}"
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.proximal_mu) and 0 <= self.proximal_mu <= MAX_PROXIMAL_MU):
            raise ConfigError(
                f"proximal_mu must be in [0, {MAX_PROXIMAL_MU:g}], got {self.proximal_mu}"
            )


def train_fields(config: TrainConfig, *, seed: int) -> dict[str, int | float]:
    """Return the fields of the ``config`` record the server sends with every training request."""
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return {
        LOCAL_EPOCHS: config.local_epochs,
        BATCH_SIZE: config.batch_size,
        LEARNING_RATE: config.learning_rate,
        MOMENTUM: config.momentum,
        SEED: seed,
    }
