"""The typed configuration of ``fedge sim run``."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from edge_runtime.model_spec import ModelSpec
from edge_runtime.models import InputEncoding, ModelName
from fedge.errors import ConfigError
from fl_client.policy import DevicePolicy
from fl_client.training import TrainConfig
from fl_server.privacy import ServerDp
from fl_server.secagg import SecAggConfig
from fl_server.store.names import check_model_name
from secure_agg.params import ThreatModel, choose_neighbourhood
from secure_agg.policy import ProtocolPolicy
from simulations.attacks import AttackConfig
from simulations.fleet_behaviour import DeviceProfiles, FailureConfig
from simulations.modes import DpMode, NormBoundSite, VariantRounds
from simulations.partition import PartitionConfig, PartitionMode
from strategies.accounting import least_noise, zcdp_epsilon
from strategies.central import AdaptiveClipping, CentralDpSettings, LocalDpSettings
from strategies.ddp import DistributedDpSettings
from strategies.rules import StrategySpec
from strategies.sample_ddp import SampleDdpSettings, noise_for_budget
from strategies.sample_dp import SampleDpSettings

__all__ = ["AUTO_DROPOUTS", "DpMode", "SimConfig", "default_parallelism"]

AUTO_DROPOUTS = (0.2, 0.1, 0.0)
"""The dropout tolerances an unset ``secagg_dropout`` tries, largest first."""

_CORRUPT_FRACTION = SecAggConfig(clip_range=1.0).corrupt_fraction


def default_parallelism() -> int:
    """Return the CPU cores this process may use (the simulation runs one client per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=32)
