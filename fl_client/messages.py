"""Decode and encode the records a training round exchanges with the server.

The server sends ``arrays`` (the global model) and ``config`` (a ConfigRecord with
the keys below); the client answers with ``arrays`` (its local model) and
``metrics`` (``num-examples`` and ``train-loss``). Every field is validated once,
here, so the training code only ever sees typed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedge.errors import ConfigError
from strategies.train_config import (
    BATCH_SIZE,
    LEARNING_RATE,
    LOCAL_EPOCHS,
    MOMENTUM,
    PROXIMAL_MU,
    SEED,
    SERVER_ROUND,
    TrainConfig,
    train_fields,
)

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "METRICS_KEY",
    "TrainInstruction",
    "decode_train_instruction",
    "encode_train_config",
]

ARRAYS_KEY: Final = "arrays"
CONFIG_KEY: Final = "config"
METRICS_KEY: Final = "metrics"


@dataclass(frozen=True, slots=True)
class TrainInstruction:
    """A decoded training request: the global weights, how to train, which round."""

    arrays: ArrayRecord
    config: TrainConfig
    seed: int
    server_round: int


def encode_train_config(config: TrainConfig, *, seed: int) -> ConfigRecord:
    """Return the ConfigRecord the server sends with every training request."""
    fields: dict[str, Any] = dict(train_fields(config, seed=seed))
    return ConfigRecord(fields)


def _int(record: ConfigRecord, key: str, default: int) -> int:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"train config {key!r} must be an integer, got {type(value).__name__}")
    return value


def _float(record: ConfigRecord, key: str, default: float) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"train config {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def decode_train_instruction(content: RecordDict) -> TrainInstruction:
    """Validate a training request's content and return it typed.

    Missing hyper-parameters take :class:`TrainConfig`'s defaults, so any Flower
    strategy that sends an empty config can drive a fedge client.

    Raises
    ------
    ConfigError
        If the global weights are missing or a value has the wrong type or range.
    """
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        if len(content.array_records) != 1:
            raise ConfigError(
                f"train message must carry exactly one ArrayRecord (preferably {ARRAYS_KEY!r}), "
                f"got {len(content.array_records)}"
            )
        arrays = next(iter(content.array_records.values()))
    record = content.config_records.get(CONFIG_KEY, ConfigRecord())
    defaults = TrainConfig()
    config = TrainConfig(
        local_epochs=_int(record, LOCAL_EPOCHS, defaults.local_epochs),
        batch_size=_int(record, BATCH_SIZE, defaults.batch_size),
        learning_rate=_float(record, LEARNING_RATE, defaults.learning_rate),
        momentum=_float(record, MOMENTUM, defaults.momentum),
        proximal_mu=_float(record, PROXIMAL_MU, defaults.proximal_mu),
    )
    seed = _int(record, SEED, 0)
    server_round = _int(record, SERVER_ROUND, 0)
    if seed < 0 or server_round < 0:
        raise ConfigError("train config 'seed' and 'server-round' must be >= 0")
    return TrainInstruction(arrays=arrays, config=config, seed=seed, server_round=server_round)
