"""Server-side differential privacy as a wrapper around any Flower strategy.

:class:`DifferentialPrivacy` wraps a ``flwr.serverapp.strategy.Strategy``
(FedAvg, FedProx, FedAdam, FedYogi, FedAvgM, ...) the way Flower's own DP
wrappers do: the wrapped strategy builds the train messages and the wrapper
adds the round's DP record (``fedge.cdp``, ``fedge.ldp`` or ``fedge.dpsgd``);
evaluation and the summary are delegated unchanged.

Central DP: the wrapper computes the unweighted mean of the clipped updates
*relative to the global model the round started from*, adds N(0, (z_u C)^2)
to their sum from the CSPRNG, and hands the wrapped strategy ONE reply
carrying the noisy model, as the secure Grid does with its aggregate. A
weighted mean of one reply is that reply, so FedAvg returns the noisy model;
a server optimiser (FedAdam, FedYogi, FedAvgM) takes its step towards it.
Flower's own server-side wrapper instead adds the noise *after* the wrapped
strategy's aggregate: that is only private for an unweighted mean, since a
weighted mean or an adaptive step changes the sensitivity the noise is sized
for. Whatever the wrapped strategy does with a noisy model is post-processing.
(Robust rules such as Krum or FedMedian see one reply and have nothing to
choose from: wrap a mean or a server optimiser.)

Local and sample-level DP: the devices privatise; the wrapped strategy
aggregates their replies as usual. Every spend goes to the ``sink`` (the
ledger and the audit log): before a round for the run's budget check; once
the round's participants are known, before its aggregate is computed or handed
to the wrapped strategy, for each participant's lifetime cap
(``SpendSink.check_participants``); after it, for the run and each participant.
In a secure round the participants are read from the aggregate reply
(:func:`fl_server.participants.secure_participants`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedge.errors import ConfigError
from fl_server._dp_records import (
    flat,
    log_failures,
    metrics_of,
    number,
    only_arrays,
    reported_dpsgd,
    same_layout,
    unflatten,
)
from fl_server.participants import round_participants
from fl_server.privacy import Amplification, PrivacyMechanism, ServerDp, amplification
from fl_server.spend import SpendSink
from secure_agg.noise import uniform53
from secure_agg.randomness import RandomSource, SystemRandomSource
from strategies.accounting import GaussianSteps, PrivacySpend
from strategies.central import (
    CENTRED_BITS_METRIC,
    SENSITIVITY_METRIC,
    add_central_noise,
    next_clip,
)
from strategies.clipping import clip_l2

__all__ = ["DifferentialPrivacy"]

logger = logging.getLogger(__name__)

_DP_WRAPPERS = (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)


def _fraction(strategy: Strategy) -> float | None:
    value = getattr(strategy, "fraction_train", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class DifferentialPrivacy(Strategy):
    """Central, local or sample-level DP around any Flower strategy (see the module docstring).

    Parameters
    ----------
    strategy
        The strategy to wrap; it samples (unless ``dp.poisson_sampling``), builds
        the train messages and aggregates.
    dp
        The run's DP mode.
    sink
        Told about every spend.
    on_replies
        Told (round, clients counted, clients failed) of every round.
    rng
        The CSPRNG of the noise and the sampling (seeded only in tests).

    Raises
    ------
    ConfigError
        If an argument has the wrong type, the strategy already adds DP, or
        Poisson sampling is asked of a strategy without a ``fraction_train`` in (0, 1].
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        dp: ServerDp,
        sink: SpendSink,
        on_replies: Callable[[int, int, int], None] | None = None,
        rng: RandomSource | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                "strategy must be a flwr.serverapp.strategy.Strategy, "
                f"got {type(strategy).__name__}"
            )
        if isinstance(strategy, (DifferentialPrivacy, *_DP_WRAPPERS)):
            raise ConfigError(
                f"{type(strategy).__name__} already adds differential privacy: wrap the "
                "strategy it wraps instead (two wrappers would clip and noise twice)"
            )
        if not isinstance(dp, ServerDp):
            raise ConfigError(f"dp must be a ServerDp, got {type(dp).__name__}")
        if not isinstance(sink, SpendSink):
            raise ConfigError("sink must be a SpendSink (with check, check_participants and spent)")
        if on_replies is not None and not callable(on_replies):
            raise ConfigError("on_replies must be callable or None")
        if rng is not None and not callable(getattr(rng, "random_bytes", None)):
            raise ConfigError("rng must be a RandomSource (with random_bytes)")
        fraction = _fraction(strategy)
        if dp.poisson_sampling:
            if fraction is None:
                raise ConfigError(
                    "Poisson sampling draws each node with the strategy's fraction_train, "
                    f"and {type(strategy).__name__} has none"
                )
            if not 0 < fraction <= 1:
                raise ConfigError(
                    f"Poisson sampling needs fraction_train in (0, 1], got {fraction}"
                )
        self._strategy = strategy
        self.dp = dp
        self._sink = sink
        self._on_replies = on_replies
        self._rng = rng or SystemRandomSource()
        self.clip = dp.central.l2_clip if dp.central is not None else 0.0
        self.history: list[dict[str, Any]] = []
        self._globals: dict[int, ArrayRecord] = {}
        self._sampled: dict[int, int] = {}
        if fraction is None and dp.mechanism is PrivacyMechanism.CENTRAL:
            self._amplification = Amplification(
                False, 1.0, f"{type(strategy).__name__} samples its own way: accounted at rate 1"
            )
        else:
            self._amplification = amplification(
                dp.mechanism,
                poisson_sampling=dp.poisson_sampling,
                fraction=1.0 if fraction is None else fraction,
            )

    def __repr__(self) -> str:
        """Name the wrapper, its mechanism and the wrapped strategy."""
        return f"DifferentialPrivacy({self._strategy!r}, {self.dp.mechanism.value})"

    @property
    def strategy(self) -> Strategy:
        """The wrapped strategy."""
        return self._strategy

    @property
    def amplification(self) -> Amplification:
        """The sampling claim this run accounts with."""
        return self._amplification

    def summary(self) -> None:
        """Log the DP settings, then the wrapped strategy's summary."""
        logger.info("\t├──> DP: %s", self.dp.mechanism.value)
        if self.dp.central is not None:
            logger.info(
                "\t│\t├── clip %g, noise multiplier %g", self.clip, self.dp.central.noise_multiplier
            )
        logger.info("\t│\t└── amplification: %s", self._amplification.reason)
        self._strategy.summary()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self._strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self._strategy.aggregate_evaluate(server_round, replies)

    def _gaussian(self, noise_multiplier: float, sample_rate: float = 1.0) -> PrivacySpend:
        event = GaussianSteps(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1)
        return PrivacySpend(mechanism=self.dp.mechanism.value, gaussian=event)

    def _run_spend(self) -> PrivacySpend | None:
        """Return the run-level spend: at the claimed sample rate (central), per update (local)."""
        if self.dp.central is not None:
            rate = self._amplification.sample_rate
            return self._gaussian(self.dp.central.noise_multiplier, 1.0 if rate is None else rate)
        if self.dp.local is not None:
            return self._gaussian(self.dp.local.accounted_noise_multiplier)
        return None  # DP-SGD: each device accounts its own

    def _sample(self, grid: Grid) -> list[int]:
        fraction = _fraction(self._strategy)
        assert fraction is not None  # checked at construction
        wanted = int(getattr(self._strategy, "min_available_nodes", 1))
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            logger.info("waiting for nodes: %d of %d", len(nodes), wanted)
            time.sleep(1)
        coins = uniform53(self._rng, len(nodes))
        return [node for node, u in zip(nodes, coins, strict=True) if u < fraction]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, sample, and add the round's DP record to every train message."""
        spend = self._run_spend()
        if spend is not None:
            self._sink.check(spend)
        self._globals = {server_round: arrays}  # central DP's updates are relative to it
        if self.dp.poisson_sampling:
            node_ids = self._sample(grid)
            least = int(getattr(self._strategy, "min_train_nodes", 1))
            if len(node_ids) < least:
                # The round still counts as a step of the accountant (it ran, empty).
                logger.warning(
                    "round %d: the Poisson sample has %d nodes (< %d); skipping the round",
                    server_round,
                    len(node_ids),
                    least,
                )
                self._sink.spent(server_round, spend, {}, {"skipped": True})
                return []
            # The wrapped strategy still builds the round (its config, its optimiser's
            # state); its own fixed-size sample is discarded, never sent.
            built = list(self._strategy.configure_train(server_round, arrays, config, grid))
            if not built:
                return []
            template = built[0]
            messages = [
                Message(
                    content=template.content,
                    message_type=MessageType.TRAIN,
                    dst_node_id=node,
                    group_id=template.metadata.group_id or None,
                    ttl=template.metadata.ttl,
                )
                for node in node_ids
            ]
        else:
            messages = list(self._strategy.configure_train(server_round, arrays, config, grid))
        # Adaptive clipping divides by this fixed count, never by the survivors.
        self._sampled = {server_round: len(messages)}
        key, record = self.dp.round_record(l2_clip=self.clip)
        for message in messages:
            content = RecordDict(dict(message.content))
            content[key] = record
            message.content = content
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as the mode needs (central: one noisy reply), record the spend."""
        materialised = list(replies)
        valid = [r for r in materialised if not r.has_error()]
        log_failures(server_round, materialised)
        who = round_participants(valid, secure_run=self.dp.secure)
        secure, survivors, ids = who.secure, who.count, who.subjects
        if self._on_replies is not None:
            self._on_replies(server_round, survivors, len(materialised) - len(valid))
        if not valid:
            return None, None
        per_client = self._per_client(valid, ids, secure=secure)
        # Nothing of the round is computed or handed on before every participant is known
        # to fit its lifetime cap; a refusal stops the federation with nothing recorded.
        self._check_participants(per_client)
        details: dict[str, Any] = {"participants": survivors}
        if self.dp.central is not None:
            aggregate = self._central(
                server_round, valid, secure=secure, survivors=survivors, details=details
            )
            if aggregate is None:
                return None, None
            arrays, metrics = self._strategy.aggregate_train(server_round, [aggregate])
        else:
            arrays, metrics = self._strategy.aggregate_train(server_round, valid)
        self._sink.spent(server_round, self._run_spend(), per_client, details)
        self.history.append({"round": server_round, **details})
        return arrays, metrics

    def _central(
        self,
        server_round: int,
        valid: list[Message],
        *,
        secure: bool,
        survivors: int,
        details: dict[str, Any],
    ) -> Message | None:
        """Return one reply holding the global model plus the noisy mean of the clipped updates."""
        central = self.dp.central
        assert central is not None
        start = self._globals.pop(server_round, None)
        if start is None:
            raise ConfigError(f"round {server_round} was aggregated but never configured")
        origin = flat(start)
        total = np.zeros_like(origin)
        count = 0
        for reply in valid:
            model = only_arrays(reply)
            if not same_layout(model, start):
                logger.warning(
                    "round %d: a reply's model does not match the global one; left out",
                    server_round,
                )
                continue
            update = flat(model) - origin
            # A secure aggregate is already the unweighted mean of the devices' clipped
            # updates. A plain reply is clipped again here: the server trusted with central
            # DP enforces the bound it accounts with instead of trusting each device's mod.
            total += update if secure else clip_l2(update, self.clip).update
            count += 1
        if count == 0:
            return None
        num_clients = survivors if secure else count
        sensitivity = self.clip
        if secure:
            # Rounding to the ring may move a clipped update past C: devices round
            # conditionally to the bound the secure Grid reports, and the noise is sized
            # for it, so the rounding error is inside the accounted sensitivity.
            if SENSITIVITY_METRIC not in metrics_of(valid[0]):
                raise ConfigError("a secure central-DP aggregate must report its L2 sensitivity")
            sensitivity = max(self.clip, number(metrics_of(valid[0]), SENSITIVITY_METRIC))
        noisy = add_central_noise(
            total if secure else total / count,
            l2_clip=sensitivity,
            noise_multiplier=central.update_noise_multiplier,
            # Divide like the sum: the noise on the sum stays exactly z_u times the sensitivity.
            num_clients=num_clients,
            rng=self._rng,
        )
        details["l2_clip"] = self.clip
        details["l2_sensitivity"] = sensitivity
        details["update_noise_multiplier"] = central.update_noise_multiplier
        details["noise_std_of_sum"] = central.update_noise_multiplier * sensitivity
        if central.adaptive is not None:
            if not secure or CENTRED_BITS_METRIC not in metrics_of(valid[0]):
                raise ConfigError("adaptive clipping needs the secure sum of the clipped bits")
            self.clip, fraction = next_clip(
                self.clip,
                centred_sum=number(metrics_of(valid[0]), CENTRED_BITS_METRIC),
                expected_clients=self._sampled.get(server_round, num_clients),
                adaptive=central.adaptive,
                rng=self._rng,
            )
            details["noisy_unclipped_fraction"] = round(fraction, 4)
            details["next_l2_clip"] = self.clip
        # Only the noisy model and a weight leave this method: per-client metrics and the
        # (un-noised) bit count are outside the guarantee.
        weight_key = getattr(self._strategy, "weighted_by_key", "num-examples")
        aggregate = copy.copy(valid[0])
        aggregate.content = RecordDict(
            {
                next(iter(valid[0].content.array_records)): unflatten(start, origin + noisy),
                next(iter(valid[0].content.metric_records), "metrics"): MetricRecord(
                    {str(weight_key): num_clients}
                ),
            }
        )
        return aggregate

    def _check_participants(self, per_client: Mapping[str, PrivacySpend]) -> None:
        """Ask the sink about every participant's lifetime cap, once per distinct spend.

        Central and local DP charge every participant alike (one call); DP-SGD
        devices report their own spends, so each group of equal spends is checked
        with its subjects.
        """
        groups: dict[PrivacySpend, list[str]] = {}
        for subject, spend in per_client.items():
            groups.setdefault(spend, []).append(subject)
        for spend, subjects in groups.items():
            self._sink.check_participants(subjects, spend)

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
            try:
                event = reported_dpsgd(reply)
            except ConfigError as exc:
                logger.warning("node %s reported an invalid DP-SGD spend: %s", node, exc)
                continue
            if event is not None:
                out[node] = PrivacySpend(mechanism=self.dp.mechanism.value, gaussian=event)
        return out
