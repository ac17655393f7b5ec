"""Simulated fleets: device profiles, dropouts and stragglers, the mod at every secure stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import FedAvg

from edge_runtime.model_spec import ModelSpec
from edge_runtime.models import InputEncoding
from fedge.errors import ConfigError
from fl_client.app import make_client_app
from fl_client.secagg_mod import make_secagg_mod
from fl_server.federation import REFUSAL_CATEGORIES
from fl_server.secagg import SecAggConfig, SecAggRoundStats, SecureAggregationGrid, payload_bytes
from secure_agg.envelope import RECORD_KEY, Envelope, Stage
from simulations.fleet_behaviour import (
    OFFLINE_ERROR_CODE,
    DeviceProfiles,
    DropoutStage,
    FailureConfig,
    behaviour_mod,
)
from tests.helpers import delivered
from tests.unit.fl_server.test_secagg_grid import (  # noqa: F401 - the fixture is autouse
    POLICY,
    InProcessGrid,
    _server_identity,
)

Handler = Callable[[Message, Context], Message]
NUM = 10


class Sleeps:
    """Record the delays a mod asks for instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _context(partition: int, num_partitions: int = NUM) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def _message(
    message_type: str = MessageType.TRAIN,
    arrays: ArrayRecord | None = None,
    config: dict[str, Any] | None = None,
) -> Message:
    if arrays is None:
        arrays = ArrayRecord({"w": Array(np.ones(4, dtype=np.float32))})
    fields: dict[str, Any] = {"server-round": 1} if config is None else config
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(fields)})
    return delivered(content, message_type)


def _step(msg: Message, context: Context) -> Message:
    """Train by moving every weight by 0.5 on 40 examples."""
    del context
    arrays = msg.content.array_records["arrays"]
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(0.5))})
    metrics = MetricRecord({"num-examples": 40, "train-loss": 0.7})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


# --- device profiles ----------------------------------------------------------------------


def test_profiles_are_a_function_of_the_seed_and_the_partition() -> None:
    profiles = DeviceProfiles(seed=3, speed_sigma=0.7, bandwidth_mbps=20.0)

    first = [profiles.profile(p) for p in range(50)]
    again = [
        DeviceProfiles(seed=3, speed_sigma=0.7, bandwidth_mbps=20.0).profile(p) for p in range(50)
    ]
    other = [
        DeviceProfiles(seed=4, speed_sigma=0.7, bandwidth_mbps=20.0).profile(p) for p in range(50)
    ]

    assert first == again
    assert [p.speed for p in first] != [p.speed for p in other]
    # A device's profile does not depend on the size of the fleet around it.
    assert profiles.profile(7) == first[7]
    assert len({p.speed for p in first}) == 50


def test_speed_and_bandwidth_are_log_normal_around_their_medians() -> None:
    profiles = DeviceProfiles(seed=1, speed_sigma=0.5, bandwidth_mbps=8.0, bandwidth_sigma=0.3)

    drawn = [profiles.profile(p) for p in range(4000)]
    log_speed = np.log([p.speed for p in drawn])
    log_bandwidth = np.log([p.upload_mbps for p in drawn])

    assert np.median([p.speed for p in drawn]) == pytest.approx(1.0, abs=0.05)
    assert np.std(log_speed) == pytest.approx(0.5, rel=0.05)
    assert np.median([p.upload_mbps for p in drawn]) == pytest.approx(8.0, rel=0.05)
    assert np.std(log_bandwidth) == pytest.approx(0.3, rel=0.05)
    flat = DeviceProfiles(speed_sigma=0.0, bandwidth_sigma=0.0, bandwidth_mbps=5.0).profile(9)
    assert (flat.speed, flat.upload_mbps) == (1.0, 5.0)


def test_the_cost_model() -> None:
    profile = DeviceProfiles(speed_sigma=0.0, bandwidth_sigma=0.0, bandwidth_mbps=8.0).profile(0)

    assert profile.compute_seconds(100, 2, example_seconds=0.01) == pytest.approx(2.0)
    assert profile.upload_seconds(1_000_000) == pytest.approx(1.0)


