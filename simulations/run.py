"""Run a federation on Flower's simulation engine and write its JSON summary."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedge.errors import ConfigError
from fl_client import PartitionProvider, make_client_app
from fl_client.budget import ClientBudget, ClientLedger
from fl_client.composition import device_mods
from fl_client.messages import encode_train_config
from fl_client.refusals import RefusalLog
from fl_server import FederationConfig, RoundObserver, RoundReport
from fl_server._grid import ForwardingGrid
from fl_server.coordinator import (
    PrivacyPlan,
    RunLocation,
    RunPlan,
    new_run_id,
    run_coordinated,
)
from fl_server.db import resolve_db_url
from fl_server.evaluation import central_evaluator
from fl_server.privacy import PrivacyMechanism
from fl_server.run_summary import RunSummary
from fl_server.store.store import NewArtefact
from secure_agg.params import ThreatModel
from simulations.attacks import attack_mod, poisoned_provider
from simulations.config import DpMode, SimConfig
from simulations.data import Split
from simulations.enrolment import SimulatedFleet, enrol_fleet
from simulations.fleet_behaviour import DeviceProfiles, FailureConfig, behaviour_mod
from simulations.modes import NormBoundSite, VariantRounds
from simulations.node_order import PartitionOrder
from simulations.offline import apply_offline_env, quiet_flower, ray_backend_config
from simulations.partition import label_skew
from simulations.provider import DatasetPartitions, training_data
from strategies.accounting import AccountantKind

__all__ = [
    "PreparedData",
    "RunPaths",
    "RunSummary",
    "check_paths",
    "new_run_id",
    "prepare_data",
    "run_federation",
]

logger = logging.getLogger(__name__)


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

    @property
    def audit_dir(self) -> Path:
        """The audit checkpoint key and anchor (:class:`fl_server.audit.trust.AuditTrust`)."""
        return self.audit or self.models.parent.parent / "audit"

    summary: Path
    models: Path
    db_url: str
    store: Path | None = None
    devices: Path | None = None
    audit: Path | None = None


@dataclass(frozen=True, slots=True)
class PreparedData:
    """The loaded, validated and partitioned data of a run."""

    provider: DatasetPartitions
    test: Split
    stats: dict[str, Any]


def prepare_data(config: SimConfig) -> PreparedData:
    """Load the data set and partition it, so bad input fails before anything starts.

    Raises
    ------
    DataError
        If the data set is missing or corrupt.
    ConfigError
        If the partitioning cannot be satisfied (e.g. more clients than examples),
        or the data set's examples do not fit the model's input encoding.
    """
    data_dir = None if config.data_dir is None else str(config.data_dir)
    dataset = training_data(config.dataset, data_dir, config.train_examples)
    if dataset.encoding is not config.input_encoding:
        raise ConfigError(
            f"the model {config.architecture.label} takes {config.input_encoding.value} inputs "
            f"but the data set {config.dataset!r} yields {dataset.encoding.value}"
        )
    test = dataset.test.take(config.test_examples or len(dataset.test))
    provider = DatasetPartitions(
        config.dataset, data_dir, config.train_examples, config.partition_config()
    )
    parts = provider.partitions()
    stats = {
        "dataset": dataset.name,
        "num_classes": dataset.num_classes,
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
) -> RunSummary:
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
    if prepared is None:
        prepared = prepare_data(config)
    provider, test = prepared.provider, prepared.test
    initial = config.architecture.build(seed=config.seed)
    initial_arrays = ArrayRecord(initial.state_dict())
    # The server's dimension: every array it sends (buffers included).
    _warn_of_short_budget(config, sum(int(a.numpy().size) for a in initial_arrays.values()))
    # Seeded sampling draws from the nodes in partition order (Flower's node ids are fresh).
    order = PartitionOrder()
    plan = RunPlan(
        run_id=run_id,
        model_name=config.store_model_name,
        federation=FederationConfig(
            num_rounds=config.num_rounds,
            fraction_train=config.fraction_train,
            min_train_nodes=config.sampled_clients,
            min_available_nodes=config.num_clients,
            strategy=config.strategy,
            sampling_seed=config.seed,
            round_timeout_s=config.round_timeout_s,
            norm_bound=config.norm_bound
            if config.norm_bound_site is NormBoundSite.SERVER
            else None,
        ),
        initial_arrays=initial_arrays,
        train_config=encode_train_config(config.train, seed=config.seed),
        evaluate=central_evaluator(config.architecture, test.images, test.labels),
        config_json=config.to_json(),
        data_stats=prepared.stats,
        # Filled in by _simulate, once the simulated fleet is enrolled.
        secure=None,
        dp=config.server_dp(),
        privacy=_privacy_plan(config),
        variants=None if config.variants is VariantRounds.OFF else _variant_builder(config, test),
        node_order=order,
        variant_rounds=range(1, config.num_rounds + 1)
        if config.variants is VariantRounds.EVERY
        else (config.num_rounds,),
    )
    fleet = (
        enrol_fleet(config.num_clients)
        if config.secure_agg and config.threat_model is ThreatModel.ACTIVE
        else None
    )
    authority = None if fleet is None else fleet.authority_public_key
    if config.secure_agg:
        per_client = prepared.stats["train_examples"] / config.num_clients
        secure = config.secure_config(
            authority_public_key=authority, examples_per_client=per_client
        )
        plan = replace(plan, secure=secure)
    location = RunLocation(
        summary=paths.summary,
        models=paths.models,
        db_url=paths.db_url,
        store_dir=paths.store_dir,
        audit_dir=paths.audit_dir,
    )

    def host(server_app: ServerApp) -> None:
        _simulate(
            config=config,
            provider=provider,
            paths=paths,
            run_id=run_id,
            server_app=server_app,
            fleet=fleet,
            order=order,
            verbose=verbose,
        )

    return run_coordinated(
        plan,
        location,
        host,
        observers=observers,
        device_epsilons=lambda: _device_epsilons(config, paths, config.delta),
        privacy_extra={
            "device_ledgers": None if config.client_epsilon is None else str(paths.devices_dir)
        },
    )


def _privacy_plan(config: SimConfig) -> PrivacyPlan | None:
    if config.dp is DpMode.OFF:
        return None
    return PrivacyPlan(
        mechanism=PrivacyMechanism.of(config.dp),
        # Sample-level DP: epsilon is each device's DP-SGD target, not a run budget.
        epsilon=None if config.dp is DpMode.SAMPLE else config.epsilon,
        delta=config.delta,
        client_lifetime_epsilon=config.client_lifetime_epsilon,
        client_budget=config.client_epsilon,
        accountant=_accountant(config),
        poisson_sampling=config.poisson_sampling,
        fraction_train=config.fraction_train,
    )


def _variant_builder(config: SimConfig, test: Split) -> Callable[[RoundReport], list[NewArtefact]]:
    # Imported here: ONNX export and quantisation are only needed with --variants.
    from simulations.variants import build_model_variants

    def build(report: RoundReport) -> list[NewArtefact]:
        data_dir = None if config.data_dir is None else str(config.data_dir)
        calibration = training_data(config.dataset, data_dir, config.train_examples).train.images[
            :1000
        ]
        held_out = test.take(2000)
        return build_model_variants(
            Path(report.model_path),
            sha256=report.model_sha256,
            model=config.model,
            held_out=(held_out.images, held_out.labels),
            calibration=calibration,
        )

    return build


def _device_epsilons(config: SimConfig, paths: RunPaths, delta: float) -> dict[str, float]:
    if config.client_epsilon is None:
        return {}
    kind = _accountant(config)
    return {
        path.stem: ClientLedger(path).epsilon(delta, kind=kind)
        for path in sorted(paths.devices_dir.glob("device-*.jsonl"))
    }


def _accountant(config: SimConfig) -> AccountantKind:
    # DP-SGD devices pick their noise with Opacus' PRV accountant; the ledgers agree with them.
    return AccountantKind.PRV if config.dp is DpMode.SAMPLE else AccountantKind.RDP


def _simulate(
    *,
    config: SimConfig,
    provider: DatasetPartitions,
    paths: RunPaths,
    run_id: str,
    server_app: ServerApp,
    fleet: SimulatedFleet | None,
    order: PartitionOrder,
    verbose: bool,
) -> None:
    quiet_flower(verbose)
    authority = None if fleet is None else fleet.authority_public_key
    # The devices' own policy, fixed before the server says anything.
    policy = config.device_policy(authority_public_key=authority)
    budget = (
        None
        if config.client_epsilon is None
        else ClientBudget.for_policy(policy, paths.devices_dir, accountant=_accountant(config))
    )
    mods = device_mods(
        policy,
        secure=config.secure_agg,
        identities=fleet,
        budget=budget,
        client_dp=config.dp in (DpMode.CENTRAL, DpMode.LOCAL),
        on_refusal=RefusalLog(paths.devices_dir),
        max_update_l2=config.norm_bound if config.norm_bound_site is NormBoundSite.DEVICE else None,
    )
    if config.devices is not None or config.failures is not None:
        # Outermost, before the secure mod: a device can go offline at any SecAgg+ stage.
        behaviour = behaviour_mod(
            config.devices
            or DeviceProfiles(seed=config.seed, speed_sigma=0.0, example_seconds=0.0),
            config.failures or FailureConfig(),
            seed=config.seed,
            num_partitions=config.num_clients,
            examples=_ExampleCount(provider),
        )
        mods = (behaviour, *mods)
    data: PartitionProvider = provider
    if config.attack is not None:
        # The attacker's training: poisoned data, then its update boosted or flipped,
        # innermost, under every fedge mod (which see it as the device's own update).
        data = poisoned_provider(provider, config.attack)
        mods = (*mods, attack_mod(config.attack, config.num_clients))
    client_app = make_client_app(
        data,
        model=config.architecture,
        num_threads=1,
        mods=mods,
        budget=budget,
        policy=policy,
        answer_partition=True,
    )
    parallelism = min(config.parallelism, config.num_clients)
    logger.info(
        "run %s: %d clients, %d rounds, %d in parallel",
        run_id,
        config.num_clients,
        config.num_rounds,
        parallelism,
    )
    _run_engine(
        server_app,
        on_grid=order.bind,
        engine=lambda app: _flower_simulation(
            server_app=app,
            client_app=client_app,
            num_supernodes=config.num_clients,
            backend_config=ray_backend_config(
                parallelism,
                verbose=verbose,
                address=config.ray_address or os.environ.get("RAY_ADDRESS") or None,
            ),
            verbose_logging=verbose,
        ),
    )


def _warn_of_short_budget(config: SimConfig, dimension: int) -> None:
    """Say before the first round when distributed DP's budget ends the run early."""
    shortfall = config.distributed_budget_shortfall(dimension)
    if shortfall is None:
        return
    allowed, fits = shortfall
    remedy = (
        f"a noise multiplier of {fits:.3g} or more fits them all"
        if fits is not None
        else "no noise multiplier up to 1,000 fits them all; lower the rounds"
    )
    logger.warning(
        "the budget epsilon %g allows %d of the %d rounds at noise multiplier %g "
        "(the run stops there); %s",
        config.epsilon,
        allowed,
        config.num_rounds,
        config.noise_multiplier,
        remedy,
    )


