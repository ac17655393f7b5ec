"""Run a federation on Flower's simulation engine and write its JSON summary."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.clientapp.typing import Mod
from sqlalchemy.engine import make_url

from fedge.errors import ConfigError, StorageError
from fedge.version import code_version
from fl_client import build_model, make_client_app
from fl_client.budget import ClientBudget, ClientLedger, make_budget_mod
from fl_client.dp_mod import make_dp_mod
from fl_client.messages import encode_train_config
from fl_client.refusals import RefusalLog
from fl_client.secagg_mod import make_secagg_mod
from fl_client.training import evaluate
from fl_server import Evaluation, FederationConfig, RoundObserver, RoundReport, make_server_app
from fl_server.audit import AuditEventKind, AuditLog, canonical_json
from fl_server.checkpoints import CheckpointDir
from fl_server.db import open_database, resolve_db_url
from fl_server.ledger import PrivacyBudget, PrivacyLedger
from fl_server.privacy import PrivacyMechanism, amplification
from fl_server.store.blobs import FileBlobStore
from fl_server.store.keys import StoreKey
from fl_server.store.publisher import RoundPublisher
from fl_server.store.store import ModelStore, NewArtefact
from secure_agg.identity import NodeIdentity
from secure_agg.params import ThreatModel
from simulations.config import DpMode, SimConfig
from simulations.data import Split
from simulations.enrolment import enrol_fleet
from simulations.modes import VariantRounds
from simulations.offline import apply_offline_env, quiet_flower, ray_backend_config
from simulations.partition import label_skew
from simulations.provider import FashionMnistPartitions, cached_dataset
from strategies.accounting import AccountantKind

__all__ = [
    "PreparedData",
    "RunPaths",
    "SimSummary",
    "check_paths",
    "new_run_id",
    "prepare_data",
    "privacy_report",
    "run_federation",
]

logger = logging.getLogger(__name__)


def new_run_id(now: datetime | None = None) -> str:
    """Return a sortable, unique run id such as ``20261127T053000Z-9f3a1c``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunPaths:
    """Where a run writes: its summary JSON, its checkpoints, its database, its model store.

    ``store`` defaults to ``store/`` beside the run's directory (``runs/store``),
    and the simulated devices' own state (lifetime ledgers, refusals) to
    ``devices/`` beside it: a device's budget spans every run it takes part in.
    """

    @property
    def store_dir(self) -> Path:
        """The model store's directory (objects and signing key)."""
        return self.store or self.models.parent.parent / "store"

    @property
    def devices_dir(self) -> Path:
        """The simulated devices' directory (one lifetime ledger per device, across runs)."""
        return self.devices or self.models.parent.parent / "devices"

    summary: Path
    models: Path
    db_url: str
    store: Path | None = None
    devices: Path | None = None


