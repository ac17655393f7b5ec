"""Simulated device heterogeneity, dropouts mid-round and stragglers for simulations.

Two frozen configs describe a simulated fleet:

- :class:`DeviceProfiles`: each device's relative compute speed (log-normal,
  median 1.0), upload bandwidth (log-normal around ``bandwidth_mbps``) and the
  probability it is online for a round;
- :class:`FailureConfig`: the share of devices that drop *mid-round* and at
  which point of the round (:class:`DropoutStage`), the share that straggle and
  by how much, and ``time_scale``, which multiplies every simulated delay.

:func:`behaviour_mod` turns both into a Flower mod that sits OUTERMOST on a
device (before fedge's secure-aggregation mod, so it sees every SecAgg+ stage):
it sleeps for the device's simulated compute and upload time and makes a
dropping or offline device answer like a device the server lost.

Cost model (seconds, all multiplied by ``time_scale``)::

    compute = num_examples * local_epochs * example_seconds / speed
              (+ straggler_delay_s on a straggler), once per round, at training
    upload  = reply_bytes * 8 / (upload_mbps * 1e6), on every train-type reply

``reply_bytes`` counts what the reply's records carry
(:func:`fl_server.secagg.payload_bytes`): the weights in a plain round, the
masked vector (plus keys and shares at their stages) in a secure one. The
delays add to whatever the real computation took; they are real
``time.sleep`` calls, so on a simulation engine with fewer workers than
devices a sleeping device holds its worker, as a busy device would.

Notes
-----
Every draw is simulation data, so numpy's seeded ``Generator`` is the right
tool here: device profiles are a function of ``(DeviceProfiles.seed,
partition)``, a device's availability of ``(DeviceProfiles.seed, round,
partition)``, and which devices drop or straggle in a round of ``(seed,
round)`` (the mod's ``seed``), each from its own stream. Keys, masks and DP
noise never come from here. A dropped or offline device answers with Flower's
own ``NODE_UNAVAILABLE`` error (what a SuperLink answers for a node that
stopped sending heartbeats), never with a refusal code, so the server counts
it as dropped, not refused; an exception raised in a mod would reach the
server as an error too, but with a logged traceback and, in the simulation
engine, without the node's state saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedge.errors import ConfigError
from fl_server.secagg import payload_bytes
from secure_agg.envelope import RECORD_KEY, Envelope, Stage
from secure_agg.errors import InvalidMessage
from strategies.train_config import LOCAL_EPOCHS, SERVER_ROUND

__all__ = [
    "OFFLINE_ERROR_CODE",
    "DeviceProfile",
    "DeviceProfiles",
    "DropoutStage",
    "ExampleCount",
    "FailureConfig",
    "behaviour_mod",
]

logger = logging.getLogger(__name__)

OFFLINE_ERROR_CODE: Final = ErrorCode.NODE_UNAVAILABLE
"""The code a dropped or offline device answers with: Flower's own for a lost node."""

_PARTITION_ID: Final = "partition-id"
_CONFIG_KEY: Final = "config"
_NUM_EXAMPLES: Final = "num-examples"
_STATE_KEY: Final = "fedge.fleet-behaviour"
_STARTED: Final = "rounds-started"
_ROUND_ID: Final = "round-id"
_ROUND: Final = "round"
# Independent numpy streams under one seed.
_SPEED_STREAM: Final = 0x5BEED
_BANDWIDTH_STREAM: Final = 0xBA4D
_AVAILABILITY_STREAM: Final = 0xA7A1
_ROLES_STREAM: Final = 0xD40B


