"""The coordinator: the one composition root of a run, whoever hosts the federation.

A simulation (Flower's simulation engine) and a deployment (a SuperLink and
real SuperNodes) differ only in who executes the ServerApp; everything a run
keeps is set up here, once:

- the database (audit chain, privacy ledger, model store);
- the ``run.started`` event with the configuration's hash and the code version;
- the privacy ledger and budget, and the epsilon each published version records;
- the store publisher (every round's model a new signed version; ONNX variants
  on the requested rounds);
- the summary file, rewritten atomically after every round;
- the run's end: ``run.completed``, or ``run.failed`` with ``interrupted`` for
  Ctrl-C / SIGTERM, and the summary saying so.

:func:`run_coordinated` builds the fedge ServerApp and hands it to ``host``,
which runs it to the end (``flwr.simulation.run_simulation`` or
:func:`fl_server.serverapp_runner.run_serverapp_in_process`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import ServerApp
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from fedge.errors import ConfigError, FedgeError
from fedge.version import code_version, package_versions
from fl_server.audit import AuditEventKind, AuditLog, canonical_json
from fl_server.audit.checkpoints import Checkpoint
from fl_server.audit.trust import AuditTrust, Checkpointer
from fl_server.checkpoints import CheckpointDir
from fl_server.db import open_database
from fl_server.federation import (
    CentralEvaluator,
    FederationConfig,
    RoundObserver,
    RoundReport,
    make_server_app,
)
from fl_server.ledger import RUN_SUBJECT, PrivacyBudget, PrivacyLedger
from fl_server.privacy import PrivacyMechanism, ServerDp, amplification
from fl_server.run_summary import RunStatus, RunSummary, SummaryWriter
from fl_server.sampling import NodeOrder
from fl_server.secagg import SecAggConfig
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.names import check_model_name
from fl_server.store.publisher import RoundPublisher
from fl_server.store.store import ModelStore, NewArtefact
from strategies.accounting import AccountantKind, PrivacySpend
from strategies.dp_mode import DpMode

__all__ = [
    "PrivacyPlan",
    "Resume",
    "RunInterrupted",
    "RunLocation",
    "RunPlan",
    "ServerAppHost",
    "new_run_id",
    "run_coordinated",
]

logger = logging.getLogger(__name__)

ServerAppHost = Callable[[ServerApp], None]


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped on purpose (SIGTERM, SIGINT): recorded as ``interrupted``."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`RunInterrupted` while the run is hosted (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _terminate(signum: int, frame: object) -> None:
        del frame
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def new_run_id(now: datetime | None = None) -> str:
    """Return a sortable, unique run id such as ``20261127T053000Z-9f3a1c``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyPlan:
    """A DP run's budget and the claim its accounting rests on.

    Parameters
    ----------
    mechanism
        The DP mechanism the ledger and reports name.
    epsilon
        The run's epsilon budget; ``None`` records spending without a limit
        (sample-level DP: each device's own DP-SGD target, not a run budget).
    delta
        The delta every epsilon is computed at.
    client_lifetime_epsilon
        Each participant's cap over every run (server side, by enrolled identity).
    client_budget
        The devices' own lifetime epsilon this run was configured for (reported only).
    accountant
        The accountant the ledger composes rounds with.
    poisson_sampling, fraction_train
        How nodes are sampled (which amplification claim holds).
    """

    mechanism: PrivacyMechanism
    epsilon: float | None
    delta: float
    client_lifetime_epsilon: float | None = None
    client_budget: float | None = None
    accountant: AccountantKind = AccountantKind.RDP
    poisson_sampling: bool = False
    fraction_train: float = 1.0