# Imported in the function: Flower's simulation module pulls in Ray, which the rest of
# fedge (and `fedge --help`) should not pay for.
def _flower_simulation(**arguments: Any) -> None:
    """Flower's ``run_simulation``, its in-memory LinkState indexed by node (large fleets).

    The ClientApp is pickled once, not for every message (:mod:`simulations.app_pickle`).
    """
    from flwr.simulation import run_simulation

    from simulations.app_pickle import prepickled
    from simulations.linkstate import indexed_linkstate

    arguments["client_app"] = prepickled(arguments["client_app"])
    with indexed_linkstate():
        run_simulation(**arguments)


@dataclass(frozen=True, slots=True)
class _ExampleCount:
    """A partition's example count, for the simulated compute time (picklable)."""

    provider: DatasetPartitions

    def __call__(self, partition_id: int, num_partitions: int) -> int:
        return len(self.provider.partitions()[partition_id])


def _run_engine(
    server_app: ServerApp,
    engine: Callable[[ServerApp], object],
    *,
    on_grid: Callable[[Grid], None] = lambda grid: None,
) -> None:
    """Run ``engine`` on ``server_app``; when it ends, however it ends, the ServerApp ends.

    Flower's simulation runs the ServerApp on a non-daemon thread of its own, which ends
    only with the ServerApp: once the engine stops (done, crashed, or interrupted by
    Ctrl-C) the ServerApp's Grid raises, and the round in hand (evaluation, saving) is
    waited for, so that the run is recorded after it and the process can always exit.
    """
    gate = _ServerAppGate(on_grid)
    try:
        engine(gate.wrap(server_app))
    finally:
        if gate.stop() and not gate.finished.wait(_SERVERAPP_GRACE_S):
            logger.warning("the ServerApp did not stop within %.0f s", _SERVERAPP_GRACE_S)
        _shutdown_ray()