def test_availability_is_drawn_per_seed_round_and_partition() -> None:
    profiles = DeviceProfiles(seed=5, availability=0.7)

    draws = np.array([[profiles.available(p, r) for p in range(100)] for r in range(1, 41)])

    assert draws.mean() == pytest.approx(0.7, abs=0.03)
    again = [[DeviceProfiles(seed=5, availability=0.7).available(p, 3) for p in range(100)]]
    assert again == [draws[2].tolist()]
    assert draws[0].tolist() != draws[1].tolist()
    assert all(DeviceProfiles(availability=1.0).available(p, 1) for p in range(100))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, r"^seed must be an integer >= 0, got -1$"),
        ({"seed": True}, r"^seed must be an integer >= 0, got True$"),
        ({"speed_sigma": -0.1}, r"^speed_sigma must be >= 0, got -0.1$"),
        ({"speed_sigma": float("nan")}, r"^speed_sigma must be finite, got nan$"),
        ({"example_seconds": -1.0}, r"^example_seconds must be >= 0, got -1.0$"),
        ({"bandwidth_sigma": "1"}, r"^bandwidth_sigma must be a number, got str$"),
        ({"bandwidth_mbps": 0.0}, r"^bandwidth_mbps must be > 0, got 0.0$"),
        ({"bandwidth_mbps": float("inf")}, r"^bandwidth_mbps must be finite, got inf$"),
        ({"availability": 0.0}, r"^availability must be in \(0, 1\], got 0.0$"),
        ({"availability": 1.5}, r"^availability must be in \(0, 1\], got 1.5$"),
    ],
)
def test_bad_profiles_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DeviceProfiles(**kwargs)


def test_bad_partitions_and_rounds_are_refused() -> None:
    profiles = DeviceProfiles()
    with pytest.raises(ConfigError, match=r"^partition_id must be an integer >= 0, got -1$"):
        profiles.profile(-1)
    with pytest.raises(ConfigError, match=r"^server_round must be an integer >= 0, got -2$"):
        profiles.available(0, -2)


# --- failures -------------------------------------------------------------------------------


def test_dropouts_and_stragglers_are_exact_disjoint_and_deterministic() -> None:
    failures = FailureConfig(dropout_fraction=0.3, straggler_fraction=0.2)

    dropped = failures.dropped_partitions(seed=7, server_round=4, num_partitions=NUM)
    slow = failures.straggler_partitions(seed=7, server_round=4, num_partitions=NUM)

    assert len(dropped) == 3 and len(slow) == 2 and not dropped & slow
    assert dropped == failures.dropped_partitions(seed=7, server_round=4, num_partitions=NUM)
    rounds = {
        failures.dropped_partitions(seed=7, server_round=r, num_partitions=NUM) for r in range(20)
    }
    assert len(rounds) > 10
    # Half up: a quarter of 10 devices is 3.
    quarter = FailureConfig(dropout_fraction=0.25)
    assert len(quarter.dropped_partitions(seed=0, server_round=1, num_partitions=NUM)) == 3


def test_over_many_rounds_the_share_of_sampled_devices_that_drop_is_the_fraction() -> None:
    failures = FailureConfig(dropout_fraction=0.2)
    sampler = np.random.default_rng(0)
    shares = []
    for server_round in range(1, 301):
        sampled = sampler.choice(100, size=20, replace=False)
        dropped = failures.dropped_partitions(
            seed=11, server_round=server_round, num_partitions=100
        )
        shares.append(np.mean([int(p) in dropped for p in sampled]))

    assert np.mean(shares) == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_fraction": -0.1}, r"^dropout_fraction must be in \[0, 1\], got -0.1$"),
        ({"dropout_fraction": 1.1}, r"^dropout_fraction must be in \[0, 1\], got 1.1$"),
        ({"straggler_fraction": float("nan")}, r"^straggler_fraction must be finite, got nan$"),
        (
            {"dropout_fraction": 0.6, "straggler_fraction": 0.5},
            r"^dropout_fraction \+ straggler_fraction must be <= 1 .*got 0.6 \+ 0.5$",
        ),
        ({"dropout_stage": "training"}, r"^dropout_stage must be a DropoutStage, got 'training'$"),
        ({"straggler_delay_s": -1.0}, r"^straggler_delay_s must be >= 0, got -1.0$"),
        ({"time_scale": -0.5}, r"^time_scale must be >= 0, got -0.5$"),
        ({"time_scale": None}, r"^time_scale must be a number, got NoneType$"),
    ],
)
def test_bad_failure_configs_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FailureConfig(**kwargs)