_MODE_OF = {PrivacyMechanism.of(mode): mode for mode in DpMode if mode is not DpMode.OFF}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunPlan:
    """Everything the coordinator needs to run one federation.

    Parameters
    ----------
    run_id
        The run's id (:func:`new_run_id`).
    model_name
        The model's name in the store: every round publishes a version of it (runs of one
        family share a name; private and non-private runs should not).
    federation
        Rounds, sampling and timeouts.
    initial_arrays
        The initial global model.
    train_config
        The ConfigRecord sent with every training request.
    evaluate
        Central evaluation of a global model.
    config_json, data_stats
        What ``run.started`` and the summary record about the configuration and the data.
    secure
        Secure aggregation (with distributed DP inside it), or ``None``.
    dp
        Central, local or sample-level DP, or ``None``.
    privacy
        The run's budget; required with ``dp`` or distributed DP.
    variants, variant_rounds
        Builds ONNX variants of a round's model, for the rounds listed.
    node_order
        With ``federation.sampling_seed``: the stable order of the nodes the seeded
        draw picks from (:class:`fl_server.sampling.SeededSampling`).
    """

    run_id: str
    model_name: str
    federation: FederationConfig
    initial_arrays: ArrayRecord
    train_config: ConfigRecord
    evaluate: CentralEvaluator
    config_json: dict[str, Any]
    data_stats: dict[str, Any]
    secure: SecAggConfig | None = None
    dp: ServerDp | None = None
    privacy: PrivacyPlan | None = None
    variants: Callable[[RoundReport], list[NewArtefact]] | None = None
    variant_rounds: Collection[int] = ()
    node_order: NodeOrder = sorted

    def __post_init__(self) -> None:
        check_model_name(self.model_name)
        distributed = self.secure is not None and self.secure.distributed_dp is not None
        if (self.dp is not None or distributed) and self.privacy is None:
            raise ConfigError("a DP run needs a privacy plan (its budget and delta)")

    @property
    def dp_mode(self) -> DpMode:
        """The run's DP mode (``OFF`` without a privacy plan), as its versions record it."""
        if self.privacy is None:
            return DpMode.OFF
        return _MODE_OF[self.privacy.mechanism]

    @property
    def config_sha256(self) -> str:
        """The SHA-256 of the canonical JSON of the configuration."""
        return hashlib.sha256(canonical_json(self.config_json).encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLocation:
    """Where a run writes: its summary, its checkpoints, its database and its model store."""

    summary: Path
    models: Path
    db_url: str
    store_dir: Path
    audit_dir: Path | None = None
    """Where the audit checkpoint key and anchor live (``None``: no checkpoints are signed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """Where a crashed run stopped: continue it instead of starting afresh.

    Parameters
    ----------
    summary
        The summary the crashed process left (its rounds so far).
    last_round
        The last round whose model was saved and published (0: none).
    arrays
        That round's model (the checkpoint, its SHA-256 checked).
    """

    summary: RunSummary
    last_round: int
    arrays: ArrayRecord


def _redacted(db_url: str) -> str:
    return make_url(db_url).render_as_string(hide_password=True)


def run_coordinated(
    plan: RunPlan,
    location: RunLocation,
    host: ServerAppHost,
    *,
    observers: Sequence[RoundObserver] = (),
    device_epsilons: Callable[[], dict[str, float]] | None = None,
    privacy_extra: Mapping[str, Any] | None = None,
    resume: Resume | None = None,
    subject_name: Callable[[str], str] | None = None,
) -> RunSummary:
    """Run one federation: record it, publish it, account it; ``host`` executes the ServerApp.

    Each round's global model is evaluated, saved with its SHA-256, published to
    the store and logged to the audit chain, and the summary is rewritten, so a
    crash loses at most the round in flight.

    Parameters
    ----------
    plan
        The federation.
    location
        Where everything is written.
    host
        Runs the ServerApp it is given to the end (the simulation engine, or a
        SuperLink's runtime API).
    observers
        Told about every round (progress displays).
    device_epsilons
        What the devices' own ledgers say each spent (simulations can read them;
        a deployment cannot), for the summary's privacy section.
    privacy_extra
        Further fields of the summary's privacy section (where the devices' ledgers lie).
    resume
        Continue a crashed run: the round that was in flight is abandoned and
        charged as much as the run's last recorded round (the ledger never
        under-counts), and training continues after it from the last model.

    Raises
    ------
    StorageError
        If the database, checkpoints or summary cannot be written.
    RunInterrupted, KeyboardInterrupt
        Re-raised after the run is recorded as interrupted.
    """
    started = time.perf_counter()
    engine = open_database(location.db_url)
    try:
        audit = AuditLog(engine)
        checkpointer = (
            None
            if location.audit_dir is None
            else Checkpointer(engine, AuditTrust(location.audit_dir))
        )
        summary = (
            RunSummary(
                run_id=plan.run_id,
                config=plan.config_json,
                config_sha256=plan.config_sha256,
                data=plan.data_stats,
                db_url=_redacted(location.db_url),
            )
            if resume is None
            else resume.summary
        )
        budget = (
            None
            if plan.privacy is None
            else PrivacyBudget(
                ledger=PrivacyLedger(
                    engine,
                    accountant=plan.privacy.accountant,
                    checkpoints=_known_checkpoints(engine, location, checkpointer),
                ),
                epsilon=plan.privacy.epsilon,
                delta=plan.privacy.delta,
                client_lifetime_epsilon=plan.privacy.client_lifetime_epsilon,
                subject_name=subject_name,
            )
        )
        if budget is not None:
            # Before anything is recorded: a run never starts on a trail whose budgets
            # cannot be trusted (a cut tail, edited or deleted ledger rows).
            budget.ledger.verify_trail()
        store = ModelStore(
            engine,
            FileBlobStore(location.store_dir),
            StoreKey.load_or_create(
                location.store_dir / "store-key.pem", audit=audit, created_by="fedge run"
            ),
            audit=audit,
        )
        if resume is None:
            audit.append(
                AuditEventKind.RUN_STARTED,
                {
                    "config": plan.config_json,
                    "config_sha256": plan.config_sha256,
                    "code_version": code_version(),
                    "packages": package_versions(),
                    "data": {k: v for k, v in plan.data_stats.items() if k != "client_sizes"},
                },
                run_id=plan.run_id,
            )
        publisher = RoundPublisher(
            store,
            model=plan.model_name,
            run_id=plan.run_id,
            dp_mode=plan.dp_mode,
            privacy=_spent_so_far(budget, plan.run_id),
            variants=plan.variants,
            variant_rounds=plan.variant_rounds,
        )
        first_round = 1
        if resume is not None:
            if resume.summary.config_sha256 != plan.config_sha256:
                raise ConfigError(
                    f"run {plan.run_id} was started with another configuration; "
                    "restore it, or start a new run"
                )
            first_round = _resume(resume, plan, audit, budget)
            publisher.resume(
                {
                    int(r["round"]): int(r["store_version"])
                    for r in resume.summary.rounds
                    if r.get("store_version") is not None
                }
            )
            summary.status, summary.error = RunStatus.RUNNING, None
        spent = _spent_so_far(budget, plan.run_id)
        writer = SummaryWriter(
            summary,
            location.summary,
            started,
            publisher.versions,
            epsilon=None if spent is None else lambda: (spent() or (None, 0.0))[0],
        )
        writer.flush()
        server_app = make_server_app(
            plan.federation,
            initial_arrays=plan.initial_arrays if resume is None else resume.arrays,
            train_config=plan.train_config,
            evaluate=plan.evaluate,
            checkpoints=CheckpointDir(location.models),
            audit=audit,
            run_id=plan.run_id,
            observers=[publisher, writer, *([checkpointer] if checkpointer else []), *observers],
            secure=plan.secure,
            privacy=budget,
            dp=plan.dp,
            first_round=first_round,
            node_order=plan.node_order,
        )
        try:
            with _sigterm_interrupts():
                host(server_app)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            summary.status = RunStatus.INTERRUPTED if interrupted else RunStatus.FAILED
            summary.error = str(exc) or type(exc).__name__
            head = audit.append(
                AuditEventKind.RUN_FAILED,
                {"status": summary.status, "error": summary.error, "rounds": len(summary.rounds)},
                run_id=plan.run_id,
            )
            summary.audit_head = head.record_hash
            _checkpoint_run_end(checkpointer)
            writer.flush()
            raise
        summary.status = RunStatus.COMPLETED
        aborted = _every_round_aborted(summary)
        if aborted is not None:
            # Nothing was aggregated: the model never moved. Say so instead of "completed".
            summary.status = RunStatus.FAILED
            summary.error = f"every secure round aborted: {aborted}"
        if plan.privacy is not None and budget is not None:
            summary.privacy = privacy_report(
                plan.privacy, budget, plan.run_id, device_epsilons() if device_epsilons else {}
            ) | dict(privacy_extra or {})
        failed = summary.status == RunStatus.FAILED
        head = audit.append(
            AuditEventKind.RUN_FAILED if failed else AuditEventKind.RUN_COMPLETED,
            {
                "final_accuracy": summary.final_accuracy,
                "rounds": len(summary.rounds),
                "wall_seconds": round(time.perf_counter() - started, 3),
                # What the run claims, the devices' own ledgers included (sample-level DP
                # under secure aggregation: the server ledger charges nobody).
                **({"privacy": summary.privacy} if summary.privacy else {}),
                **({"status": summary.status, "error": summary.error} if failed else {}),
            },
            run_id=plan.run_id,
        )
        summary.audit_head = head.record_hash
        _checkpoint_run_end(checkpointer)
        writer.flush()
        return summary
    finally:
        engine.dispose()


def _known_checkpoints(
    engine: Engine, location: RunLocation, checkpointer: Checkpointer | None
) -> list[Checkpoint]:
    """Return the checkpoints, signed by this home's key, the chain must still reach."""
    if checkpointer is None or location.audit_dir is None:
        return []
    found, problems = AuditTrust(location.audit_dir).trusted_checkpoints(
        engine, checkpointer.public_key
    )
    for problem in problems:
        logger.warning("unreadable audit checkpoint: %s", problem)
    return found


