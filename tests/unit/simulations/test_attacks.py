"""Byzantine clients: which partitions, poisoned data, replaced updates, backdoor success."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn

from edge_runtime.models import ModelName, build_model
from fedge.errors import ConfigError
from fl_client.app import make_client_app
from fl_client.norm_bound_mod import make_norm_bound_mod
from simulations.attacks import (
    ATTACK_ERROR_CODE,
    TRIGGER_SIZE,
    AttackConfig,
    AttackKind,
    PoisonedProvider,
    apply_trigger,
    attack_mod,
    backdoor_success_rate,
    poisoned_provider,
)
from tests.helpers import delivered

Handler = Callable[[Message, Context], Message]
NUM_CLASSES = 4
SIDE = 28


@dataclass(frozen=True)
class Synthetic:
    """A picklable provider: per class, a bright block at its own place on faint noise.

    The bottom-right corner (where the trigger goes) stays dark in every clean image.
    """

    size: int = 120
    features: bool = False

    def __call__(self, partition_id: int, num_partitions: int) -> tuple[Any, Any]:
        rng = np.random.default_rng(partition_id)
        labels = np.arange(self.size) % NUM_CLASSES
        if self.features:
            return rng.normal(size=(self.size, 5)).astype(np.float32), labels
        images = rng.integers(0, 40, size=(self.size, SIDE, SIDE)).astype(np.uint8)
        for index, label in enumerate(labels):
            row, col = 3 + 5 * (label // 2), 3 + 8 * (label % 2)
            images[index, row : row + 6, col : col + 6] = 200
        return images, labels


def _context(partition: int, num_partitions: int = 10) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config={},
    )


def _message(message_type: str = MessageType.TRAIN, arrays: ArrayRecord | None = None) -> Message:
    if arrays is None:
        arrays = ArrayRecord({"w": Array(np.ones(4, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return delivered(content, message_type)


def _step(msg: Message, context: Context) -> Message:
    """Train by moving every weight by 0.5."""
    del context
    arrays = msg.content.array_records["arrays"]
    local = ArrayRecord({"w": Array(arrays["w"].numpy() + np.float32(0.5))})
    metrics = MetricRecord({"num-examples": 30, "train-loss": 0.7})
    return Message(content=RecordDict({"arrays": local, "metrics": metrics}), reply_to=msg)


def _update(reply: Message) -> npt.NDArray[np.float64]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply.content.array_records["arrays"]["w"].numpy().astype(np.float64) - 1.0


def _split(attack: AttackConfig, num: int = 10) -> tuple[int, int]:
    """Return one Byzantine and one honest partition."""
    byzantine = attack.byzantine_partitions(num)
    return min(byzantine), min(set(range(num)) - byzantine)


# --- which partitions -------------------------------------------------------------------


def test_byzantine_partitions_are_the_same_for_a_seed_and_sized_by_the_fraction() -> None:
    attack = AttackConfig(kind=AttackKind.SCALE, fraction=0.3, scale=10.0, seed=4)

    chosen = attack.byzantine_partitions(10)

    assert chosen == AttackConfig(kind=AttackKind.SCALE, fraction=0.3, seed=4).byzantine_partitions(
        10
    )
    assert len(chosen) == 3 and chosen <= set(range(10))
    others = {
        AttackConfig(kind=AttackKind.SCALE, fraction=0.3, seed=s).byzantine_partitions(10)
        for s in range(5, 15)
    }
    assert len(others) > 1, "the seed chooses which partitions"
    assert len(attack.byzantine_partitions(5)) == 2  # 1.5 rounds half up
    assert AttackConfig(kind=AttackKind.SCALE, fraction=0.0).byzantine_partitions(7) == set()
    assert AttackConfig(kind=AttackKind.SCALE, fraction=1.0).byzantine_partitions(7) == set(
        range(7)
    )
    with pytest.raises(ConfigError, match=r"^num_clients must be an integer >= 1, got 0$"):
        attack.byzantine_partitions(0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"kind": "scale"}, r"^kind must be an AttackKind, got str$"),
        ({"fraction": 1.5}, r"^fraction must be a number in \[0, 1\], got 1.5$"),
        ({"fraction": True}, r"^fraction must be a number in \[0, 1\], got True$"),
        ({"scale": 0.0}, r"^scale must be a finite number > 0, got 0.0$"),
        ({"scale": float("inf")}, r"^scale must be a finite number > 0, got inf$"),
        ({"num_classes": 1}, r"^num_classes must be an integer >= 2, got 1$"),
        ({"target_class": 10}, r"^target_class must be an integer in \[0, 10\), got 10$"),
        ({"target_class": 1.0}, r"^target_class must be an integer in \[0, 10\), got 1.0$"),
        ({"poison_fraction": 0.0}, r"^poison_fraction must be a number in \(0, 1\], got 0.0$"),
        ({"seed": -1}, r"^seed must be an integer >= 0, got -1$"),
        ({"label_map": ((1, 2),)}, r"^label_map is for LABEL_FLIP only, not SCALE$"),
        (
            {"kind": AttackKind.LABEL_FLIP, "label_map": ()},
            r"^label_map must be a non-empty tuple of \(source, target\) pairs$",
        ),
        (
            {"kind": AttackKind.LABEL_FLIP, "label_map": ((1, 10),)},
            r"^label_map pairs must be \(source, target\) classes in \[0, 10\), got \(1, 10\)$",
        ),
        (
            {"kind": AttackKind.LABEL_FLIP, "label_map": ((1, 2), (1, 3))},
            r"^label_map maps a source class twice$",
        ),
    ],
)
def test_bad_attack_configs_are_refused(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AttackConfig(**{"kind": AttackKind.SCALE, "fraction": 0.2, **fields})


# --- poisoned data ----------------------------------------------------------------------


def test_label_flip_poisons_only_the_byzantine_partitions() -> None:
    attack = AttackConfig(kind=AttackKind.LABEL_FLIP, fraction=0.3, num_classes=NUM_CLASSES)
    clean = Synthetic()
    provider = poisoned_provider(clean, attack)
    byzantine = attack.byzantine_partitions(10)

    for partition in range(10):
        images, labels = provider(partition, 10)
        clean_images, clean_labels = clean(partition, 10)
        np.testing.assert_array_equal(images, clean_images)
        if partition in byzantine:
            np.testing.assert_array_equal(labels, NUM_CLASSES - 1 - clean_labels)
        else:
            np.testing.assert_array_equal(labels, clean_labels)
    # Picklable, as the simulation engine ships providers to its workers.
    assert pickle.loads(pickle.dumps(provider)) == provider


def test_a_label_map_flips_only_its_sources() -> None:
    attack = AttackConfig(
        kind=AttackKind.LABEL_FLIP, fraction=0.5, num_classes=NUM_CLASSES, label_map=((1, 3),)
    )

    flipped = attack.map_labels(np.array([0, 1, 2, 3, 1], dtype=np.int64))

    np.testing.assert_array_equal(flipped, [0, 3, 2, 3, 3])
    assert flipped.dtype == np.int64
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 4\) to be flipped"):
        attack.map_labels(np.array([4]))


def test_update_attacks_leave_the_data_alone() -> None:
    clean = Synthetic()
    attack = AttackConfig(kind=AttackKind.SIGN_FLIP, fraction=0.5)

    assert poisoned_provider(clean, attack) is clean
    with pytest.raises(ConfigError, match=r"^attack must be an AttackConfig, got dict$"):
        poisoned_provider(clean, {})  # type: ignore[arg-type]


def test_backdoor_stamps_and_relabels_a_share_of_a_byzantine_partition() -> None:
    attack = AttackConfig(
        kind=AttackKind.BACKDOOR,
        fraction=0.5,
        target_class=2,
        poison_fraction=0.25,
        num_classes=NUM_CLASSES,
        seed=1,
    )
    byzantine, honest = _split(attack)
    clean = Synthetic()
    provider = poisoned_provider(clean, attack)
    clean_images, clean_labels = clean(byzantine, 10)

    images, labels = provider(byzantine, 10)

    stamped = np.all(images[:, -TRIGGER_SIZE:, -TRIGGER_SIZE:] == 255, axis=(1, 2))
    assert stamped.sum() == 30  # 25 % of 120, all from other classes
    assert np.all(clean_labels[stamped] != 2) and np.all(labels[stamped] == 2)
    np.testing.assert_array_equal(labels[~stamped], clean_labels[~stamped])
    np.testing.assert_array_equal(images[~stamped], clean_images[~stamped])
    # The rest of a stamped image is untouched, and the same seed poisons the same examples.
    np.testing.assert_array_equal(
        images[stamped, :-TRIGGER_SIZE], clean_images[stamped, :-TRIGGER_SIZE]
    )
    np.testing.assert_array_equal(provider(byzantine, 10)[0], images)
    honest_images, honest_labels = provider(honest, 10)
    np.testing.assert_array_equal(honest_images, clean(honest, 10)[0])
    np.testing.assert_array_equal(honest_labels, clean(honest, 10)[1])


def test_backdoor_is_for_images_only() -> None:
    attack = AttackConfig(kind=AttackKind.BACKDOOR, fraction=1.0, num_classes=NUM_CLASSES)

    with pytest.raises(ConfigError, match=r"for image data only, not float features"):
        PoisonedProvider(Synthetic(features=True), attack)(0, 3)
    with pytest.raises(ConfigError, match=r"uint8 images \(N, H, W\)"):
        apply_trigger(np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"^the trigger size must be in \[1, 2\], got 3$"):
        apply_trigger(np.zeros((1, 2, 2), dtype=np.uint8))


def test_the_trigger_is_a_white_corner_on_a_copy() -> None:
    images = np.zeros((2, 5, 5), dtype=np.uint8)

    stamped = apply_trigger(images)

    assert images.sum() == 0
    assert stamped[:, 2:, 2:].min() == 255 and stamped.sum() == 2 * 9 * 255


# --- replaced updates -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "scale", "expected"),
    [
        (AttackKind.SCALE, 10.0, 5.0),
        (AttackKind.SIGN_FLIP, 1.0, -0.5),
        (AttackKind.SIGN_FLIP, 4.0, -2.0),
        (AttackKind.BACKDOOR, 3.0, 1.5),  # boosting (model replacement)
        (AttackKind.LABEL_FLIP, 1.0, 0.5),  # a data attack without boosting: as trained
    ],
)
def test_a_byzantine_node_replaces_its_update_and_an_honest_one_does_not(
    kind: AttackKind, scale: float, expected: float
) -> None:
    attack = AttackConfig(kind=kind, fraction=0.3, scale=scale, num_classes=NUM_CLASSES)
    mod = attack_mod(attack, 10)
    byzantine, honest = _split(attack)

    attacked = mod(_message(), _context(byzantine), _step)
    passed = mod(_message(), _context(honest), _step)

    np.testing.assert_allclose(_update(attacked), expected)
    np.testing.assert_allclose(_update(passed), 0.5)
    metrics = attacked.content.metric_records["metrics"]
    assert dict(metrics) == {"num-examples": 30, "train-loss": 0.7}


def test_the_attack_mod_passes_other_messages_and_refuses_what_it_cannot_read() -> None:
    attack = AttackConfig(kind=AttackKind.SCALE, fraction=1.0, scale=5.0)
    mod = attack_mod(attack, 10)

    evaluated = mod(_message(MessageType.EVALUATE), _context(0), _step)
    unknown = mod(_message(), _context(12), _step)
    two_models = _message()
    two_models.content["other"] = ArrayRecord({"v": Array(np.ones(1, dtype=np.float32))})
    no_model = mod(two_models, _context(0), _step)

    def failing(msg: Message, context: Context) -> Message:
        return Message(Error(code=7, reason="out of memory"), reply_to=msg)

    failed = mod(_message(), _context(0), failing)

    np.testing.assert_allclose(_update(evaluated), 0.5)
    assert unknown.has_error() and unknown.error.code == ATTACK_ERROR_CODE
    assert "partition 12 of 10 does not fit the attack's 10 partitions" in str(unknown.error.reason)
    assert no_model.has_error() and no_model.error.code == ATTACK_ERROR_CODE
    assert failed.has_error() and failed.error.code == 7
    with pytest.raises(ConfigError, match=r"^attack must be an AttackConfig, got str$"):
        attack_mod("scale", 10)  # type: ignore[arg-type]


def test_the_device_norm_bound_holds_against_a_boosting_node() -> None:
    attack = AttackConfig(kind=AttackKind.SCALE, fraction=1.0, scale=100.0)
    bound, boost = make_norm_bound_mod(0.3), attack_mod(attack, 10)

    # Outermost first: the norm bound, then the (compromised) training.
    reply = bound(_message(), _context(0), lambda msg, ctx: boost(msg, ctx, _step))

    update = _update(reply)
    assert np.linalg.norm(update) == pytest.approx(0.3, rel=1e-6)
    assert np.all(update > 0)


# --- backdoor success -------------------------------------------------------------------


def _fit(provider: Callable[[int, int], tuple[Any, Any]], partition: int) -> nn.Module:
    """Fit a linear model on a partition with full-batch SGD (deterministic)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, NUM_CLASSES))
    images, labels = provider(partition, 2)
    inputs = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    targets = torch.from_numpy(labels.astype(np.int64))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(60):
        optimiser.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimiser.step()
    return model