def test_bad_mod_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^seed must be an integer >= 0, got -1$"):
        behaviour_mod(DeviceProfiles(), FailureConfig(), seed=-1, num_partitions=3)
    with pytest.raises(ConfigError, match=r"^num_partitions must be an integer >= 1, got 0$"):
        behaviour_mod(DeviceProfiles(), FailureConfig(), seed=0, num_partitions=0)
    with pytest.raises(ConfigError, match=r"^num_partitions must be an integer >= 1, got 2.0$"):
        behaviour_mod(DeviceProfiles(), FailureConfig(), seed=0, num_partitions=2.0)  # type: ignore[arg-type]


# --- the mod on plain rounds --------------------------------------------------------------------


def _flat(**kwargs: Any) -> DeviceProfiles:
    return DeviceProfiles(speed_sigma=0.0, bandwidth_sigma=0.0, **kwargs)


def test_time_scale_zero_never_sleeps() -> None:
    sleeps = Sleeps()
    failures = FailureConfig(straggler_fraction=1.0, straggler_delay_s=60.0, time_scale=0.0)
    mod = behaviour_mod(
        _flat(example_seconds=10.0), failures, seed=0, num_partitions=NUM, sleep=sleeps
    )

    started = time.perf_counter()
    replies = [mod(_message(), _context(p), _step) for p in range(NUM)]

    assert time.perf_counter() - started < 1.0
    assert sleeps.calls == [] and not any(r.has_error() for r in replies)
    # And with the real sleep: nothing to wait for either.
    real = behaviour_mod(_flat(example_seconds=10.0), failures, seed=0, num_partitions=NUM)
    assert not real(_message(), _context(0), _step).has_error()
    assert time.perf_counter() - started < 1.0


def test_a_device_sleeps_its_compute_and_upload_time_scaled() -> None:
    sleeps = Sleeps()
    profiles = _flat(example_seconds=0.01, bandwidth_mbps=1.0)
    failures = FailureConfig(time_scale=0.5)
    mod = behaviour_mod(profiles, failures, seed=0, num_partitions=NUM, sleep=sleeps)

    reply = mod(_message(config={"server-round": 1, "local-epochs": 3}), _context(2), _step)

    # 40 examples (the reply's count) x 3 epochs x 0.01 s, plus the reply's bytes at 1 Mbit/s.
    upload = payload_bytes(reply.content) * 8 / 1e6
    assert sleeps.calls == [pytest.approx(0.5 * (1.2 + upload))]
    # A given example count wins over the reply's; a straggler adds its delay.
    sleeps.calls.clear()
    slow = FailureConfig(straggler_fraction=1.0, straggler_delay_s=2.0, time_scale=1.0)
    counted = behaviour_mod(
        profiles, slow, seed=0, num_partitions=NUM, examples=lambda p, n: 10 * p, sleep=sleeps
    )
    reply = counted(_message(), _context(5), _step)
    assert sleeps.calls == [pytest.approx(50 * 0.01 + 2.0 + upload)]


def test_messages_other_than_train_pass_through_untouched() -> None:
    sleeps = Sleeps()
    mod = behaviour_mod(
        _flat(availability=0.01),
        FailureConfig(dropout_fraction=1.0),
        seed=0,
        num_partitions=1,
        sleep=sleeps,
    )
    message = _message(MessageType.EVALUATE)

    reply = mod(
        message,
        Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
        _step,
    )

    assert not reply.has_error() and sleeps.calls == []


def test_a_node_without_a_partition_is_a_config_error() -> None:
    mod = behaviour_mod(DeviceProfiles(), FailureConfig(), seed=0, num_partitions=NUM)
    with pytest.raises(ConfigError, match=r"^node config must set an integer 'partition-id'"):
        mod(
            _message(),
            Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
            _step,
        )
    with pytest.raises(ConfigError, match=r"^partition-id 12 outside \[0, 10\)$"):
        mod(_message(), _context(12, 20), _step)


@pytest.mark.parametrize(
    ("stage", "drops"),
    [
        (DropoutStage.SETUP, True),
        (DropoutStage.SHARE_KEYS, True),
        (DropoutStage.TRAINING, True),
        (DropoutStage.CONSISTENCY, False),
        (DropoutStage.UNMASK, False),
    ],
)
def test_in_a_plain_round_a_device_drops_if_its_stage_comes_before_the_upload(
    stage: DropoutStage, drops: bool
) -> None:
    trained: list[int] = []

    def train(msg: Message, context: Context) -> Message:
        trained.append(1)
        return _step(msg, context)

    failures = FailureConfig(dropout_fraction=1.0, dropout_stage=stage, time_scale=0.0)
    mod = behaviour_mod(DeviceProfiles(), failures, seed=0, num_partitions=NUM)

    reply = mod(_message(), _context(4), train)

    assert reply.has_error() is drops
    assert trained == ([] if drops else [1])