_SERVERAPP_GRACE_S = 60.0
"""How long a stopped simulation waits for the ServerApp's round in hand (evaluation, saving)."""

_PULL_INTERVAL_S = 0.1
"""How often a round polls the simulation engine for replies (Flower's InMemoryGrid: 0.1 s)."""


class _SimulationStoppedError(RuntimeError):
    """The simulation engine stopped while the ServerApp still used it."""


class _StoppableGrid(ForwardingGrid):
    """Forward to the simulation's Grid until ``stopped`` is set; then every call raises.

    A round waiting for replies polls in :data:`_PULL_INTERVAL_S` slices, so it notices
    a stop at once instead of waiting for its timeout (the engine that would have
    answered is gone).
    """

    def __init__(self, grid: Grid, stopped: threading.Event) -> None:
        super().__init__(grid)
        self._stopped = stopped

    def _check(self) -> None:
        if self._stopped.is_set():
            raise _SimulationStoppedError("the simulation engine stopped")

    def get_node_ids(self) -> Iterable[int]:
        """Return the simulated nodes, unless stopped."""
        self._check()
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push, unless stopped."""
        self._check()
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull, unless stopped."""
        self._check()
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; collect their replies until all came, ``timeout`` or a stop."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            if self._stopped.wait(_PULL_INTERVAL_S):
                self._check()
        return replies


