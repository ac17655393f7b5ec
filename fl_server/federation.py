"""The fedge ServerApp: rounds of any Flower strategy, central evaluation, checkpoints, audit.

Each ``round.completed`` event counts who the round asked (``sampled``), whose
replies it used (``completed``; for a secure round, the survivors inside the
sum), the difference (``dropped``) and, of those, how many devices refused by
their own policy (``refused``: {category: count}, from the error code of their
reply). The counts are taken on the Grid the ServerApp receives, beneath any
secure-aggregation or DP wrapper, so they mean the same for every mode.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedge.errors import ConfigError
from fl_server._dp_records import log_failures
from fl_server._grid import ForwardingGrid
from fl_server.audit import AuditEventKind, AuditLog
from fl_server.checkpoints import CheckpointDir
from fl_server.dp_strategy import DifferentialPrivacy
from fl_server.ledger import BudgetExceeded, PrivacyBudget, RoundSpend
from fl_server.norm_bounding import NormBounding
from fl_server.privacy import ServerDp
from fl_server.rounds import run_rounds
from fl_server.sampling import NodeOrder, SeededSampling
from fl_server.secagg import (
    PrivacyGuard,
    SecAggConfig,
    SecAggRoundStats,
    SecureAggregationGrid,
)
from fl_server.spend import LedgerSink
from fl_server.strategy_factory import build_strategy
from strategies.rules import StrategySpec
from strategies.sample_ddp import SHARED_NOISE_MECHANISM, SampleDdpSettings

__all__ = [
    "REFUSAL_CATEGORIES",
    "CentralEvaluator",
    "Evaluation",
    "FederationConfig",
    "RoundObserver",
    "RoundReport",
    "RoundTally",
    "make_server_app",
]

logger = logging.getLogger(__name__)

_DDG = "distributed-ddg"

# The error codes a device's own mods answer with when its policy refuses a round
# (fl_client.secagg_mod.SECAGG_ERROR_CODE, fl_client.dp_mod.DP_ERROR_CODE,
# fl_client.budget.BUDGET_ERROR_CODE; fl_server may not import fl_client, a test
# holds the two sides together). Any other error is a drop, not a refusal.
REFUSAL_CATEGORIES: dict[int, str] = {
    4301: "secure_aggregation",
    4311: "differential_privacy",
    4312: "privacy_budget",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationConfig:
    """How the server runs the federation.

    Parameters
    ----------
    num_rounds
        Training rounds, >= 1.
    fraction_train
        Fraction of connected nodes sampled per round, in (0, 1].
    min_train_nodes
        Nodes sampled per round at least, >= 1.
    min_available_nodes
        Nodes that must be connected before a round starts, >= ``min_train_nodes``.
    round_timeout_s
        Seconds to wait for the replies of one round, > 0.
    strategy
        The server's aggregation rule (FedAvg unless told otherwise).
    norm_bound
        Bound every reply's update to this L2 norm on the server
        (:class:`fl_server.norm_bounding.NormBounding`); for runs without secure
        aggregation (under it, devices bound their own updates). ``None``: no bound.
    sampling_seed
        Choose each round's nodes with a generator seeded by it and the round
        (:class:`fl_server.sampling.SeededSampling`); ``None``: Flower's own draw.
    """

    num_rounds: int
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1
    round_timeout_s: float = 600.0
    strategy: StrategySpec = field(default_factory=StrategySpec)
    sampling_seed: int | None = None
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.min_train_nodes < 1:
            raise ConfigError(f"min_train_nodes must be >= 1, got {self.min_train_nodes}")
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                f"min_available_nodes ({self.min_available_nodes}) must be >= "
                f"min_train_nodes ({self.min_train_nodes})"
            )
        if not (math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise ConfigError(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.norm_bound is not None and not (
            math.isfinite(self.norm_bound) and self.norm_bound > 0
        ):
            raise ConfigError(f"norm_bound must be > 0, got {self.norm_bound}")
        if self.sampling_seed is not None and self.sampling_seed < 0:
            raise ConfigError(f"sampling_seed must be >= 0, got {self.sampling_seed}")


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Central evaluation of a global model."""

    loss: float
    accuracy: float


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What one round produced; round 0 reports the initial model."""

    server_round: int
    loss: float
    accuracy: float
    seconds: float
    num_replies: int
    num_failures: int
    model_sha256: str
    model_path: str
    secure_aggregation: dict[str, Any] | None = None
    sampled: int | None = None
    refused: dict[str, int] = field(default_factory=dict)


class RoundObserver(Protocol):
    """Told about every round as soon as its model is evaluated and saved."""

    def on_round(self, report: RoundReport) -> None:
        """Receive the report of a finished round."""
        ...


CentralEvaluator = Callable[[ArrayRecord], Evaluation]


@dataclass(slots=True)
class _ReplyCounts:
    replies: dict[int, tuple[int, int]] = field(default_factory=dict)
    secure: dict[int, SecAggRoundStats] = field(default_factory=dict)

    def on_secure_round(self, stats: SecAggRoundStats) -> None:
        self.secure[stats.server_round] = stats

    def on_replies(self, server_round: int, ok: int, failed: int) -> None:
        self.replies[server_round] = (ok, failed)

    def outcome(self, server_round: int) -> tuple[int, int, dict[str, Any] | None]:
        """Return (clients counted, clients failed, secure-aggregation summary) of a round."""
        ok, failed = self.replies.get(server_round, (0, 0))
        stats = self.secure.get(server_round)
        if stats is None:
            return ok, failed, None
        # The strategy saw one aggregate reply: count the clients inside it instead.
        summary: dict[str, Any] = {
            "sampled": stats.sampled,
            "survivors": stats.survivors,
            "degree": stats.degree,
            "threshold": stats.threshold,
            "ring_bits": stats.ring_bits,
            "quant_bits": stats.quant_bits,
            "total_weight": stats.total_weight,
            "upload_bytes_per_client": round(stats.upload_bytes_per_client),
            "stage_seconds": stats.stage_seconds,
            "aborted": stats.aborted,
        }
        return stats.survivors, stats.sampled - stats.survivors, summary


@dataclass(frozen=True, slots=True)
class RoundTally:
    """Who a round asked and which of them refused by their own policy."""

    sampled: int
    refused: dict[str, int]


class _TallyGrid(ForwardingGrid):
    """Count the nodes each round's train messages go to and the policy refusals they answer.

    Everything sent between two :meth:`take` calls belongs to one round (the
    round loop evaluates after every round). A node counts once however many
    messages a round sends it (a secure round has several stages), and only its
    first error reply is read: a node that refuses leaves the round.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._asked: set[int] = set()
        self._errors: dict[int, int] = {}

    def take(self) -> RoundTally:
        """Return the tally since the last call and start a new one."""
        refused = Counter(
            REFUSAL_CATEGORIES[code] for code in self._errors.values() if code in REFUSAL_CATEGORIES
        )
        tally = RoundTally(sampled=len(self._asked), refused=dict(sorted(refused.items())))
        self._asked = set()
        self._errors = {}
        return tally

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send through the wrapped Grid, counting train messages and their error replies."""
        outgoing = list(messages)
        asked = {
            m.metadata.dst_node_id for m in outgoing if m.metadata.message_type == MessageType.TRAIN
        }
        self._asked |= asked
        replies = list(self._inner.send_and_receive(outgoing, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in asked and node not in self._errors and reply.has_error():
                code = reply.error.code
                # Device input: a code that is not an int is simply not a known refusal.
                self._errors[node] = code if isinstance(code, int) else -1
        return replies


class _Counting(Strategy):
    """Delegate to a strategy, recording how many replies of each round succeeded and failed."""

    def __init__(self, strategy: Strategy, counts: _ReplyCounts) -> None:
        super().__init__()
        self._strategy = strategy
        self._counts = counts

    def __repr__(self) -> str:
        """Name the wrapped strategy."""
        return repr(self._strategy)

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self._strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self._strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count the replies, then delegate to the wrapped strategy."""
        materialised = list(replies)
        failures = log_failures(server_round, materialised)
        self._counts.replies[server_round] = (len(materialised) - failures, failures)
        return self._strategy.aggregate_train(server_round, materialised)

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