def test_an_unavailable_device_declines_the_round() -> None:
    profiles = DeviceProfiles(seed=2, availability=0.5)
    mod = behaviour_mod(profiles, FailureConfig(time_scale=0.0), seed=0, num_partitions=NUM)

    replies = {p: mod(_message(config={"server-round": 6}), _context(p), _step) for p in range(NUM)}

    offline = {p for p, r in replies.items() if r.has_error()}
    assert offline == {p for p in range(NUM) if not profiles.available(p, 6)}
    assert 0 < len(offline) < NUM
    reason = replies[min(offline)].error.reason
    assert reason == "simulated device offline: unavailable for round 6"


@dataclass(frozen=True)
class Features:
    """A picklable provider of 24 float feature rows of 5 columns, 3 classes."""

    size: int = 24

    def __call__(self, partition_id: int, num_partitions: int) -> tuple[Any, Any]:
        rng = np.random.default_rng(partition_id)
        return rng.normal(size=(self.size, 5)).astype(np.float32), np.arange(self.size) % 3


SPEC = ModelSpec(
    import_path="simulations.tabular:SensorMLP",
    kwargs=(("hidden_units", (8,)), ("in_features", 5), ("num_classes", 3)),
    encoding=InputEncoding.FLOAT32,
)


def test_a_dropping_fedge_client_app_returns_what_the_server_counts_as_dropped() -> None:
    failures = FailureConfig(dropout_fraction=0.3, time_scale=0.0)
    mod = behaviour_mod(DeviceProfiles(), failures, seed=9, num_partitions=NUM)
    app = make_client_app(Features(), model=SPEC, mods=[mod])
    start = ArrayRecord(SPEC.build(seed=0).state_dict())
    dropped = failures.dropped_partitions(seed=9, server_round=2, num_partitions=NUM)
    config = {"server-round": 2, "batch-size": 8, "learning-rate": 0.05}

    replies = {p: app(_message(arrays=start, config=config), _context(p)) for p in range(NUM)}

    assert {p for p, r in replies.items() if r.has_error()} == dropped
    for partition in dropped:
        error = replies[partition].error
        assert error.code == OFFLINE_ERROR_CODE and error.code not in REFUSAL_CATEGORIES
        assert error.reason == "simulated device offline: dropped at training of round 2"
    strategy = FedAvg(fraction_evaluate=0.0)
    aggregated, _ = strategy.aggregate_train(2, list(replies.values()))
    assert aggregated is not None  # the survivors' models, the dropped replies left out


# --- the mod at every stage of a secure round ----------------------------------------------------


def _chain(mods: list[Mod], train: Handler) -> Handler:
    """Compose mods as Flower's ClientApp does: the first is outermost."""
    handler = train
    for mod in reversed(mods):
        handler = _wrap(mod, handler)
    return handler


def _wrap(mod: Mod, inner: Handler) -> Handler:
    return lambda msg, context: mod(msg, context, inner)


def _secure_round(
    stage: DropoutStage, fraction: float, *, seed: int = 0, prekeys: bool = False
) -> tuple[list[Message], SecAggRoundStats, frozenset[int]]:
    num = 8
    failures = FailureConfig(dropout_fraction=fraction, dropout_stage=stage, time_scale=0.0)
    apps: dict[int, Handler] = {}
    for partition in range(num):
        apps[100 + partition] = _chain(
            [
                behaviour_mod(DeviceProfiles(), failures, seed=seed, num_partitions=num),
                make_secagg_mod(policy=POLICY),
            ],
            _step,
        )
    grid = InProcessGrid(apps)
    for node in apps:
        grid.contexts[node] = _context(node - 100, num)
    stats: list[SecAggRoundStats] = []
    config = SecAggConfig(clip_range=1.0, weight_cap=100, dropout_fraction=0.3, prekeys=prekeys)
    secure_grid = SecureAggregationGrid(grid, config, on_round=stats.append)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=num, min_available_nodes=num)
    start = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    replies = list(
        secure_grid.send_and_receive(
            strategy.configure_train(1, start, ConfigRecord(), secure_grid)
        )
    )
    dropped = failures.dropped_partitions(seed=seed, server_round=1, num_partitions=num)
    return replies, stats[0], frozenset(100 + p for p in dropped)


