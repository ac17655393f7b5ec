"""A real fedge secure round in-process: 10 devices, 3 drop after sharing their keys.

Each device is a real fedge ClientApp (``make_client_app``, torch training on a
tiny model) with the fleet-behaviour mod outermost, before the device's own
mods (``fl_client.composition.device_mods``). The 3 devices the failure config
drops go offline at the masked-input stage, after their shares are out: the
server must unmask with the survivors' shares, and its model must equal the
plaintext FedAvg of the 7 survivors' updates within the quantisation bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from edge_runtime.model_spec import ModelSpec
from edge_runtime.models import InputEncoding
from fl_client.app import make_client_app
from fl_client.composition import device_mods
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid
from secure_agg.encoding import EncodingConfig
from simulations.fleet_behaviour import (
    DeviceProfiles,
    DropoutStage,
    FailureConfig,
    behaviour_mod,
)
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    POLICY,
    InProcessGrid,
    _server_identity,
)

pytestmark = pytest.mark.slow

NUM_DEVICES = 10
SEED = 2026
EXAMPLES = 24
CLIP = 0.5
WEIGHT_CAP = 100
STRAGGLER_DELAY_S = 0.3
SPEC = ModelSpec(
    import_path="simulations.tabular:SensorMLP",
    kwargs=(("hidden_units", (8,)), ("in_features", 5), ("num_classes", 3)),
    encoding=InputEncoding.FLOAT32,
)


@dataclass(frozen=True)
class Features:
    """A picklable provider: EXAMPLES rows of 5 float features per partition, 3 classes."""

    def __call__(self, partition_id: int, num_partitions: int) -> tuple[Any, Any]:
        rng = np.random.default_rng(partition_id)
        features = rng.normal(size=(EXAMPLES, 5)).astype(np.float32)
        return features, np.arange(EXAMPLES) % 3


def _examples(partition_id: int, num_partitions: int) -> int:
    return EXAMPLES


def _context(partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": NUM_DEVICES},
        state=RecordDict(),
        run_config={},
    )


def _train_message(content: RecordDict, node: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"plain-{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    message: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    return message


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().astype(np.float64).reshape(-1) for k in arrays])


def test_three_devices_drop_after_sharing_keys_and_the_survivors_sum_is_exact() -> None:
    failures = FailureConfig(
        dropout_fraction=0.3,
        dropout_stage=DropoutStage.TRAINING,
        straggler_fraction=0.1,
        straggler_delay_s=STRAGGLER_DELAY_S,
        time_scale=1.0,
    )
    profiles = DeviceProfiles(seed=SEED, example_seconds=0.001, bandwidth_mbps=50.0)
    dropped = failures.dropped_partitions(seed=SEED, server_round=1, num_partitions=NUM_DEVICES)
    stragglers = failures.straggler_partitions(
        seed=SEED, server_round=1, num_partitions=NUM_DEVICES
    )
    assert len(dropped) == 3 and len(stragglers) == 1
    survivors = sorted(set(range(NUM_DEVICES)) - dropped)
    apps = {
        100 + p: make_client_app(
            Features(),
            model=SPEC,
            mods=[
                behaviour_mod(
                    profiles,
                    failures,
                    seed=SEED,
                    num_partitions=NUM_DEVICES,
                    examples=_examples,
                ),
                *device_mods(POLICY, secure=True),
            ],
        )
        for p in range(NUM_DEVICES)
    }
    grid = InProcessGrid(apps)  # type: ignore[arg-type]
    for p in range(NUM_DEVICES):
        grid.contexts[100 + p] = _context(p)
    stats: list[SecAggRoundStats] = []
    # The protocol's dropout tolerance matches the fleet's: 30 % may drop.
    config = SecAggConfig(clip_range=CLIP, weight_cap=WEIGHT_CAP, dropout_fraction=0.3)
    secure = SecureAggregationGrid(grid, config, on_round=stats.append)
    strategy = FedAvg(
        fraction_evaluate=0.0, min_train_nodes=NUM_DEVICES, min_available_nodes=NUM_DEVICES
    )
    start = ArrayRecord(SPEC.build(seed=0).state_dict())
    train_config = ConfigRecord({"batch-size": 8, "learning-rate": 0.05, "seed": 7})
    messages = list(strategy.configure_train(1, start, train_config, secure))

    started = time.perf_counter()
    replies = list(secure.send_and_receive(messages, timeout=60))
    seconds = time.perf_counter() - started
    aggregated, _ = strategy.aggregate_train(1, replies)

    [round_stats] = stats
    assert round_stats.aborted is None
    assert round_stats.survivors == 7 and round_stats.survivor_ids == [100 + p for p in survivors]
    assert round_stats.total_weight == 7 * EXAMPLES
    assert set(round_stats.failures) == {100 + p for p in dropped}
    assert all(
        reason.startswith("masked-input: simulated device offline: dropped at training")
        for reason in round_stats.failures.values()
    )
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 3
    # The straggler slept on top of its training (the others' delays are milliseconds).
    assert seconds >= STRAGGLER_DELAY_S
    # The plaintext reference: each survivor trained alone, with the same round config.
    plain = make_client_app(Features(), model=SPEC)
    round_config = messages[0].content.config_records["config"]
    updates = []
    for p in survivors:
        content = RecordDict({"arrays": start, "config": round_config})
        reference = plain(_train_message(content, 100 + p), _context(p))
        assert not reference.has_error()
        updates.append(_flat(reference.content.array_records["arrays"]) - _flat(start))
    expected = _flat(start) + np.mean(updates, axis=0)
    assert aggregated is not None
    bound = EncodingConfig(
        clip_range=CLIP, max_clients=NUM_DEVICES, weight_cap=WEIGHT_CAP
    ).error_bound
    np.testing.assert_allclose(_flat(aggregated), expected, atol=bound)
    assert np.max(np.abs(np.mean(updates, axis=0))) > 10 * bound  # the round moved the model