@dataclass(slots=True)
class SimSummary:
    """The run's record, rewritten atomically after every round."""

    run_id: str
    config: dict[str, Any]
    config_sha256: str
    data: dict[str, Any]
    db_url: str
    status: str = "running"
    initial_accuracy: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    audit_head: str | None = None
    error: str | None = None
    privacy: dict[str, Any] | None = None

    @property
    def final_accuracy(self) -> float | None:
        """The accuracy of the last round's global model."""
        return self.rounds[-1]["accuracy"] if self.rounds else None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document written to disk."""
        return {
            "run_id": self.run_id,
            "status": self.status,
            "final_accuracy": self.final_accuracy,
            "initial_accuracy": self.initial_accuracy,
            "rounds": self.rounds,
            "config": self.config,
            "config_sha256": self.config_sha256,
            "data": self.data,
            "wall_seconds": round(self.wall_seconds, 3),
            "audit": {"db_url": self.db_url, "head_hash": self.audit_head},
            "code_version": code_version(),
            "error": self.error,
            "privacy": self.privacy,
        }


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise StorageError(f"cannot write summary {path}: {exc}") from exc


class _SummaryWriter:
    """Keeps the summary file current: one atomic rewrite per round."""

    def __init__(
        self,
        summary: SimSummary,
        path: Path,
        started: float,
        versions: dict[int, int] | None = None,
    ) -> None:
        self.summary = summary
        self._path = path
        self._started = started
        self._versions = versions if versions is not None else {}

    def on_round(self, report: RoundReport) -> None:
        if report.server_round == 0:
            self.summary.initial_accuracy = report.accuracy
        else:
            self.summary.rounds.append(
                {
                    "round": report.server_round,
                    "accuracy": report.accuracy,
                    "loss": report.loss,
                    "seconds": round(report.seconds, 3),
                    "replies": report.num_replies,
                    "failures": report.num_failures,
                    "model_sha256": report.model_sha256,
                    "model_path": report.model_path,
                    "secure_aggregation": report.secure_aggregation,
                    "store_version": self._versions.get(report.server_round),
                }
            )
        self.flush()

    def flush(self) -> None:
        self.summary.wall_seconds = time.perf_counter() - self._started
        _write_json_atomically(self._path, self.summary.to_json())


def _redacted(db_url: str) -> str:
    return make_url(db_url).render_as_string(hide_password=True)


def _make_evaluator(config: SimConfig, test: Split) -> Any:
    model = build_model(config.model)

    def _evaluate(arrays: ArrayRecord) -> Evaluation:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        result = evaluate(model, test.images, test.labels)
        return Evaluation(loss=result.loss, accuracy=result.accuracy)

    return _evaluate


@dataclass(frozen=True, slots=True)
class PreparedData:
    """The loaded, validated and partitioned data of a run."""

    provider: FashionMnistPartitions
    test: Split
    stats: dict[str, Any]


def prepare_data(config: SimConfig) -> PreparedData:
    """Load Fashion-MNIST and partition it, so bad input fails before anything starts.

    Raises
    ------
    DataError
        If Fashion-MNIST is missing or corrupt.
    ConfigError
        If the partitioning cannot be satisfied (e.g. more clients than examples).
    """
    data_dir = None if config.data_dir is None else str(config.data_dir)
    dataset = cached_dataset(data_dir, config.train_examples)
    test = dataset.test.take(config.test_examples or len(dataset.test))
    provider = FashionMnistPartitions(data_dir, config.train_examples, config.partition_config())
    parts = provider.partitions()
    stats = {
        "train_examples": len(dataset.train),
        "test_examples": len(test),
        "client_sizes": [len(p) for p in parts],
        "label_skew": round(label_skew(dataset.train.labels, list(parts)), 4),
    }
    return PreparedData(provider=provider, test=test, stats=stats)


def run_federation(
    config: SimConfig,
    paths: RunPaths,
    *,
    run_id: str,
    prepared: PreparedData | None = None,
    observers: Sequence[RoundObserver] = (),
    verbose: bool = False,
) -> SimSummary:
    """Train ``config.model`` with FedAvg across simulated clients and record everything.

    Each round's global model is evaluated on the test split, saved with its
    SHA-256, and logged to the audit chain; the summary JSON is rewritten after
    every round, so a crash loses at most the round in flight.

    Parameters
    ----------
    config
        The federation to run.
    paths
        Where the summary, the checkpoints and the database go.
    run_id
        The run's id (see :func:`new_run_id`).
    prepared
        The output of :func:`prepare_data` for ``config``; computed when omitted.
    observers
        Told about every round (progress displays).
    verbose
        Show Flower's and Ray's own logs.

    Raises
    ------
    DataError
        If Fashion-MNIST is missing or corrupt.
    ConfigError
        If the configuration cannot be satisfied (e.g. more clients than examples).
    StorageError
        If the database, checkpoints or summary cannot be written.
    """
    apply_offline_env()
    started = time.perf_counter()
    if prepared is None:
        prepared = prepare_data(config)
    provider, test, data_stats = prepared.provider, prepared.test, prepared.stats
    config_json = config.to_json()
    config_sha256 = hashlib.sha256(canonical_json(config_json).encode()).hexdigest()

    engine = open_database(paths.db_url)
    try:
        audit = AuditLog(engine)
        summary = SimSummary(
            run_id=run_id,
            config=config_json,
            config_sha256=config_sha256,
            data=data_stats,
            db_url=_redacted(paths.db_url),
        )
        store = ModelStore(
            engine,
            FileBlobStore(paths.store_dir),
            StoreKey.load_or_create(paths.store_dir / "store-key.pem"),
            audit=audit,
        )
        audit.append(
            AuditEventKind.RUN_STARTED,
            {
                "config": config_json,
                "config_sha256": config_sha256,
                "code_version": code_version(),
                "data": {k: v for k, v in data_stats.items() if k != "client_sizes"},
            },
            run_id=run_id,
        )
        privacy = (
            PrivacyBudget(
                ledger=PrivacyLedger(engine, accountant=_accountant(config)),
                # Sample-level DP: epsilon is each device's DP-SGD target, not a run budget.
                epsilon=None if config.dp is DpMode.SAMPLE else config.epsilon,
                delta=config.delta,
                client_lifetime_epsilon=config.client_lifetime_epsilon,
            )
            if config.dp is not DpMode.OFF
            else None
        )
        publisher = RoundPublisher(
            store,
            model=config.model.value,
            run_id=run_id,
            privacy=_spent_so_far(privacy, run_id),
            variants=None
            if config.variants is VariantRounds.OFF
            else _variant_builder(config, test),
            variant_rounds=range(1, config.num_rounds + 1)
            if config.variants is VariantRounds.EVERY
            else (config.num_rounds,),
        )
        writer = _SummaryWriter(summary, paths.summary, started, publisher.versions)
        writer.flush()
        try:
            _simulate(
                config=config,
                provider=provider,
                test=test,
                paths=paths,
                run_id=run_id,
                audit=audit,
                observers=[publisher, writer, *observers],
                verbose=verbose,
                privacy=privacy,
            )
        except BaseException as exc:
            summary.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            summary.error = str(exc) or type(exc).__name__
            head = audit.append(
                AuditEventKind.RUN_FAILED,
                {"status": summary.status, "error": summary.error, "rounds": len(summary.rounds)},
                run_id=run_id,
            )
            summary.audit_head = head.record_hash
            writer.flush()
            raise
        summary.status = "completed"
        if privacy is not None:
            summary.privacy = privacy_report(config, privacy, run_id, paths)
        head = audit.append(
            AuditEventKind.RUN_COMPLETED,
            {
                "final_accuracy": summary.final_accuracy,
                "rounds": len(summary.rounds),
                "wall_seconds": round(time.perf_counter() - started, 3),
            },
            run_id=run_id,
        )
        summary.audit_head = head.record_hash
        writer.flush()
        return summary
    finally:
        engine.dispose()


def _variant_builder(config: SimConfig, test: Split) -> Callable[[RoundReport], list[NewArtefact]]:
    # Imported here: ONNX export and quantisation are only needed with --variants.
    from simulations.variants import build_model_variants

    def build(report: RoundReport) -> list[NewArtefact]:
        data_dir = None if config.data_dir is None else str(config.data_dir)
        calibration = cached_dataset(data_dir, config.train_examples).train.images[:1000]
        held_out = test.take(2000)
        return build_model_variants(
            Path(report.model_path),
            sha256=report.model_sha256,
            model=config.model,
            held_out=(held_out.images, held_out.labels),
            calibration=calibration,
        )

    return build


def _spent_so_far(
    privacy: PrivacyBudget | None, run_id: str
) -> Callable[[], tuple[float | None, float] | None] | None:
    if privacy is None:
        return None
    budget = privacy

    def spent() -> tuple[float | None, float]:
        # Client-level runs: the run's epsilon; DP-SGD: the worst device the server has seen.
        worst = budget.ledger.max_subject_epsilon(run_id)
        run_level = budget.ledger.spent(run_id, delta=budget.delta)
        return (run_level or (worst[1] if worst else None)), budget.delta

    return spent


def privacy_report(
    config: SimConfig, privacy: PrivacyBudget, run_id: str, paths: RunPaths
) -> dict[str, Any]:
    """Return the summary's privacy section: what was spent, and which claim it rests on."""
    mechanism = {
        DpMode.CENTRAL: PrivacyMechanism.CENTRAL,
        DpMode.DISTRIBUTED: PrivacyMechanism.DISTRIBUTED,
        DpMode.LOCAL: PrivacyMechanism.LOCAL,
        DpMode.SAMPLE: PrivacyMechanism.SAMPLE,
    }[config.dp]
    worst = privacy.ledger.max_subject_epsilon(run_id)
    claim = amplification(
        mechanism, poisson_sampling=config.poisson_sampling, fraction=config.fraction_train
    )
    devices = _device_epsilons(config, paths, privacy.delta)
    run_epsilon = (
        (worst[1] if worst else max(devices.values(), default=None))
        if mechanism is PrivacyMechanism.SAMPLE
        else privacy.ledger.spent(run_id, delta=privacy.delta)
    )
    return {
        "mechanism": mechanism.value,
        "level": "example" if mechanism is PrivacyMechanism.SAMPLE else "client",
        "epsilon": run_epsilon,
        "delta": privacy.delta,
        "budget": privacy.epsilon,
        "stopped": privacy.exhausted,
        "amplification": claim.to_json(),
        "max_client_epsilon": None if worst is None else worst[1],
        "client_budget": config.client_epsilon,
        "device_ledgers": None if config.client_epsilon is None else str(_device_dir(paths)),
        # What the devices' own ledgers say (in secure rounds the server cannot know it).
        "max_device_epsilon": max(devices.values(), default=None),
    }