@pytest.mark.parametrize(
    ("stage", "prekeys", "reason", "in_sum"),
    [
        (DropoutStage.SETUP, False, "setup:", False),
        (DropoutStage.SHARE_KEYS, False, "share-keys:", False),
        (DropoutStage.TRAINING, False, "masked-input:", False),
        (DropoutStage.UNMASK, False, "unmask:", True),
        # Keyed in advance: 'setup' is offline from the pre-key request on; 'share-keys'
        # announced a key but answers nothing of the round itself.
        (DropoutStage.SETUP, True, "prekey:", False),
        (DropoutStage.SHARE_KEYS, True, "prekeyed-setup:", False),
        (DropoutStage.TRAINING, True, "masked-input:", False),
        (DropoutStage.UNMASK, True, "unmask:", True),
    ],
)
def test_a_secure_round_survives_dropouts_at_every_stage(
    stage: DropoutStage, prekeys: bool, reason: str, in_sum: bool
) -> None:
    replies, stats, dropped = _secure_round(stage, 0.25, prekeys=prekeys)

    assert len(dropped) == 2 and stats.aborted is None
    ok = [r for r in replies if not r.has_error()]
    assert len(ok) == 1
    mean = ok[0].content.array_records["arrays"]["w"].numpy()
    np.testing.assert_allclose(mean, np.full(4, 0.5), atol=0.01)
    assert set(stats.failures) == dropped
    assert all(stats.failures[n].startswith(reason) for n in dropped)
    # Dropped at unmask, a device's input is already in the sum: only its shares are missing.
    assert stats.survivors == (8 if in_sum else 6)


def test_a_pre_key_request_is_named_by_the_round_it_comes_before() -> None:
    failures = FailureConfig(dropout_fraction=0.5, dropout_stage=DropoutStage.SETUP, time_scale=0.0)
    fleet = 64

    def dropped(server_round: int) -> frozenset[int]:
        return failures.dropped_partitions(seed=0, server_round=server_round, num_partitions=fleet)

    # Dropped in round 1 (the round the request comes before), not in round 0.
    partition = next(p for p in range(fleet) if p in dropped(1) and p not in dropped(0))
    mod = behaviour_mod(DeviceProfiles(), failures, seed=0, num_partitions=fleet)

    reply = mod(_staged(Stage.PREKEY, b"p" * 16), _context(partition, fleet), _step)

    assert reply.has_error() and str(reply.error.reason).endswith("round 1")


def _staged(
    stage: Stage, round_id: bytes, *, config: dict[str, Any] | None = None, group: str = ""
) -> Message:
    message = _message(config=config or {})
    message.metadata.__dict__["_group_id"] = group
    message.content[RECORD_KEY] = ConfigRecord(dict(Envelope(stage, round_id, b"").to_fields()))
    return message


def test_every_stage_of_a_secure_round_is_named_by_the_round_its_setup_started() -> None:
    # The setup carries no round number: the node counts the rounds it started (1), and
    # the masked-input stage, which carries "server-round" 99, keeps that name.
    failures = FailureConfig(dropout_fraction=0.5, time_scale=0.0)
    fleet = 64

    def dropped(server_round: int) -> frozenset[int]:
        return failures.dropped_partitions(seed=0, server_round=server_round, num_partitions=fleet)

    # Dropped in rounds 1 and 2 (the counts), in neither 99 nor 5 (the names to use instead).
    partition = next(
        p
        for p in range(fleet)
        if p in dropped(1) and p in dropped(2) and p not in dropped(99) and p not in dropped(5)
    )
    mod = behaviour_mod(DeviceProfiles(), failures, seed=0, num_partitions=fleet)
    context = _context(partition, fleet)
    first, second = b"r" * 16, b"s" * 16

    setup = mod(_staged(Stage.SETUP, first), context, _step)
    masked = mod(_staged(Stage.MASKED_INPUT, first, config={"server-round": 99}), context, _step)
    # A numeric group id names the round when the train config does not.
    later = mod(_staged(Stage.SETUP, second, group="5"), context, _step)
    trained = mod(_staged(Stage.MASKED_INPUT, second, config={"server-round": 99}), context, _step)

    assert not setup.has_error()
    assert masked.has_error() and str(masked.error.reason).endswith("training of round 1")
    assert not later.has_error() and not trained.has_error()
