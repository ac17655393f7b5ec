"""Server-side differential privacy for FedAvg: central noise, adaptive clipping, secret sampling.

:class:`PrivateFedAvg` is Flower's FedAvg with the DP mode of a run
(:class:`ServerDp`):

- **central**: sends each round's clip (``fedge.cdp``), averages the clipped
  updates *unweighted* and adds N(0, (z_u C)^2) to their sum from the CSPRNG;
  with adaptive clipping it moves C with the noisy sum of the clipped bits,
  which only a secure round can deliver (checked at construction);
- **local**: sends ``fedge.ldp``; the devices noise their own updates;
- **sample**: sends ``fedge.dpsgd``; the devices run DP-SGD and report their
  own spend (in plain rounds; a secure round hides per-client metrics).

Sampling: ``poisson_sampling`` draws every node independently with
probability ``fraction_train`` from the OS CSPRNG and never publishes the
sample, instead of Flower's fixed-size ``random.sample``. Only that sampling,
by a server the deployment trusts (central DP), lets the run account with
amplification by sampling; :func:`amplification` says which claim holds and why.

Every spend is handed to ``on_spend`` (the ledger and the audit log), before
the round for the budget check and after it with the clients that took part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedge.errors import ConfigError
from secure_agg.noise import uniform53
from secure_agg.randomness import RandomSource, SystemRandomSource
from strategies.accounting import GaussianSteps, PrivacySpend
from strategies.central import (
    CDP_RECORD_KEY,
    LDP_RECORD_KEY,
    UNCLIPPED_METRIC,
    CentralDpRound,
    CentralDpSettings,
    LocalDpSettings,
    add_central_noise,
    next_clip,
)
from strategies.sample_dp import DPSGD_RECORD_KEY, SampleDpSettings

__all__ = [
    "Amplification",
    "PrivacyMechanism",
    "PrivateFedAvg",
    "ServerDp",
    "SpendSink",
    "amplification",
]

logger = logging.getLogger(__name__)

# What a device reports of its own DP-SGD spend (plain rounds only).
DPSGD_METRICS = ("dp-noise-multiplier", "dp-sample-rate", "dp-steps")


class PrivacyMechanism(Enum):
    """The DP mechanism of a run, as the ledger and the reports name it."""

    CENTRAL = "central-gaussian"
    DISTRIBUTED = "distributed-ddg"
    LOCAL = "local-gaussian"
    SAMPLE = "dp-sgd"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerDp:
    """The DP mode of a run on the server (exactly one of the three settings).

    Parameters
    ----------
    central, local, sample
        The mechanism's settings.
    secure
        Rounds run under secure aggregation (needed for adaptive clipping).
    poisson_sampling
        Sample nodes by independent CSPRNG coin flips (see :func:`amplification`).
    """

    central: CentralDpSettings | None = None
    local: LocalDpSettings | None = None
    sample: SampleDpSettings | None = None
    secure: bool = False
    poisson_sampling: bool = False

    def __post_init__(self) -> None:
        given = [s for s in (self.central, self.local, self.sample) if s is not None]
        if len(given) != 1:
            raise ConfigError("choose exactly one of central, local and sample-level DP")
        if self.central is not None and self.central.adaptive is not None and not self.secure:
            raise ConfigError(
                "adaptive clipping sums each client's clipped bit: it needs secure aggregation "
                "(add --secure-agg) so the bits are never sent in clear"
            )

    @property
    def mechanism(self) -> PrivacyMechanism:
        """Which mechanism this is."""
        if self.central is not None:
            return PrivacyMechanism.CENTRAL
        if self.local is not None:
            return PrivacyMechanism.LOCAL
        return PrivacyMechanism.SAMPLE


@dataclass(frozen=True, slots=True)
class Amplification:
    """Whether a run may account with amplification by sampling, at which rate, and why."""

    claimed: bool
    sample_rate: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        """Return the report's JSON form."""
        return {"claimed": self.claimed, "sample_rate": self.sample_rate, "reason": self.reason}


def amplification(
    mechanism: PrivacyMechanism, *, poisson_sampling: bool, fraction: float
) -> Amplification:
    """Return the amplification-by-sampling claim a run may make."""
    if mechanism is PrivacyMechanism.DISTRIBUTED:
        return Amplification(
            False,
            1.0,
            "distributed DP defends against the server, and the server that samples knows "
            "who took part: no amplification; every round is accounted at sample rate 1",
        )
    if mechanism is PrivacyMechanism.LOCAL:
        return Amplification(
            False,
            1.0,
            "local DP protects each update on its own device; a device knows when it takes "
            "part, so its guarantee is accounted per participation at sample rate 1",
        )
    if mechanism is PrivacyMechanism.SAMPLE:
        return Amplification(
            True,
            fraction,
            "sample-level DP-SGD: each device accounts its own Poisson batches (Opacus); "
            "client sampling adds nothing to a device's example-level guarantee",
        )
    if fraction >= 1:
        return Amplification(
            False, 1.0, "every client takes part in every round: nothing to amplify"
        )
    if not poisson_sampling:
        return Amplification(
            False,
            1.0,
            "clients are sampled by Flower's fixed-size random.sample, which is neither "
            "Poisson nor unpredictable: accounted at sample rate 1 (pass --poisson-sampling)",
        )
    return Amplification(
        True,
        fraction,
        f"clients are sampled independently with probability {fraction:g} by the OS CSPRNG "
        "on a server the deployment trusts (central DP) and the sample is never published: "
        "the subsampled Gaussian's amplification applies",
    )