def _device_epsilons(config: SimConfig, paths: RunPaths, delta: float) -> dict[str, float]:
    if config.client_epsilon is None:
        return {}
    kind = _accountant(config)
    return {
        path.stem: ClientLedger(path).epsilon(delta, kind=kind)
        for path in sorted(_device_dir(paths).glob("device-*.jsonl"))
    }


def _accountant(config: SimConfig) -> AccountantKind:
    # DP-SGD devices pick their noise with Opacus' PRV accountant; the ledgers agree with them.
    return AccountantKind.PRV if config.dp is DpMode.SAMPLE else AccountantKind.RDP


def _device_dir(paths: RunPaths) -> Path:
    return paths.devices_dir


def _simulate(
    *,
    config: SimConfig,
    provider: FashionMnistPartitions,
    test: Split,
    paths: RunPaths,
    run_id: str,
    audit: AuditLog,
    observers: Sequence[RoundObserver],
    verbose: bool,
    privacy: PrivacyBudget | None,
) -> None:
    # Imported here: Flower's simulation module pulls in Ray, which the rest of
    # fedge (and `fedge --help`) should not pay for.
    from flwr.simulation import run_simulation

    quiet_flower(verbose)
    initial = build_model(config.model, seed=config.seed)
    fleet = (
        enrol_fleet(config.num_clients)
        if config.secure_agg and config.threat_model is ThreatModel.ACTIVE
        else None
    )
    authority = None if fleet is None else fleet.authority_public_key
    # The devices' own policy, fixed before the server says anything.
    policy = config.device_policy(authority_public_key=authority)
    refusals = RefusalLog(_device_dir(paths))
    budget = (
        None
        if config.client_epsilon is None
        else ClientBudget.for_policy(policy, _device_dir(paths), accountant=_accountant(config))
    )
    # Order matters: secure aggregation outermost, then the device's budget, then DP.
    mods: tuple[Mod, ...] = ()
    secure = None
    if config.secure_agg:
        secure = config.secure_config(authority_public_key=authority)
        identities = fleet if fleet is not None else _no_identity
        mods += (make_secagg_mod(policy=policy, identities=identities, on_refusal=refusals),)
    if budget is not None:
        mods += (make_budget_mod(budget, policy=policy, on_refusal=refusals),)
    if config.dp in (DpMode.CENTRAL, DpMode.LOCAL):
        mods += (make_dp_mod(policy=policy, on_refusal=refusals),)
    sampled = config.sampled_clients
    server_app = make_server_app(
        FederationConfig(
            num_rounds=config.num_rounds,
            fraction_train=config.fraction_train,
            min_train_nodes=sampled,
            min_available_nodes=config.num_clients,
        ),
        initial_arrays=ArrayRecord(initial.state_dict()),
        train_config=encode_train_config(config.train, seed=config.seed),
        evaluate=_make_evaluator(config, test),
        checkpoints=CheckpointDir(paths.models),
        audit=audit,
        run_id=run_id,
        observers=observers,
        secure=secure,
        privacy=privacy,
        dp=config.server_dp(),
    )
    client_app = make_client_app(
        provider, model=config.model, num_threads=1, mods=mods, budget=budget, policy=policy
    )
    parallelism = min(config.parallelism, config.num_clients)
    logger.info(
        "run %s: %d clients, %d rounds, %d in parallel",
        run_id,
        config.num_clients,
        config.num_rounds,
        parallelism,
    )
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.num_clients,
            backend_config=ray_backend_config(parallelism, verbose=verbose),
            verbose_logging=verbose,
        )
    finally:
        _shutdown_ray()


def _no_identity(context: Context) -> NodeIdentity | None:
    del context
    return None


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover - flwr[simulation] brings ray
        return
    if ray.is_initialized():
        ray.shutdown()


def check_paths(paths: RunPaths) -> None:
    """Fail early when the summary path is a directory or the database URL is empty."""
    if paths.summary.is_dir():
        raise ConfigError(f"--out {paths.summary} is a directory; give a file path")
    if not resolve_db_url(paths.db_url):
        raise ConfigError("the database URL is empty")