def _checkpoint_run_end(checkpointer: Checkpointer | None) -> None:
    """Sign the head at a run's end; a failure is logged, never masks the run's outcome."""
    if checkpointer is None:
        return
    try:
        checkpointer.checkpoint("run-end")
    except FedgeError as exc:
        logger.error("could not sign the audit checkpoint at the run's end: %s", exc)


def _every_round_aborted(summary: RunSummary) -> str | None:
    """Return the first abort reason if the run had rounds and every one of them aborted."""
    reasons = [(r.get("secure_aggregation") or {}).get("aborted") for r in summary.rounds]
    if not reasons or not all(reasons):
        return None
    return str(reasons[0])


def _resume(resume: Resume, plan: RunPlan, audit: AuditLog, budget: PrivacyBudget | None) -> int:
    """Abandon the round that was in flight, charge it, record the resumption; return the next."""
    abandoned = resume.last_round + 1
    charged: dict[str, PrivacySpend] = {}
    if budget is not None and abandoned <= plan.federation.num_rounds:
        ledger = budget.ledger
        if not ledger.round_spends(plan.run_id, abandoned):
            # What the abandoned round might have cost: as much as the last recorded one, for
            # the run and every subject it charged (who took part in the lost round is unknown).
            charged = ledger.round_spends(plan.run_id, resume.last_round)
            if charged:
                mechanism = next(iter(charged.values())).mechanism

                def payload(totals: dict[str, float]) -> dict[str, Any]:
                    clients = [v for k, v in totals.items() if k != RUN_SUBJECT]
                    return {
                        "round": abandoned,
                        "mechanism": mechanism,
                        "delta": budget.delta,
                        "budget": budget.epsilon,
                        "abandoned": True,
                        "charged_as_round": resume.last_round,
                        "epsilon": totals.get(RUN_SUBJECT),
                        "max_client_epsilon": max(clients, default=None),
                        "clients_charged": len(clients),
                    }

                ledger.record_round(
                    plan.run_id,
                    abandoned,
                    charged,
                    delta=budget.delta,
                    audit=audit,
                    payload=payload,
                )
    audit.append(
        AuditEventKind.RUN_RESUMED,
        {
            "after_round": resume.last_round,
            "abandoned_round": abandoned,
            "subjects_charged_for_abandoned_round": len(charged),
            "code_version": code_version(),
        },
        run_id=plan.run_id,
    )
    logger.warning(
        "run %s: resuming after round %d; round %d was abandoned",
        plan.run_id,
        resume.last_round,
        abandoned,
    )
    return abandoned + 1


