"""Byzantine clients for simulations: poisoned data and boosted or flipped updates.

A fraction of a simulation's partitions is Byzantine (:meth:`AttackConfig.byzantine_partitions`,
deterministic under the attack's seed). Two pieces make those partitions attack:

- :func:`poisoned_provider` wraps a data provider so Byzantine partitions train on
  poisoned data: labels flipped (``LABEL_FLIP``), or a trigger stamped on part of
  the images, which are relabelled to a target class (``BACKDOOR``);
- :func:`attack_mod` is a Flower mod that stands for a compromised training loop:
  after the train handler returns, a Byzantine node replaces its update ``local -
  global`` by ``scale`` times it (``SCALE``; ``LABEL_FLIP`` and ``BACKDOOR`` with
  a ``scale`` above 1: boosting, Bagdasaryan et al. 2020's model replacement) or
  by ``-scale`` times it (``SIGN_FLIP``). Honest nodes pass through.

:func:`backdoor_success_rate` measures a backdoor: the share of the test examples
not of the target class that the model puts in the target class once stamped.

Notes
-----
The attack mod sits innermost, next to the train handler: it is the device's
training that is compromised, so every mod above it (norm bound, client DP,
secure aggregation) sees the attacker's update as the device's own. Which
partitions are Byzantine and which examples are poisoned is simulation data, so
numpy's seeded ``Generator`` is the right tool; keys, masks and DP noise never
come from it. ``BACKDOOR`` stamps pixels, so it is for uint8 images (N, H, W)
only: a provider of float features (tabular data) gets a :class:`ConfigError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from torch import nn

from edge_runtime.models import images_to_tensor
from fedge.errors import ConfigError, FedgeError
from fl_client.updates import apply_update, flat_update

__all__ = [
    "ATTACK_ERROR_CODE",
    "TRIGGER_SIZE",
    "AttackConfig",
    "AttackKind",
    "PoisonedProvider",
    "Provider",
    "apply_trigger",
    "attack_mod",
    "backdoor_success_rate",
    "poisoned_provider",
]

logger = logging.getLogger(__name__)

ATTACK_ERROR_CODE: Final = 4390
TRIGGER_SIZE: Final = 3
"""The trigger: a TRIGGER_SIZE x TRIGGER_SIZE white square in the bottom-right corner."""
_TRIGGER_VALUE: Final = 255
# Independent numpy streams under one attack seed.
_BYZANTINE_STREAM: Final = 0xB12A
_POISON_STREAM: Final = 0x9015


class Provider(Protocol):
    """A picklable data provider, like :class:`fl_client.app.PartitionProvider`.

    Its inputs are uint8 images (N, H, W) or float features (N, ...).
    """

    def __call__(
        self, partition_id: int, num_partitions: int
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.integer]]:
        """Return the inputs and labels of partition ``partition_id`` of ``num_partitions``."""
        ...


class AttackKind(Enum):
    """What Byzantine clients do."""

    SCALE = "scale"
    """Send ``scale`` times the honest update."""
    SIGN_FLIP = "sign-flip"
    """Send ``-scale`` times the honest update."""
    LABEL_FLIP = "label-flip"
    """Train on flipped labels (``y -> num_classes - 1 - y``, or ``label_map``)."""
    BACKDOOR = "backdoor"
    """Train with a trigger on part of the images, relabelled to ``target_class``."""


_DATA_ATTACKS: Final = frozenset({AttackKind.LABEL_FLIP, AttackKind.BACKDOOR})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackConfig:
    """A simulation's Byzantine clients: which attack, how many, how strong.

    Parameters
    ----------
    kind
        The attack (:class:`AttackKind`).
    fraction
        Share of the partitions that are Byzantine, in [0, 1]; the count is
        ``fraction * num_clients`` rounded to the nearest integer (halves up).
    scale
        Factor on the update, finite and > 0: ``SCALE`` sends ``scale * update``,
        ``SIGN_FLIP`` ``-scale * update``; ``LABEL_FLIP`` and ``BACKDOOR`` boost
        their update by it (1: no boosting).
    target_class
        ``BACKDOOR``'s target class, in [0, num_classes).
    poison_fraction
        Share of a Byzantine partition's examples that ``BACKDOOR`` stamps and
        relabels, in (0, 1] (only examples not already of the target class).
    num_classes
        Number of classes, >= 2.
    label_map
        ``LABEL_FLIP`` only: ``(source, target)`` pairs, distinct sources; other
        labels are kept. ``None``: every label ``y`` becomes ``num_classes - 1 - y``.
    seed
        Seed of which partitions are Byzantine and which examples are poisoned, >= 0.

    Raises
    ------
    ConfigError
        If a field has the wrong type or is out of range (the message names it).
    """

    kind: AttackKind
    fraction: float
    scale: float = 1.0
    target_class: int = 0
    poison_fraction: float = 0.5
    num_classes: int = 10
    label_map: tuple[tuple[int, int], ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AttackKind):
            raise ConfigError(f"kind must be an AttackKind, got {type(self.kind).__name__}")
        if not (_is_number(self.fraction) and 0 <= self.fraction <= 1):
            raise ConfigError(f"fraction must be a number in [0, 1], got {self.fraction!r}")
        if not (_is_number(self.scale) and math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"scale must be a finite number > 0, got {self.scale!r}")
        if not (_is_int(self.num_classes) and self.num_classes >= 2):
            raise ConfigError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if not (_is_int(self.target_class) and 0 <= self.target_class < self.num_classes):
            raise ConfigError(
                f"target_class must be an integer in [0, {self.num_classes}), "
                f"got {self.target_class!r}"
            )
        if not (_is_number(self.poison_fraction) and 0 < self.poison_fraction <= 1):
            raise ConfigError(
                f"poison_fraction must be a number in (0, 1], got {self.poison_fraction!r}"
            )
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.label_map is not None:
            self._check_label_map(self.label_map)

    def _check_label_map(self, label_map: tuple[tuple[int, int], ...]) -> None:
        if self.kind is not AttackKind.LABEL_FLIP:
            raise ConfigError(f"label_map is for LABEL_FLIP only, not {self.kind.name}")
        if not isinstance(label_map, tuple) or not label_map:
            raise ConfigError("label_map must be a non-empty tuple of (source, target) pairs")
        for pair in label_map:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(_is_int(c) and 0 <= c < self.num_classes for c in pair)
            ):
                raise ConfigError(
                    f"label_map pairs must be (source, target) classes in "
                    f"[0, {self.num_classes}), got {pair!r}"
                )
        sources = [source for source, _ in label_map]
        if len(set(sources)) != len(sources):
            raise ConfigError("label_map maps a source class twice")

    @property
    def update_factor(self) -> float:
        """Return the factor a Byzantine node puts on its update (1: it sends it as trained)."""
        return -self.scale if self.kind is AttackKind.SIGN_FLIP else self.scale

    def byzantine_partitions(self, num_clients: int) -> frozenset[int]:
        """Return which of ``num_clients`` partitions are Byzantine (the same for a seed).

        Raises
        ------
        ConfigError
            If ``num_clients`` is not an integer >= 1.
        """
        if not (_is_int(num_clients) and num_clients >= 1):
            raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        count = math.floor(self.fraction * num_clients + 0.5)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _BYZANTINE_STREAM]))
        return frozenset(int(i) for i in rng.choice(num_clients, size=count, replace=False))

    def map_labels(self, labels: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
        """Return ``labels`` flipped as ``LABEL_FLIP`` does (a new array, same dtype).

        Raises
        ------
        ConfigError
            If a label is outside [0, num_classes).
        """
        values = np.asarray(labels)
        if values.size and (values.min() < 0 or values.max() >= self.num_classes):
            raise ConfigError(f"labels must be in [0, {self.num_classes}) to be flipped")
        table = np.arange(self.num_classes)[::-1].copy()
        if self.label_map is not None:
            table = np.arange(self.num_classes)
            for source, target in self.label_map:
                table[source] = target
        return table[values].astype(values.dtype)


def apply_trigger(
    images: npt.NDArray[np.uint8], *, size: int = TRIGGER_SIZE
) -> npt.NDArray[np.uint8]:
    """Return a copy of uint8 images (N, H, W) with a white square in the bottom-right corner.

    Raises
    ------
    ConfigError
        If the images are not uint8 (N, H, W) of at least ``size`` pixels a side.
    """
    _check_images(images, size)
    stamped = images.copy()
    stamped[:, -size:, -size:] = _TRIGGER_VALUE
    return stamped


def _check_images(images: npt.NDArray[Any], size: int = TRIGGER_SIZE) -> None:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ConfigError(
            "BACKDOOR stamps a trigger on uint8 images (N, H, W), got "
            f"{images.dtype} {images.shape}: it is for image data only, not float features"
        )
    if not (_is_int(size) and 1 <= size <= min(images.shape[1:])):
        raise ConfigError(f"the trigger size must be in [1, {min(images.shape[1:])}], got {size}")


@dataclass(frozen=True, slots=True)
class PoisonedProvider:
    """A picklable provider that poisons the data of the Byzantine partitions only.

    Parameters
    ----------
    provider
        The clean provider (picklable, like every provider a simulation ships).
    attack
        A ``LABEL_FLIP`` or ``BACKDOOR`` attack.
    """

    provider: Provider
    attack: AttackConfig

    def __call__(
        self, partition_id: int, num_partitions: int
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.integer]]:
        """Return partition ``partition_id``'s examples, poisoned if it is Byzantine.

        Raises
        ------
        ConfigError
            If a ``BACKDOOR`` partition's inputs are not uint8 images (N, H, W), or
            labels are outside the attack's classes.
        """
        inputs, labels = self.provider(partition_id, num_partitions)
        if partition_id not in self.attack.byzantine_partitions(num_partitions):
            return inputs, labels
        if self.attack.kind is AttackKind.LABEL_FLIP:
            return inputs, self.attack.map_labels(labels)
        _check_images(inputs)
        if len(inputs) != len(labels):
            raise ConfigError(f"{len(inputs)} images but {len(labels)} labels")
        target = self.attack.target_class
        candidates = np.flatnonzero(np.asarray(labels) != target)
        count = min(len(candidates), math.floor(self.attack.poison_fraction * len(labels) + 0.5))
        rng = np.random.default_rng(
            np.random.SeedSequence([self.attack.seed, _POISON_STREAM, partition_id])
        )
        chosen = rng.choice(candidates, size=count, replace=False)
        # Copies: a provider may hand out its cached arrays.
        images = inputs.copy()
        poisoned = np.array(labels, copy=True)
        images[chosen] = apply_trigger(images[chosen])
        poisoned[chosen] = target
        return images, poisoned


def poisoned_provider(provider: Provider, attack: AttackConfig) -> Provider:
    """Return a picklable provider giving Byzantine partitions poisoned data, others theirs.

    ``LABEL_FLIP`` and ``BACKDOOR`` poison data; for ``SCALE`` and ``SIGN_FLIP``,
    which leave the data alone, ``provider`` itself is returned.
    """
    if not isinstance(attack, AttackConfig):
        raise ConfigError(f"attack must be an AttackConfig, got {type(attack).__name__}")
    if attack.kind not in _DATA_ATTACKS:
        return provider
    return PoisonedProvider(provider, attack)


def _partition_of(context: Context, num_partitions: int) -> int:
    try:
        partition_id = int(context.node_config["partition-id"])
        declared = int(context.node_config.get("num-partitions", num_partitions))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("node config must set an integer 'partition-id'") from exc
    if not (0 <= partition_id < num_partitions) or declared != num_partitions:
        raise ConfigError(
            f"partition {partition_id} of {declared} does not fit the attack's "
            f"{num_partitions} partitions"
        )
    return partition_id


def _only_arrays(content: RecordDict, what: str) -> str:
    if len(content.array_records) != 1:
        raise ConfigError(f"{what} must carry exactly one ArrayRecord")
    return next(iter(content.array_records))


def attack_mod(attack: AttackConfig, num_partitions: int) -> Mod:
    """Return the mod by which Byzantine nodes replace their update (innermost mod).

    A Byzantine node's train reply carries ``global + f * (local - global)`` with
    ``f`` the attack's :attr:`~AttackConfig.update_factor`; its other records are
    kept. Honest nodes, other messages and a factor of 1 pass through. A request
    or reply it cannot read gets an error reply (code :data:`ATTACK_ERROR_CODE`).

    Raises
    ------
    ConfigError
        If ``attack`` is not an AttackConfig or ``num_partitions`` is not >= 1.
    """
    if not isinstance(attack, AttackConfig):
        raise ConfigError(f"attack must be an AttackConfig, got {type(attack).__name__}")
    byzantine = attack.byzantine_partitions(num_partitions)
    factor = attack.update_factor

    def byzantine_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or factor == 1:
            return call_next(msg, context)
        try:
            if _partition_of(context, num_partitions) not in byzantine:
                return call_next(msg, context)
            sent = msg.content.array_records[_only_arrays(msg.content, "the train message")]
        except FedgeError as exc:
            return _failed(msg, exc)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            key = _only_arrays(reply.content, "the train reply")
            update = flat_update(sent, reply.content.array_records[key])
            content = RecordDict(dict(reply.content))
            content[key] = apply_update(sent, factor * update)
        except FedgeError as exc:
            return _failed(msg, exc)
        return Message(content=content, reply_to=msg)

    return byzantine_mod


def _failed(msg: Message, exc: FedgeError) -> Message:
    logger.warning("attack mod: %s", exc)
    return Message(Error(code=ATTACK_ERROR_CODE, reason=f"attack: {exc}"), reply_to=msg)


@torch.no_grad()
def backdoor_success_rate(
    model: nn.Module,
    test_images: npt.NDArray[np.uint8],
    test_labels: npt.NDArray[np.integer],
    attack: AttackConfig,
    *,
    batch_size: int = 1000,
) -> float:
    """Return the share of non-target test examples the model puts in the target once stamped.

    Parameters
    ----------
    model
        A model on the CPU taking float images in [0, 1] of shape (N, 1, H, W);
        its training mode is restored afterwards.
    test_images, test_labels
        Clean uint8 test images (N, H, W) and their labels.
    attack
        A ``BACKDOOR`` attack (its target class).
    batch_size
        Images per forward pass, >= 1.

    Raises
    ------
    ConfigError
        If the attack is not a backdoor, the images are not uint8 (N, H, W), the
        lengths differ, or no test example is outside the target class.
    """
    if attack.kind is not AttackKind.BACKDOOR:
        raise ConfigError(
            f"a backdoor success rate needs a BACKDOOR attack, not {attack.kind.name}"
        )
    if not (_is_int(batch_size) and batch_size >= 1):
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _check_images(test_images)
    if len(test_images) != len(test_labels):
        raise ConfigError(f"{len(test_images)} images but {len(test_labels)} labels")
    others = np.asarray(test_labels) != attack.target_class
    if not others.any():
        raise ConfigError("no test example is outside the target class")
    stamped = apply_trigger(test_images[others])
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for start in range(0, len(stamped), batch_size):
            logits = model(images_to_tensor(stamped[start : start + batch_size]))
            hits += int((logits.argmax(dim=1) == attack.target_class).sum())
    finally:
        model.train(was_training)
    return hits / len(stamped)