def _privacy_hooks(
    privacy: PrivacyBudget | None,
    counts: _ReplyCounts,
    audit: AuditLog,
    run_id: str,
    mechanism: str,
) -> tuple[PrivacyGuard | None, Callable[[SecAggRoundStats], None]]:
    if privacy is None:
        return None, counts.on_secure_round
    sink = LedgerSink(privacy, audit, run_id, mechanism)

    def guard(spend: RoundSpend, subjects: Sequence[str]) -> None:
        sink.check(spend)
        # Each survivor would be charged this rho (see on_secure): refused here, before
        # anything is unmasked, if it would take one past its lifetime cap over all runs.
        sink.check_participants(subjects, spend)

    def on_secure(stats: SecAggRoundStats) -> None:
        counts.on_secure_round(stats)
        if stats.dp is None or stats.spend is None or stats.aborted is not None:
            return
        spend = stats.spend
        # Each survivor is charged what its own device charged itself: the rho of the
        # fewest honest contributors the round had to hold (keyed by its enrolled identity).
        sink.spent(
            stats.server_round,
            spend,
            dict.fromkeys(stats.survivor_subjects, spend),
            {
                "survivors": stats.survivors,
                "min_honest_contributors": stats.dp["min_honest_contributors"],
                "noise_std_of_sum": stats.dp["noise_std_of_sum"],
                "honest_noise_std_of_sum": stats.dp["honest_noise_std_of_sum"],
            },
        )

    return guard, on_secure


