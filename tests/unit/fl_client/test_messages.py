from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedge.errors import ConfigError
from fl_client.messages import decode_train_instruction, encode_train_config
from fl_client.training import TrainConfig

ARRAYS = ArrayRecord([np.zeros(3, dtype=np.float32)])


def test_round_trip_of_the_train_config() -> None:
    config = TrainConfig(local_epochs=2, batch_size=16, learning_rate=0.01, momentum=0.5)
    record = encode_train_config(config, seed=42)
    record["server-round"] = 3

    decoded = decode_train_instruction(RecordDict({"arrays": ARRAYS, "config": record}))

    assert decoded.config == config
    assert (decoded.seed, decoded.server_round) == (42, 3)


def test_an_empty_config_takes_the_defaults() -> None:
    decoded = decode_train_instruction(RecordDict({"arrays": ARRAYS}))

    assert decoded.config == TrainConfig()
    assert decoded.server_round == 0


def test_a_single_differently_named_array_record_is_accepted() -> None:
    decoded = decode_train_instruction(RecordDict({"model": ARRAYS}))

    assert decoded.arrays is ARRAYS


def test_missing_weights_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one ArrayRecord"):
        decode_train_instruction(RecordDict({"config": ConfigRecord()}))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"local-epochs": "2"}, "'local-epochs' must be an integer, got str"),
        ({"batch-size": True}, "'batch-size' must be an integer, got bool"),
        ({"learning-rate": "fast"}, "'learning-rate' must be a number, got str"),
        ({"local-epochs": 0}, "local_epochs must be >= 1"),
        ({"seed": -1}, "must be >= 0"),
    ],
)
def test_bad_values_are_refused(entry: dict[str, object], message: str) -> None:
    content = RecordDict({"arrays": ARRAYS, "config": ConfigRecord(entry)})  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match=message):
        decode_train_instruction(content)