def test_the_trigger_moves_a_backdoored_model_and_not_a_clean_one() -> None:
    attack = AttackConfig(
        kind=AttackKind.BACKDOOR,
        fraction=0.5,
        target_class=0,
        poison_fraction=0.3,
        num_classes=NUM_CLASSES,
        seed=2,
    )
    [byzantine] = attack.byzantine_partitions(2)
    test_images, test_labels = Synthetic(size=80)(99, 2)

    clean = _fit(Synthetic(), byzantine)
    poisoned = _fit(poisoned_provider(Synthetic(), attack), byzantine)
    poisoned.train()

    clean_rate = backdoor_success_rate(clean, test_images, test_labels, attack)
    poisoned_rate = backdoor_success_rate(poisoned, test_images, test_labels, attack)

    assert clean_rate < 0.2
    assert poisoned_rate > 0.8
    assert poisoned.training, "the model's mode is restored"


def test_a_backdoor_rate_needs_a_backdoor_and_examples_outside_the_target() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, NUM_CLASSES))
    images = np.zeros((3, SIDE, SIDE), dtype=np.uint8)
    backdoor = AttackConfig(kind=AttackKind.BACKDOOR, fraction=0.1, num_classes=NUM_CLASSES)

    with pytest.raises(ConfigError, match=r"^a backdoor success rate needs a BACKDOOR attack"):
        backdoor_success_rate(
            model,
            images,
            np.zeros(3, dtype=np.int64),
            AttackConfig(kind=AttackKind.SCALE, fraction=0.1),
        )
    with pytest.raises(ConfigError, match=r"^no test example is outside the target class$"):
        backdoor_success_rate(model, images, np.zeros(3, dtype=np.int64), backdoor)
    with pytest.raises(ConfigError, match=r"^3 images but 2 labels$"):
        backdoor_success_rate(model, images, np.ones(2, dtype=np.int64), backdoor)
    with pytest.raises(ConfigError, match=r"^batch_size must be an integer >= 1, got 0$"):
        backdoor_success_rate(model, images, np.ones(3, dtype=np.int64), backdoor, batch_size=0)


# --- in a real fedge ClientApp ----------------------------------------------------------


def test_a_fedge_client_app_with_the_attack_and_the_norm_bound_sends_a_bounded_update() -> None:
    attack = AttackConfig(kind=AttackKind.LABEL_FLIP, fraction=1.0, scale=50.0)
    provider = poisoned_provider(Synthetic(size=16), attack)
    app = make_client_app(
        provider,
        model=ModelName.CNN,
        mods=[make_norm_bound_mod(0.5), attack_mod(attack, 10)],
    )
    start = ArrayRecord(build_model(ModelName.CNN, seed=0).state_dict())
    config = ConfigRecord({"server-round": 1, "batch-size": 8, "learning-rate": 0.05})
    message = _message(arrays=start)
    message.content["config"] = config

    reply = app(message, _context(3))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    trained = reply.content.array_records["arrays"]
    update = np.concatenate(
        [(trained[k].numpy().astype(np.float64) - start[k].numpy()).reshape(-1) for k in start]
    )
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-4)