class _ServerAppGate:
    """Let a ServerApp run until :meth:`stop`; a ServerApp not yet started never starts."""

    def __init__(self, on_grid: Callable[[Grid], None] = lambda grid: None) -> None:
        self._on_grid = on_grid
        self.stopped = threading.Event()
        self.finished = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    def wrap(self, server_app: ServerApp) -> ServerApp:
        """Return a ServerApp that runs ``server_app`` on a Grid that raises once stopped."""
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            with self._lock:
                if self.stopped.is_set():
                    return
                self._started = True
            try:
                stoppable = _StoppableGrid(grid, self.stopped)
                self._on_grid(stoppable)
                server_app(stoppable, context)
            finally:
                self.finished.set()

        return app

    def stop(self) -> bool:
        """Stop the ServerApp; return whether it had started (then wait for ``finished``)."""
        with self._lock:
            self.stopped.set()
            return self._started


def _shutdown_ray() -> None:
    # Never import Ray here: this runs in a `finally`, and after a Ctrl-C that cut Ray's
    # own import short, importing it again raises (a partially initialised module) and
    # would hide the interrupt. Cleaning up never replaces the exception in flight.
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception as exc:  # best effort, see above
        logger.warning("could not shut Ray down: %s", exc)


def check_paths(paths: RunPaths) -> None:
    """Fail early when the summary path is a directory or the database URL is empty."""
    if paths.summary.is_dir():
        raise ConfigError(f"--out {paths.summary} is a directory; give a file path")
    if not resolve_db_url(paths.db_url):
        raise ConfigError("the database URL is empty")