class DropoutStage(Enum):
    """Where in a round a dropping device goes offline, in the order a round reaches them.

    A device that drops at a stage answers no message from that stage on. In a
    plain (non-secure) round the device gets one train message: it drops there
    if its stage comes before the upload (``SETUP``, ``SHARE_KEYS``,
    ``TRAINING``) and completes the round otherwise (``CONSISTENCY``, ``UNMASK``).
    """

    SETUP = "setup"
    """Before advertising its keys: the server leaves it out of the key graph. In a
    round keyed in advance it answers neither the pre-key request nor the setup."""
    SHARE_KEYS = "share-keys"
    """After advertising keys, before sending its shares: its neighbours prune it. In a
    round keyed in advance (keys and shares in one reply) it announces a pre-key when
    asked, then answers no setup: for the round, the same as ``SETUP``."""
    TRAINING = "training"
    """After sharing keys, before sending its (masked) update: SecAgg+'s masked-input
    stage. The server removes its pairwise masks with the survivors' shares."""
    CONSISTENCY = "consistency"
    """After its masked input, before signing the survivor list (active model only):
    its input stays in the sum; it is not asked to unmask."""
    UNMASK = "unmask"
    """After its masked input, before sending its shares for unmasking: its input is in
    the sum; the round needs ``threshold`` of every survivor's holders to answer."""


# The first message of a secure round (a pre-key request, if any, comes before it).
_ROUND_STARTS: Final = frozenset({Stage.SETUP, Stage.PREKEYED})
_ORDER: Final = {stage: index for index, stage in enumerate(DropoutStage)}
_SECURE_STAGE: Final = {
    Stage.PREKEY: DropoutStage.SETUP,
    Stage.SETUP: DropoutStage.SETUP,
    Stage.PREKEYED: DropoutStage.SHARE_KEYS,
    Stage.SHARE_KEYS: DropoutStage.SHARE_KEYS,
    Stage.MASKED_INPUT: DropoutStage.TRAINING,
    Stage.CONSISTENCY: DropoutStage.CONSISTENCY,
    Stage.UNMASK: DropoutStage.UNMASK,
}


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    return float(value)