def _noise_for_budget(epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    # A few seconds of accounting; a run asks several times (server, policy, checks).
    return noise_for_budget(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, rounds=rounds
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Everything one simulated federation needs.

    Parameters
    ----------
    num_clients
        Simulated clients (Flower SuperNodes), >= 1.
    num_rounds
        FedAvg rounds, >= 1.
    seed
        Seeds the partitioning, the initial model and the local shuffling.
    partition
        How the training set is split across clients.
    alpha
        Dirichlet concentration for ``partition=DIRICHLET``.
    shards_per_client
        Label-sorted shards per client for ``partition=SHARDS``.
    fraction_train
        Fraction of clients sampled per round, in (0, 1].
    train
        Local training hyper-parameters.
    model
        The built-in architecture (when ``model_spec`` is ``None``).
    model_spec
        Any torch model by import path, with its arguments and input encoding;
        ``None``: the built-in ``model``.
    dataset
        The data set: a built-in name (``fashion-mnist``, ``shuttle``) or a loader's
        import path (:mod:`simulations.datasets`).
    strategy
        The server's aggregation rule and its options (FedAvg by default); DP
        wraps it.
    model_name
        The name the run's versions are published under in the model store
        (``[A-Za-z0-9_.-]{1,64}``); ``None``: the architecture's name (``cnn``). Give
        private and non-private run families different names.
    data_dir
        Where the Fashion-MNIST IDX files lie; ``None`` uses the default lookup.
    train_examples, test_examples
        Use only the first N examples of each split (``None``: all).
    parallelism
        Clients trained at once (Ray CPUs), >= 1.
    ray_address
        Join this existing Ray cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``)
        instead of starting Ray on this machine; ``None``: the ``RAY_ADDRESS``
        environment variable, else a local Ray sized to ``parallelism``.
    secure_agg
        Aggregate every round with fedge SecAgg+ (the server sees only the sum).
    threat_model
        What the secure round defends against; ``ACTIVE`` enrols every simulated
        device with a fresh enrolment authority and adds the consistency check.
    clip_range
        Secure aggregation clips each coordinate of an update to [-c, c].
    secagg_dropout
        Fraction of a round's clients the secure round must survive losing
        (with a 10% corrupt fraction it chooses k and t; see docs/secure-aggregation.md);
        ``None``: the largest of 20%, 10% and 0% that the sampled clients allow.
    dp
        ``CENTRAL``: clients clip, the server adds Gaussian noise; ``DISTRIBUTED``:
        clients add discrete Gaussian noise under secure aggregation; ``LOCAL``:
        clients clip and noise their own updates; ``SAMPLE``: DP-SGD on every device.
    epsilon, delta
        The run's privacy budget (``None``: record spending, no limit) and its
        delta; with ``SAMPLE``, each device's DP-SGD target over the run (or
        ``noise_multiplier`` when ``None``).
    dp_clip, noise_multiplier
        The L2 bound of an update (with ``SAMPLE`` and ``SAMPLE_DISTRIBUTED``: of each
        example's gradient) and the noise over that bound (``SAMPLE_DISTRIBUTED`` with
        ``epsilon``: the noise that spends exactly the budget over the rounds).
    dp_sample_rate
        ``SAMPLE_DISTRIBUTED``: each example's probability of being in a round's step
        (each device samples its own); the step is ``train.learning_rate`` times the
        clipped gradient sum over the examples a device is expected to sample.
    ring_bits
        With secure aggregation: the width of each uploaded value (8, 16, 32 or 64 bits).
    adaptive_clip
        With ``CENTRAL``: move the bound towards the median update norm (needs secure aggregation).
    poisson_sampling
        Sample clients by independent CSPRNG coin flips (lets central DP claim amplification).
    variants
        Which published rounds also get ONNX variants (FP32, FP16, INT8, INT4), measured.
    client_epsilon
        Each device's own budget: a device declines rounds past it (``None``: no device ledger).
    attack
        Byzantine clients (:mod:`simulations.attacks`); ``None``: every client is honest.
    devices, failures
        Simulated device heterogeneity (speed, bandwidth, availability) and
        mid-round dropouts and stragglers (:mod:`simulations.fleet_behaviour`);
        ``None``: every device alike, nobody fails.
    round_timeout_s
        Seconds a round waits for replies (a secure round splits it among its stages).
    norm_bound, norm_bound_site
        Bound every update's L2 norm to ``norm_bound``, on each device (holds under
        secure aggregation) or on the server; ``None``: no bound.
    client_lifetime_epsilon
        Each client's cap in the server's ledger, over every run it took part in
        (keyed by its enrolled identity): the server refuses a round that would
        take a participant past it (``None``: no cap).
    """

    num_clients: int = 10
    num_rounds: int = 5
    seed: int = 0
    partition: PartitionMode = PartitionMode.DIRICHLET
    alpha: float = 0.5
    shards_per_client: int = 2
    fraction_train: float = 1.0
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelName = ModelName.CNN
    model_spec: ModelSpec | None = None
    dataset: str = "fashion-mnist"
    strategy: StrategySpec = field(default_factory=StrategySpec)
    model_name: str | None = None
    data_dir: Path | None = None
    train_examples: int | None = None
    test_examples: int | None = None
    parallelism: int = field(default_factory=default_parallelism)
    ray_address: str | None = None
    secure_agg: bool = False
    threat_model: ThreatModel = ThreatModel.ACTIVE
    clip_range: float = 0.5
    secagg_dropout: float | None = None
    dp: DpMode = DpMode.OFF
    epsilon: float | None = None
    delta: float = 1e-5
    dp_clip: float = 1.0
    noise_multiplier: float = 1.0
    dp_sample_rate: float = 0.05
    ring_bits: int = 32
    adaptive_clip: bool = False
    poisson_sampling: bool = False
    client_epsilon: float | None = None
    client_lifetime_epsilon: float | None = None
    variants: VariantRounds = VariantRounds.OFF
    attack: AttackConfig | None = None
    devices: DeviceProfiles | None = None
    failures: FailureConfig | None = None
    round_timeout_s: float = 600.0
    norm_bound: float | None = None
    norm_bound_site: NormBoundSite = NormBoundSite.DEVICE

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.num_rounds}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.parallelism < 1:
            raise ConfigError(f"parallelism must be >= 1, got {self.parallelism}")
        if self.model_name is not None:
            check_model_name(self.model_name, what="--model-name")
        # Validates num_clients, alpha and seed with the partitioner's own checks.
        self.partition_config()
        self._check_dp()
        if not self.dataset:
            raise ConfigError("dataset must name a data set")
        if self.variants is not VariantRounds.OFF and self.model_spec is not None:
            raise ConfigError(
                "ONNX variants are built for the built-in image models only; "
                "set variants to off for a model given by import path"
            )
        self._check_defence()
        self._check_failures()
        self.strategy.check_run(
            secure_aggregation=self.secure_agg,
            central_dp=self.dp is DpMode.CENTRAL,
            sampled=self.sampled_clients,
        )
        if self.secure_agg:
            if self.num_clients < 2:
                raise ConfigError("secure aggregation needs at least 2 clients")
            secure = self.secure_config(authority_public_key=bytes(32))
            try:
                choose_neighbourhood(
                    self.sampled_clients,
                    dropout_fraction=secure.dropout_fraction,
                    corrupt_fraction=secure.corrupt_fraction,
                    threat_model=secure.threat_model,
                )
            except ConfigError as exc:
                if self.secagg_dropout is None:
                    raise ConfigError(
                        f"{exc}: secure aggregation of {self.sampled_clients} clients per "
                        "round cannot hold even without dropouts; sample at least 3"
                    ) from None
                raise ConfigError(
                    f"{exc}; for small federations pass --secagg-dropout 0 (no dropout "
                    "tolerated), or leave it unset to choose the largest that fits"
                ) from None

    def _check_failures(self) -> None:
        if not (math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise ConfigError(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.failures is None or not self.secure_agg:
            return
        # Devices dropping mid-round are the secure round's dropouts: more than it was
        # built to survive and every round aborts. (Offline devices and stragglers past
        # the deadline count too; their share is random, so only the fixed one is checked.)
        tolerated = self.dropout_tolerance
        if self.failures.dropout_fraction > tolerated + 1e-9:
            raise ConfigError(
                f"[failures] dropout_fraction drops {self.failures.dropout_fraction:.0%} of the "
                f"devices mid-round, but secure aggregation survives {tolerated:.0%}: set "
                "[secure_aggregation] dropout to at least as much, or every round aborts"
            )

    def _check_defence(self) -> None:
        if self.norm_bound is None:
            return
        if not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ConfigError(f"norm_bound must be a finite number > 0, got {self.norm_bound}")
        if self.norm_bound_site is NormBoundSite.SERVER:
            if self.secure_agg:
                raise ConfigError(
                    "a server-side norm bound needs every device's update, and under secure "
                    "aggregation the server sees only their sum: bound on the devices instead"
                )
            if self.dp is DpMode.CENTRAL:
                raise ConfigError(
                    "central DP already clips every update on the server to its L2 bound"
                )

    def _check_shared_noise(self) -> None:
        if not 0 < self.dp_sample_rate <= 1:
            raise ConfigError(f"dp_sample_rate must be in (0, 1], got {self.dp_sample_rate}")
        if self.dp is DpMode.SAMPLE_DISTRIBUTED and self.ring_bits != 32:
            raise ConfigError(
                "sample-distributed DP needs a 32-bit ring (--ring-bits 32): at 16 bits "
                "rounding would double each example's sensitivity"
            )

    def _check_dp(self) -> None:
        if self.dp.needs_secure_aggregation and not self.secure_agg:
            raise ConfigError(f"{self.dp.value} DP runs under secure aggregation: add --secure-agg")
        if self.adaptive_clip and self.dp is not DpMode.CENTRAL:
            raise ConfigError("--adaptive-clip is for --dp central")
        if self.epsilon is not None and self.dp is DpMode.OFF:
            # Without a mechanism nothing is spent: a budget would be recorded but never enforced.
            raise ConfigError("--epsilon needs a --dp mechanism")
        if self.client_epsilon is not None:
            if self.dp is DpMode.OFF:
                raise ConfigError("--client-epsilon needs a --dp mechanism")
            if not (math.isfinite(self.client_epsilon) and self.client_epsilon > 0):
                raise ConfigError(f"client_epsilon must be > 0, got {self.client_epsilon}")
        lifetime = self.client_lifetime_epsilon
        if lifetime is not None:
            if self.dp is DpMode.OFF:
                raise ConfigError("--client-lifetime-epsilon needs a --dp mechanism")
            if not (math.isfinite(lifetime) and lifetime > 0):
                raise ConfigError(f"client_lifetime_epsilon must be > 0, got {lifetime}")
        self._check_shared_noise()
        if self.dp is not DpMode.OFF and not self.dp.needs_secure_aggregation:
            # Validates clip, noise, adaptive clipping and its need for secure aggregation.
            self.server_dp()
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"epsilon must be a finite number > 0, got {self.epsilon}")

    @property
    def store_model_name(self) -> str:
        """The name the run publishes under: ``model_name``, else the architecture's."""
        return self.model.value if self.model_name is None else self.model_name

    @property
    def architecture(self) -> ModelSpec:
        """The model both sides build: ``model_spec``, else the built-in ``model``."""
        return self.model_spec if self.model_spec is not None else ModelSpec.of(self.model)

    @property
    def input_encoding(self) -> InputEncoding:
        """How the data set's examples become the model's input."""
        return self.architecture.encoding

    @property
    def dropout_tolerance(self) -> float:
        """The secure round's dropout fraction: ``secagg_dropout``, or the largest that fits."""
        if self.secagg_dropout is not None:
            return self.secagg_dropout
        for fraction in AUTO_DROPOUTS:
            try:
                choose_neighbourhood(
                    self.sampled_clients,
                    dropout_fraction=fraction,
                    corrupt_fraction=_CORRUPT_FRACTION,
                    threat_model=self.threat_model,
                )
            except ConfigError:
                continue
            return fraction
        return AUTO_DROPOUTS[-1]

    @property
    def sampled_clients(self) -> int:
        """Clients sampled per round."""
        return max(1, int(self.num_clients * self.fraction_train))

    def secure_config(
        self, *, authority_public_key: bytes | None, examples_per_client: float | None = None
    ) -> SecAggConfig:
        """Return the secure-aggregation settings of this run.

        ``examples_per_client`` (the training examples over the clients) sizes the
        step of ``SAMPLE_DISTRIBUTED``; it changes no privacy number.
        """
        return SecAggConfig(
            clip_range=self.clip_range,
            ring_bits=self.ring_bits,
            threat_model=self.threat_model,
            authority_public_key=authority_public_key,
            dropout_fraction=self.dropout_tolerance,
            # A scenario's [failures] deadline bounds the whole secure round.
            masked_input_share=None if self.failures is None else 0.6,
            min_clients=2,
            prekeys=True,
            # A semi-honest server follows the protocol, so it may draw the graph: the
            # devices then mask in their first reply (two trips a round, not three).
            server_graph=self.threat_model is ThreatModel.SEMI_HONEST,
            distributed_dp=self._distributed_dp(examples_per_client),
        )

    def _distributed_dp(
        self, examples_per_client: float | None
    ) -> DistributedDpSettings | SampleDdpSettings | None:
        if self.dp is DpMode.DISTRIBUTED:
            return DistributedDpSettings(
                l2_clip=self.dp_clip,
                noise_multiplier=self.noise_multiplier,
                ring_bits=self.ring_bits,
            )
        if self.dp is DpMode.SAMPLE_DISTRIBUTED:
            return SampleDdpSettings(
                example_clip=self.dp_clip,
                noise_multiplier=self.shared_noise_multiplier,
                sample_rate=self.dp_sample_rate,
                learning_rate=self.train.learning_rate,
                expected_batch=max(1.0, self.dp_sample_rate * (examples_per_client or 1.0)),
                ring_bits=self.ring_bits,
            )
        return None

    @property
    def shared_noise_multiplier(self) -> float:
        """``SAMPLE_DISTRIBUTED``: the accounted multiplier of every round.

        With ``epsilon``: the smallest whose rounds spend at most the budget (so the
        run ends with its last round, not before); else ``noise_multiplier``.
        """
        if self.epsilon is None:
            return self.noise_multiplier
        return _noise_for_budget(self.epsilon, self.delta, self.dp_sample_rate, self.num_rounds)

    def distributed_round_rho(self, dimension: int, noise_multiplier: float | None = None) -> float:
        """``DISTRIBUTED``: the rho every round charges a model of ``dimension`` parameters.

        As the server and each device compute it (:meth:`strategies.ddp.DdpConfig.rho`
        with the policy's fewest honest contributors); ``noise_multiplier`` overrides
        the configured one.
        """
        if self.dp is not DpMode.DISTRIBUTED:
            raise ConfigError(f"a round's rho is defined here for distributed DP, not {self.dp}")
        # The authority's key changes no count; a placeholder stands in for the active model.
        secure = self.secure_config(authority_public_key=bytes(32))
        sampled = self.sampled_clients
        honest = secure.min_honest_contributors(sampled)
        settings = secure.distributed_dp
        assert isinstance(settings, DistributedDpSettings)
        if noise_multiplier is not None:
            settings = replace(settings, noise_multiplier=noise_multiplier)
        ddp = settings.for_round(
            dimension=dimension, sampled=sampled, min_honest=honest, rotation_seed=bytes(32)
        )
        return ddp.rho(honest)

    def distributed_budget_shortfall(self, dimension: int) -> tuple[int, float | None] | None:
        """``DISTRIBUTED`` with a budget that runs out early: (rounds it allows, multiplier).

        ``None`` when every round fits (or there is no budget). Else the rounds the budget
        allows at the configured noise multiplier (the run stops after them) and the
        least multiplier that fits them all (``None`` if none up to 1,000 does).
        """
        if self.dp is not DpMode.DISTRIBUTED or self.epsilon is None:
            return None
        rho = self.distributed_round_rho(dimension)
        allowed = 0
        while allowed < self.num_rounds and (
            zcdp_epsilon((allowed + 1) * rho, delta=self.delta) <= self.epsilon
        ):
            allowed += 1
        if allowed == self.num_rounds:
            return None

        def run_epsilon(multiplier: float) -> float:
            round_rho = self.distributed_round_rho(dimension, multiplier)
            return zcdp_epsilon(self.num_rounds * round_rho, delta=self.delta)

        fits = least_noise(run_epsilon, self.epsilon, low=self.noise_multiplier, high=1000.0)
        return allowed, fits

    def server_dp(self) -> ServerDp | None:
        """Return the server's central, local or sample-level DP settings (None otherwise)."""
        if self.dp is DpMode.OFF or self.dp.needs_secure_aggregation:
            return None
        central = local = sample = None
        if self.dp is DpMode.CENTRAL:
            central = CentralDpSettings(
                l2_clip=self.dp_clip,
                noise_multiplier=self.noise_multiplier,
                adaptive=(
                    AdaptiveClipping(count_noise_std=max(self.sampled_clients / 20, 1.0))
                    if self.adaptive_clip
                    else None
                ),
            )
        elif self.dp is DpMode.LOCAL:
            local = LocalDpSettings(l2_clip=self.dp_clip, noise_multiplier=self.noise_multiplier)
        else:
            sample = SampleDpSettings(
                max_grad_norm=self.dp_clip,
                noise_multiplier=0.0 if self.epsilon is not None else self.noise_multiplier,
                target_epsilon=self.epsilon or 0.0,
                delta=self.delta,
                total_epochs=self.num_rounds * self.train.local_epochs,
            )
        return ServerDp(
            central=central,
            local=local,
            sample=sample,
            secure=self.secure_agg,
            poisson_sampling=self.poisson_sampling,
        )

    def device_policy(self, *, authority_public_key: bytes | None) -> DevicePolicy:
        """Return the policy every simulated device is installed with (a deployment ships one).

        It admits exactly this run's parameters: its threat model and authority,
        its ring, the k and t the server chooses for the sampled clients, the
        survivors the dropout fraction leaves, its clip and noise multiplier,
        the fewest honest contributors of distributed DP, and ``client_epsilon``
        as each device's lifetime budget. A server that asks for anything else
        is refused by the devices.
        """
        protocol = None
        honest = 1
        if self.secure_agg:
            secure = self.secure_config(authority_public_key=authority_public_key)
            sampled = self.sampled_clients
            chosen = choose_neighbourhood(
                sampled,
                dropout_fraction=secure.dropout_fraction,
                corrupt_fraction=secure.corrupt_fraction,
                threat_model=secure.threat_model,
            )
            tolerated = math.ceil(round(secure.dropout_fraction * sampled, 9))
            protocol = ProtocolPolicy(
                threat_model=self.threat_model,
                authority_public_key=authority_public_key,
                ring_bits=frozenset({self.ring_bits}),
                min_degree=chosen.degree,
                corrupt_fraction=secure.corrupt_fraction,
                min_survivors=max(2, sampled - tolerated),
                accept_server_graph=secure.server_graph,
            )
            if self.dp.needs_secure_aggregation:
                honest = secure.min_honest_contributors(sampled)
        clip = self.dp_clip
        if self.adaptive_clip:
            clip = AdaptiveClipping().max_clip
        noise = self.noise_multiplier
        if self.dp is DpMode.SAMPLE and self.epsilon is not None:
            noise = 1e-3  # the device derives its own DP-SGD noise from the target
        if self.dp is DpMode.SAMPLE_DISTRIBUTED:
            noise = self.shared_noise_multiplier
        return DevicePolicy(
            protocol=protocol,
            max_l2_clip=clip,
            min_noise_multiplier=noise,
            min_honest_contributors=honest,
            lifetime_epsilon=self.client_epsilon,
            delta=self.delta,
        )

    def partition_config(self) -> PartitionConfig:
        """Return the partitioning this configuration asks for."""
        return PartitionConfig(
            num_clients=self.num_clients,
            mode=self.partition,
            alpha=self.alpha,
            shards_per_client=self.shards_per_client,
            seed=self.seed,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the configuration as JSON-ready values (enums by value, paths as strings)."""
        raw = asdict(self)
        raw["partition"] = self.partition.value
        raw["model"] = self.model.value
        raw["threat_model"] = self.threat_model.value
        raw["dp"] = self.dp.value
        raw["variants"] = self.variants.value
        raw["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        raw["secagg_dropout"] = self.dropout_tolerance
        # Left out at their defaults: a configuration's hash stays what it was before
        # the options existed.
        if self.model_name is None:
            del raw["model_name"]
        if self.train.proximal_mu == 0:
            del raw["train"]["proximal_mu"]
        for name, default in (
            ("shards_per_client", 2),
            ("dataset", "fashion-mnist"),
            ("ray_address", None),
        ):
            if raw[name] == default:
                del raw[name]
        del raw["model_spec"], raw["strategy"], raw["attack"], raw["devices"], raw["failures"]
        if raw["round_timeout_s"] == 600.0:
            del raw["round_timeout_s"]
        for name in ("devices", "failures"):
            value = getattr(self, name)
            if value is not None:
                raw[name] = {
                    key: item.value if isinstance(item, Enum) else item
                    for key, item in asdict(value).items()
                }
        del raw["norm_bound"], raw["norm_bound_site"]
        if self.attack is not None:
            raw["attack"] = {
                "kind": self.attack.kind.value,
                "fraction": self.attack.fraction,
                "scale": self.attack.scale,
                "target_class": self.attack.target_class,
                "poison_fraction": self.attack.poison_fraction,
                "seed": self.attack.seed,
            }
        if self.norm_bound is not None:
            raw["norm_bound"] = {"l2": self.norm_bound, "site": self.norm_bound_site.value}
        if self.model_spec is not None:
            raw["model_spec"] = self.model_spec.to_json()
        if self.strategy != StrategySpec():
            raw["strategy"] = self.strategy.to_json()
        return raw