def make_server_app(
    config: FederationConfig,
    *,
    initial_arrays: ArrayRecord,
    train_config: ConfigRecord,
    evaluate: CentralEvaluator,
    checkpoints: CheckpointDir,
    audit: AuditLog,
    run_id: str,
    observers: Sequence[RoundObserver] = (),
    secure: SecAggConfig | None = None,
    privacy: PrivacyBudget | None = None,
    dp: ServerDp | None = None,
    first_round: int = 1,
    node_order: NodeOrder = sorted,
) -> ServerApp:
    """Build a ServerApp that runs ``config.strategy`` (FedAvg by default) and records every round.

    After each round (and once for the initial model) the global model is
    evaluated centrally, saved with its SHA-256, and an audit event names the
    round, its metrics and the model digest; then every observer is told.

    Parameters
    ----------
    config
        Rounds, sampling and timeouts.
    initial_arrays
        The initial global model.
    train_config
        The ConfigRecord sent with every training request.
    evaluate
        Central evaluation of a global model.
    checkpoints
        Where each round's model is saved.
    audit
        The audit log the round events are appended to.
    run_id
        The run the events belong to.
    observers
        Progress displays, summaries, ... (called on the server thread).
    secure
        Run every training round as a fedge SecAgg+ round (the clients need
        :func:`fl_client.secagg_mod.make_secagg_mod`); ``None`` for plain FedAvg.
    privacy
        With differential privacy: every round's spend goes to this ledger (and
        the audit log), for the run and for each client that took part; a round
        that would exceed the run's budget, or take a participant past its
        ``client_lifetime_epsilon`` (composed over every run, keyed by the
        client's enrolled identity), is refused (with distributed DP, before
        anything is unmasked; otherwise before the round's aggregate is computed)
        and the federation ends there (``exhausted`` says why).
    dp
        Central, local or sample-level DP (:class:`fl_server.dp_strategy.DifferentialPrivacy`
        around FedAvg);
        distributed DP is configured in ``secure`` instead. Needs ``privacy``.
    node_order
        With ``config.sampling_seed``: puts the available nodes in a stable order
        before the seeded draw (a simulation orders them by partition).
    first_round
        The first round to train (a resumed run continues its numbering);
        ``initial_arrays`` is then the model of round ``first_round - 1``,
        which is evaluated but not recorded again.
    """
    if dp is not None and privacy is None:
        raise ConfigError("a DP run needs a privacy ledger")
    if first_round < 1:
        raise ConfigError(f"first_round must be >= 1, got {first_round}")
    app = ServerApp()
    counts = _ReplyCounts()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        del context
        tally = _TallyGrid(grid)
        grid = tally
        if secure is not None:
            shared = isinstance(secure.distributed_dp, SampleDdpSettings)
            mechanism = SHARED_NOISE_MECHANISM if shared else _DDG
            guard, on_secure = _privacy_hooks(privacy, counts, audit, run_id, mechanism)
            secure_grid = SecureAggregationGrid(
                grid, secure, on_round=on_secure, privacy_guard=guard
            )
            # Before any round: a model too large for the clients a round holds learns nothing.
            secure_grid.check_plan(
                clients=config.min_train_nodes,
                parameters=sum(math.prod(a.shape) for a in initial_arrays.values()),
            )
            grid = secure_grid
        sampling: dict[str, Any] = {
            "fraction_train": config.fraction_train,
            "fraction_evaluate": 0.0,
            "min_train_nodes": config.min_train_nodes,
            "min_available_nodes": config.min_available_nodes,
        }
        rule = build_strategy(config.strategy, **sampling)
        if config.sampling_seed is not None:
            rule = SeededSampling(rule, seed=config.sampling_seed, node_order=node_order)
        strategy: Strategy
        if dp is None:
            strategy = _Counting(rule, counts)
        else:
            assert privacy is not None
            # The wrapper counts the replies itself (a secure aggregate holds many clients).
            strategy = DifferentialPrivacy(
                rule,
                dp=dp,
                sink=LedgerSink(privacy, audit, run_id, dp.mechanism.value),
                on_replies=counts.on_replies,
            )
        if config.norm_bound is not None:
            strategy = NormBounding(strategy, config.norm_bound)
        round_started = time.perf_counter()

        def _evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            nonlocal round_started
            round_tally = tally.take()
            evaluation = evaluate(arrays)
            if 0 < server_round == first_round - 1:
                # A resumed run's starting model: saved, audited and reported before the crash.
                round_started = time.perf_counter()
                return MetricRecord({"accuracy": evaluation.accuracy, "loss": evaluation.loss})
            saved = checkpoints.save(
                server_round, dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
            )
            ok, failed, secure_summary = counts.outcome(server_round)
            seconds = time.perf_counter() - round_started
            audit.append(
                AuditEventKind.MODEL_SAVED,
                {
                    "round": server_round,
                    "sha256": saved.sha256,
                    "size_bytes": saved.size_bytes,
                    "path": str(saved.path),
                },
                run_id=run_id,
            )
            if server_round > 0:
                audit.append(
                    AuditEventKind.ROUND_COMPLETED,
                    {
                        "round": server_round,
                        "accuracy": evaluation.accuracy,
                        "loss": evaluation.loss,
                        "replies": ok,
                        "failures": failed,
                        "sampled": round_tally.sampled,
                        "completed": ok,
                        "dropped": max(round_tally.sampled - ok, 0),
                        "refused": round_tally.refused,
                        "model_sha256": saved.sha256,
                        "seconds": round(seconds, 3),
                        "secure_aggregation": secure_summary,
                    },
                    run_id=run_id,
                )
            report = RoundReport(
                server_round=server_round,
                loss=evaluation.loss,
                accuracy=evaluation.accuracy,
                seconds=seconds,
                num_replies=ok,
                num_failures=failed,
                model_sha256=saved.sha256,
                model_path=str(saved.path),
                secure_aggregation=secure_summary,
                sampled=round_tally.sampled if server_round > 0 else None,
                refused=round_tally.refused if server_round > 0 else {},
            )
            for observer in observers:
                observer.on_round(report)
            round_started = time.perf_counter()
            return MetricRecord({"accuracy": evaluation.accuracy, "loss": evaluation.loss})

        try:
            if first_round <= config.num_rounds:
                run_rounds(
                    strategy,
                    grid,
                    initial_arrays=initial_arrays,
                    first_round=first_round,
                    last_round=config.num_rounds,
                    timeout=config.round_timeout_s,
                    train_config=train_config,
                    evaluate_fn=_evaluate,
                )
        except BudgetExceeded as exc:
            # A clean stop: the refused round revealed nothing and spent nothing.
            assert privacy is not None
            privacy.exhausted = str(exc)
            logger.warning("stopping the federation: %s", exc)
            audit.append(AuditEventKind.BUDGET_EXHAUSTED, {"reason": str(exc)}, run_id=run_id)

    return app