def _seed(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """One simulated device's hardware.

    Parameters
    ----------
    partition_id
        The device's partition (its identity in a simulation).
    speed
        Relative compute speed: 1.0 is the fleet's median device, 2.0 twice as fast.
    upload_mbps
        Upload bandwidth in Mbit/s.
    availability
        Probability that the device is online for a round.
    """

    partition_id: int
    speed: float
    upload_mbps: float
    availability: float

    def compute_seconds(
        self, num_examples: int, local_epochs: int, *, example_seconds: float
    ) -> float:
        """Return the simulated (unscaled) time of ``local_epochs`` passes over ``num_examples``."""
        return num_examples * local_epochs * example_seconds / self.speed

    def upload_seconds(self, num_bytes: int) -> float:
        """Return the simulated (unscaled) time to upload ``num_bytes``."""
        return num_bytes * 8 / (self.upload_mbps * 1e6)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfiles:
    """A fleet's heterogeneity, each device's share drawn from ``seed`` and its partition.

    Parameters
    ----------
    seed
        Seed of the fleet's hardware and availability draws, >= 0.
    speed_sigma
        Standard deviation of the log of the relative compute speed (median 1.0), >= 0;
        0 makes every device the median one.
    example_seconds
        Seconds one example takes for one epoch on the median device, >= 0.
    bandwidth_mbps
        Median upload bandwidth in Mbit/s, > 0.
    bandwidth_sigma
        Standard deviation of the log of the bandwidth, >= 0.
    availability
        Probability that a device is online for a round, in (0, 1]: a device is
        offline for a round with probability ``1 - availability``, drawn per
        ``(seed, round, partition)``.

    Raises
    ------
    ConfigError
        If a field is out of range (the message names it).
    """

    seed: int = 0
    speed_sigma: float = 0.5
    example_seconds: float = 0.001
    bandwidth_mbps: float = 10.0
    bandwidth_sigma: float = 0.5
    availability: float = 1.0

    def __post_init__(self) -> None:
        _seed("seed", self.seed)
        for name in ("speed_sigma", "example_seconds", "bandwidth_sigma"):
            if _finite(name, getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if _finite("bandwidth_mbps", self.bandwidth_mbps) <= 0:
            raise ConfigError(f"bandwidth_mbps must be > 0, got {self.bandwidth_mbps}")
        if not 0 < _finite("availability", self.availability) <= 1:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")

    def profile(self, partition_id: int) -> DeviceProfile:
        """Return the hardware of the device holding ``partition_id`` (the same every call).

        Raises
        ------
        ConfigError
            If ``partition_id`` is not an integer >= 0.
        """
        _seed("partition_id", partition_id)
        speed = np.random.default_rng([self.seed, _SPEED_STREAM, partition_id])
        bandwidth = np.random.default_rng([self.seed, _BANDWIDTH_STREAM, partition_id])
        return DeviceProfile(
            partition_id=partition_id,
            speed=float(np.exp(self.speed_sigma * speed.standard_normal())),
            upload_mbps=float(
                self.bandwidth_mbps * np.exp(self.bandwidth_sigma * bandwidth.standard_normal())
            ),
            availability=self.availability,
        )

    def available(self, partition_id: int, server_round: int) -> bool:
        """Return whether the device holding ``partition_id`` is online for ``server_round``.

        Raises
        ------
        ConfigError
            If ``partition_id`` or ``server_round`` is not an integer >= 0.
        """
        _seed("partition_id", partition_id)
        _seed("server_round", server_round)
        if self.availability == 1:
            return True
        rng = np.random.default_rng([self.seed, _AVAILABILITY_STREAM, server_round, partition_id])
        return bool(rng.random() < self.availability)


def _count(fraction: float, num_partitions: int) -> int:
    # Half up, never banker's rounding: 0.25 of 10 devices is 3, as a reader expects.
    return math.floor(fraction * num_partitions + 0.5)


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureConfig:
    """Which devices fail during a round, where, and how slow stragglers are.

    Parameters
    ----------
    dropout_fraction
        Share of the fleet's devices that drop mid-round, in [0, 1]: each round,
        ``round(dropout_fraction * num_partitions)`` partitions chosen from
        ``(seed, round)``. Of a round's sampled devices, the expected share is the
        same.
    dropout_stage
        Where a dropping device goes offline (:class:`DropoutStage`).
    straggler_fraction
        Share of the fleet's devices that straggle in a round, in [0, 1], chosen
        like the dropouts and never among them; ``dropout_fraction +
        straggler_fraction`` is at most 1.
    straggler_delay_s
        Extra seconds a straggler spends training, >= 0.
    time_scale
        Multiplies every simulated delay (compute, upload, straggling), >= 0;
        0 sleeps never (tests), 1 is simulated real time.

    Raises
    ------
    ConfigError
        If a field is out of range (the message names it).
    """

    dropout_fraction: float = 0.0
    dropout_stage: DropoutStage = DropoutStage.TRAINING
    straggler_fraction: float = 0.0
    straggler_delay_s: float = 0.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dropout_fraction", "straggler_fraction"):
            if not 0 <= _finite(name, getattr(self, name)) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.dropout_fraction + self.straggler_fraction > 1:
            raise ConfigError(
                "dropout_fraction + straggler_fraction must be <= 1 (a device either drops "
                f"or straggles), got {self.dropout_fraction} + {self.straggler_fraction}"
            )
        if not isinstance(self.dropout_stage, DropoutStage):
            raise ConfigError(f"dropout_stage must be a DropoutStage, got {self.dropout_stage!r}")
        for name in ("straggler_delay_s", "time_scale"):
            if _finite(name, getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _roles(self, seed: int, server_round: int, num_partitions: int) -> npt.NDArray[np.int64]:
        _seed("seed", seed)
        _seed("server_round", server_round)
        if isinstance(num_partitions, bool) or not isinstance(num_partitions, int):
            raise ConfigError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
        if num_partitions < 1:
            raise ConfigError(f"num_partitions must be an integer >= 1, got {num_partitions}")
        rng = np.random.default_rng([seed, _ROLES_STREAM, server_round])
        return rng.permutation(num_partitions)

    def dropped_partitions(
        self, *, seed: int, server_round: int, num_partitions: int
    ) -> frozenset[int]:
        """Return the partitions that drop mid-round in ``server_round``.

        Raises
        ------
        ConfigError
            If ``seed`` or ``server_round`` is negative or ``num_partitions`` < 1.
        """
        order = self._roles(seed, server_round, num_partitions)
        return frozenset(int(p) for p in order[: _count(self.dropout_fraction, num_partitions)])

    def straggler_partitions(
        self, *, seed: int, server_round: int, num_partitions: int
    ) -> frozenset[int]:
        """Return the partitions that straggle in ``server_round`` (none of them drops).

        Raises
        ------
        ConfigError
            If ``seed`` or ``server_round`` is negative or ``num_partitions`` < 1.
        """
        order = self._roles(seed, server_round, num_partitions)
        first = _count(self.dropout_fraction, num_partitions)
        last = min(num_partitions, first + _count(self.straggler_fraction, num_partitions))
        return frozenset(int(p) for p in order[first:last])


class ExampleCount(Protocol):
    """Return how many local examples a partition holds (the compute model's input)."""

    def __call__(self, partition_id: int, num_partitions: int) -> int:
        """Return the example count of ``partition_id`` out of ``num_partitions``."""
        ...


def _partition_of(context: Context, num_partitions: int) -> int:
    value = context.node_config.get(_PARTITION_ID)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"node config must set an integer {_PARTITION_ID!r}, got {value!r}")
    if not 0 <= value < num_partitions:
        raise ConfigError(f"partition-id {value} outside [0, {num_partitions})")
    return value


def _config_int(msg: Message, key: str) -> int | None:
    record = msg.content.config_records.get(_CONFIG_KEY)
    value = None if record is None else record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _envelope(msg: Message) -> Envelope | None:
    record = msg.content.config_records.get(RECORD_KEY)
    if record is None:
        return None
    return Envelope.from_fields(record)


class _Rounds:
    """Name the round a train message belongs to, the same for every stage of a secure round.

    The server round in the train config, else the message's group id when it
    is a number, else the count of rounds this node has started (a secure
    round's first stages carry neither). A secure round keeps the name it got
    at its setup, keyed by its round id, in the node's ``Context.state``.
    """

    @staticmethod
    def _state(context: Context) -> ConfigRecord:
        record = context.state.config_records.get(_STATE_KEY)
        if record is None:
            record = ConfigRecord({_STARTED: 0})
            context.state[_STATE_KEY] = record
        return record

    @classmethod
    def of(cls, msg: Message, envelope: Envelope | None, context: Context) -> int:
        state = cls._state(context)
        started = state.get(_STARTED, 0)
        started = started if isinstance(started, int) and not isinstance(started, bool) else 0
        if (
            envelope is not None
            and envelope.stage not in _ROUND_STARTS
            and state.get(_ROUND_ID) == envelope.round_id
        ):
            known = state.get(_ROUND)
            if isinstance(known, int) and not isinstance(known, bool):
                return known
        new_round = envelope is None or envelope.stage in _ROUND_STARTS
        if new_round:
            started += 1
            state[_STARTED] = started
        server_round = _config_int(msg, SERVER_ROUND)
        group = msg.metadata.group_id
        if server_round is None and group.isdigit():
            server_round = int(group)
        if server_round is None:
            # A pre-key request comes before the round it is for starts here.
            ahead = envelope is not None and envelope.stage is Stage.PREKEY
            server_round = max(started + 1 if ahead else started, 1)
        if envelope is not None and envelope.stage in _ROUND_STARTS:
            state[_ROUND_ID] = envelope.round_id
            state[_ROUND] = server_round
        return server_round


def _offline(msg: Message, reason: str) -> Message:
    return Message(
        Error(code=OFFLINE_ERROR_CODE, reason=f"simulated device offline: {reason}"),
        reply_to=msg,
    )


def behaviour_mod(
    profiles: DeviceProfiles,
    failures: FailureConfig,
    *,
    seed: int,
    num_partitions: int,
    examples: ExampleCount | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Mod:
    """Return a Flower mod that makes a device behave as its simulated hardware and failures say.

    Put it OUTERMOST, before fedge's secure-aggregation mod (``ClientApp(mods=[behaviour_mod(...),
    *fl_client.composition.device_mods(...)])``): only there does it see every
    SecAgg+ stage. Messages other than ``train`` pass through untouched.

    Parameters
    ----------
    profiles
        The fleet's hardware and availability.
    failures
        Who drops or straggles, where, and the time scale of every delay.
    seed
        Seed of the per-round dropout and straggler draws, >= 0.
    num_partitions
        Devices in the fleet, >= 1 (the node's ``partition-id`` must lie below it).
    examples
        The local example count of a partition, for the compute model. ``None``:
        the train reply's ``num-examples`` metric, which a secure round never
        exposes (no compute delay there, only stragglers' and upload delays).
    sleep
        Called with each message's total scaled delay in seconds (never with 0).

    Returns
    -------
    Mod
        The mod: a device offline for the round (:meth:`DeviceProfiles.available`)
        answers its first message of the round with :data:`OFFLINE_ERROR_CODE`; a
        dropping device answers so from its :class:`DropoutStage` on (at
        ``TRAINING`` after its compute time, without training); every other
        train-type reply is delayed by the device's compute time (at training)
        and upload time.

    Raises
    ------
    ConfigError
        If ``seed`` or ``num_partitions`` is out of range; at a message, if the
        node's ``partition-id`` is missing or not below ``num_partitions``.
    """
    _seed("seed", seed)
    failures.dropped_partitions(seed=seed, server_round=0, num_partitions=num_partitions)
    scale = failures.time_scale
    drop_at = _ORDER[failures.dropout_stage]

    def _epochs(msg: Message) -> int:
        value = _config_int(msg, LOCAL_EPOCHS)
        return value if value is not None and value >= 1 else 1

    def _examples(partition: int, reply: Message | None) -> int:
        if examples is not None:
            return int(examples(partition, num_partitions))
        if reply is None or reply.has_error():
            return 0
        for metrics in reply.content.metric_records.values():
            value = metrics.get(_NUM_EXAMPLES)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return int(value)
        return 0

    def _compute(profile: DeviceProfile, msg: Message, reply: Message | None, slow: bool) -> float:
        seconds = profile.compute_seconds(
            _examples(profile.partition_id, reply),
            _epochs(msg),
            example_seconds=profiles.example_seconds,
        )
        return seconds + (failures.straggler_delay_s if slow else 0.0)

    def _wait(seconds: float) -> None:
        scaled = seconds * scale
        if scaled > 0:
            sleep(scaled)

    def fleet_behaviour_mod(
        msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        try:
            envelope = _envelope(msg)
        except InvalidMessage:
            return call_next(msg, context)  # the secure mod refuses it, as it would any
        partition = _partition_of(context, num_partitions)
        stage = DropoutStage.TRAINING if envelope is None else _SECURE_STAGE[envelope.stage]
        server_round = _Rounds.of(msg, envelope, context)
        profile = profiles.profile(partition)
        if not profiles.available(partition, server_round):
            logger.debug("partition %d: offline for round %d", partition, server_round)
            return _offline(msg, f"unavailable for round {server_round}")
        dropped = failures.dropped_partitions(
            seed=seed, server_round=server_round, num_partitions=num_partitions
        )
        slow = partition in failures.straggler_partitions(
            seed=seed, server_round=server_round, num_partitions=num_partitions
        )
        if partition in dropped and _ORDER[stage] >= drop_at:
            if stage is DropoutStage.TRAINING and failures.dropout_stage is DropoutStage.TRAINING:
                # It trained for its compute time, then went offline before uploading.
                _wait(_compute(profile, msg, None, slow))
            logger.debug("partition %d: drops at %s of round %d", partition, stage, server_round)
            return _offline(msg, f"dropped at {stage.value} of round {server_round}")
        reply = call_next(msg, context)
        seconds = 0.0
        if stage is DropoutStage.TRAINING:
            seconds += _compute(profile, msg, reply, slow)
        if not reply.has_error():
            seconds += profile.upload_seconds(payload_bytes(reply.content))
        _wait(seconds)
        return reply

    return fleet_behaviour_mod