class SpendSink(Protocol):
    """Where a private strategy reports spending (the ledger, the audit log)."""

    def check(self, spend: PrivacySpend) -> None:
        """Raise (e.g. ``BudgetExceeded``) if the round would exceed the run's budget."""
        ...

    def spent(
        self,
        server_round: int,
        spend: PrivacySpend | None,
        participants: Mapping[str, PrivacySpend],
        details: dict[str, Any],
    ) -> None:
        """Record the run-level spend (if any) and each participant's own."""
        ...


class PrivateFedAvg(FedAvg):
    """FedAvg with central, local or sample-level DP (see the module docstring).

    Parameters
    ----------
    dp
        The run's DP mode.
    sink
        Told about every spend.
    on_replies
        Told (round, successes, failures) of every round, like fedge's counting FedAvg.
    participants
        Returns the ids of the clients inside a secure round's aggregate.
    rng
        The CSPRNG of the noise and the sampling (seeded only in tests).
    """

    def __init__(
        self,
        *,
        dp: ServerDp,
        sink: SpendSink,
        on_replies: Callable[[int, int, int], None] | None = None,
        participants: Callable[[int], Sequence[int]] | None = None,
        rng: RandomSource | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dp = dp
        self._sink = sink
        self._on_replies = on_replies
        self._participants = participants
        self._rng = rng or SystemRandomSource()
        self.clip = dp.central.l2_clip if dp.central is not None else 0.0
        self.history: list[dict[str, Any]] = []
        self._amplification = amplification(
            dp.mechanism, poisson_sampling=dp.poisson_sampling, fraction=self.fraction_train
        )

    @property
    def amplification(self) -> Amplification:
        """The sampling claim this run accounts with."""
        return self._amplification

    def _gaussian(self, noise_multiplier: float, sample_rate: float = 1.0) -> PrivacySpend:
        event = GaussianSteps(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1)
        return PrivacySpend(mechanism=self.dp.mechanism.value, gaussian=event)

    def _run_spend(self) -> PrivacySpend | None:
        """Return the run-level spend: at the claimed sample rate (central), per update (local)."""
        if self.dp.central is not None:
            return self._gaussian(self.dp.central.noise_multiplier, self._amplification.sample_rate)
        if self.dp.local is not None:
            return self._gaussian(self.dp.local.accounted_noise_multiplier)
        return None

    def _sample(self, grid: Grid) -> list[int]:
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            logger.info("waiting for nodes: %d of %d", len(nodes), self.min_available_nodes)
            time.sleep(1)
        coins = uniform53(self._rng, len(nodes))
        return [node for node, u in zip(nodes, coins, strict=True) if u < self.fraction_train]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, sample, and add the round's DP record to every train message."""
        spend = self._run_spend()
        if spend is not None:
            self._sink.check(spend)
        if self.dp.poisson_sampling:
            node_ids = self._sample(grid)
            if len(node_ids) < self.min_train_nodes:
                # The round still counts as a step of the accountant (it ran, empty).
                logger.warning(
                    "round %d: the Poisson sample has %d nodes (< %d); skipping the round",
                    server_round,
                    len(node_ids),
                    self.min_train_nodes,
                )
                self._sink.spent(server_round, spend, {}, {"skipped": True})
                return []
            config["server-round"] = server_round
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            messages = list(self._construct_messages(content, node_ids, MessageType.TRAIN))
        else:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        record = self._dp_record()
        for message in messages:
            content = RecordDict(dict(message.content))
            content[record[0]] = record[1]
            message.content = content
        return messages

    def _dp_record(self) -> tuple[str, ConfigRecord]:
        if self.dp.central is not None:
            central = CentralDpRound(
                l2_clip=self.clip,
                noise_multiplier=self.dp.central.noise_multiplier,
                adaptive=self.dp.central.adaptive is not None,
            )
            return CDP_RECORD_KEY, ConfigRecord(dict(central.to_fields()))
        if self.dp.local is not None:
            return LDP_RECORD_KEY, ConfigRecord(dict(self.dp.local.to_fields()))
        assert self.dp.sample is not None
        return DPSGD_RECORD_KEY, ConfigRecord(dict(self.dp.sample.to_fields()))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as the mode needs, add the central noise, record the spend."""
        materialised = list(replies)
        valid = [r for r in materialised if not r.has_error()]
        failures = len(materialised) - len(valid)
        for reply in materialised:
            if reply.has_error():
                logger.warning("round %d: a client failed: %s", server_round, reply.error.reason)
        secure = len(valid) == 1 and "secagg-survivors" in _metrics(valid[0])
        if secure:
            survivors = int(_number(_metrics(valid[0]), "secagg-survivors"))
            ids = [str(n) for n in self._participants(server_round)] if self._participants else []
        else:
            survivors = len(valid)
            ids = [str(r.metadata.src_node_id) for r in valid]
        if self._on_replies is not None:
            self._on_replies(server_round, survivors, failures)
        if not valid:
            return None, None
        details: dict[str, Any] = {"participants": survivors}
        arrays: ArrayRecord | None
        metrics: MetricRecord | None
        if self.dp.central is not None:
            arrays = self._central(valid, secure=secure, survivors=survivors, details=details)
            if arrays is None:
                return None, None
            metrics = MetricRecord({"num-examples": survivors})
        else:
            arrays, metrics = super().aggregate_train(server_round, valid)
        per_client = self._per_client(valid, ids, secure=secure)
        self._sink.spent(server_round, self._run_spend(), per_client, details)
        self.history.append({"round": server_round, **details})
        return arrays, metrics

    def _central(
        self, valid: list[Message], *, secure: bool, survivors: int, details: dict[str, Any]
    ) -> ArrayRecord | None:
        central = self.dp.central
        assert central is not None
        models = [_only_arrays(r) for r in valid]
        keys = list(models[0].keys())
        shapes = [tuple(models[0][k].shape) for k in keys]
        flats: list[npt.NDArray[np.float64]] = []
        for model in models:
            if list(model.keys()) != keys or [tuple(model[k].shape) for k in keys] != shapes:
                logger.warning("a reply's model does not match the others; left out")
                continue
            flats.append(
                np.concatenate([model[k].numpy().reshape(-1) for k in keys]).astype(np.float64)
            )
        if not flats:
            return None
        # The secure aggregate is already the unweighted mean; plain replies are averaged here.
        mean: npt.NDArray[np.float64] = (
            flats[0] if secure else np.mean(np.stack(flats), axis=0, dtype=np.float64)
        )
        noisy = add_central_noise(
            mean,
            l2_clip=self.clip,
            noise_multiplier=central.update_noise_multiplier,
            # Divide like the sum: the noise on the sum stays exactly z_u C.
            num_clients=survivors if secure else len(flats),
            rng=self._rng,
        )
        details["l2_clip"] = self.clip
        details["update_noise_multiplier"] = central.update_noise_multiplier
        details["noise_std_of_sum"] = central.update_noise_multiplier * self.clip
        if central.adaptive is not None:
            if not secure or UNCLIPPED_METRIC not in _metrics(valid[0]):
                raise ConfigError("adaptive clipping needs the secure sum of the clipped bits")
            self.clip, fraction = next_clip(
                self.clip,
                unclipped_sum=_number(_metrics(valid[0]), UNCLIPPED_METRIC),
                num_clients=survivors,
                adaptive=central.adaptive,
                rng=self._rng,
            )
            details["noisy_unclipped_fraction"] = round(fraction, 4)
            details["next_l2_clip"] = self.clip
        return _unflatten(models[0], keys, noisy)

    def _per_client(
        self, valid: list[Message], ids: list[str], *, secure: bool
    ) -> dict[str, PrivacySpend]:
        if self.dp.central is not None:
            # A client knows it took part: its own spend is never amplified.
            return dict.fromkeys(ids, self._gaussian(self.dp.central.noise_multiplier))
        if self.dp.local is not None:
            return dict.fromkeys(ids, self._gaussian(self.dp.local.accounted_noise_multiplier))
        if secure:
            return {}  # per-client metrics never leave a secure round; devices keep their own
        out = {}
        for reply, node in zip(valid, ids, strict=True):
            reported = _metrics(reply)
            if all(key in reported for key in DPSGD_METRICS):
                try:
                    event = GaussianSteps(
                        noise_multiplier=_number(reported, "dp-noise-multiplier"),
                        sample_rate=_number(reported, "dp-sample-rate"),
                        steps=int(_number(reported, "dp-steps")),
                    )
                except (ConfigError, TypeError, ValueError) as exc:
                    logger.warning("node %s reported an invalid DP-SGD spend: %s", node, exc)
                    continue
                out[node] = PrivacySpend(mechanism=self.dp.mechanism.value, gaussian=event)
        return out


def _number(metrics: MetricRecord, key: str) -> float:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"metric {key!r} must be a number")
    return float(value)


def _metrics(reply: Message) -> MetricRecord:
    records = reply.content.metric_records
    return next(iter(records.values())) if len(records) == 1 else MetricRecord()


def _only_arrays(reply: Message) -> ArrayRecord:
    records = reply.content.array_records
    if len(records) != 1:
        raise ConfigError("a train reply must carry exactly one ArrayRecord")
    return next(iter(records.values()))


def _unflatten(template: ArrayRecord, keys: list[str], flat: np.ndarray[Any, Any]) -> ArrayRecord:
    out: dict[str, Array] = {}
    offset = 0
    for key in keys:
        current = template[key].numpy()
        size = current.size
        out[key] = Array(
            np.asarray(flat[offset : offset + size].reshape(current.shape), dtype=current.dtype)
        )
        offset += size
    return ArrayRecord(out)