def _spent_so_far(
    budget: PrivacyBudget | None, run_id: str
) -> Callable[[], tuple[float | None, float] | None] | None:
    if budget is None:
        return None
    privacy = budget

    def spent() -> tuple[float | None, float]:
        return privacy.ledger.run_epsilon(run_id, delta=privacy.delta), privacy.delta

    return spent


def privacy_report(
    plan: PrivacyPlan, budget: PrivacyBudget, run_id: str, devices: dict[str, float]
) -> dict[str, Any]:
    """Return the summary's privacy section: what was spent, and which claim it rests on.

    ``devices`` maps device names to what their own ledgers say they spent
    (empty where the coordinator cannot read them).
    """
    worst = budget.ledger.max_subject_epsilon(run_id)
    claim = amplification(
        plan.mechanism, poisson_sampling=plan.poisson_sampling, fraction=plan.fraction_train
    )
    per_device = plan.mechanism is PrivacyMechanism.SAMPLE
    # Shared-noise DP-SGD is example-level too, but its run row holds every round's step.
    sample_level = per_device or plan.mechanism is PrivacyMechanism.SAMPLE_DISTRIBUTED
    run_epsilon = (
        (worst[1] if worst else max(devices.values(), default=None))
        if per_device
        else budget.ledger.spent(run_id, delta=budget.delta)
    )
    return {
        "mechanism": plan.mechanism.value,
        "level": "example" if sample_level else "client",
        "epsilon": run_epsilon,
        "delta": budget.delta,
        "budget": budget.epsilon,
        "stopped": budget.exhausted,
        "amplification": claim.to_json(),
        "max_client_epsilon": None if worst is None else worst[1],
        "client_budget": plan.client_budget,
        # What the devices' own ledgers say (in secure rounds the server cannot know it).
        "max_device_epsilon": max(devices.values(), default=None),
    }
