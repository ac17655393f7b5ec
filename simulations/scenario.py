"""Scenario files: a simulated federation described in TOML, validated field by field.

A scenario file has one table per concern; every table and every key but
``[scenario] name`` is optional, and each key is documented in
``docs/scenarios.md`` (generated from the help texts here by
``fedge sim schema``)::

    [scenario]
    name = "quickstart"
    rounds = 3

    [population]
    clients = 10
    per_round = 5

    [data]
    dataset = "fashion-mnist"
    partition = "dirichlet"
    alpha = 0.5

    [strategy]
    name = "fedadam"
    options = { eta = 0.01 }

:func:`load_scenario` reads and checks a file; a malformed one raises one
:class:`~simulations._toml_schema.ScenarioError` that names the file, the
table and the key. :meth:`Scenario.sim_config` turns a scenario into the
:class:`~simulations.config.SimConfig` that :func:`simulations.run.run_federation`
runs.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.model_spec import InputEncoding, ModelKwarg, ModelSpec
from edge_runtime.models import ModelName
from fedge.errors import ConfigError
from fl_client.training import TrainConfig
from secure_agg.params import ThreatModel
from simulations._toml_schema import ScenarioError, read_section
from simulations.attacks import AttackConfig, AttackKind
from simulations.config import SimConfig, default_parallelism
from simulations.fleet_behaviour import DeviceProfiles, DropoutStage, FailureConfig
from simulations.modes import DpMode, NormBoundSite, VariantRounds
from simulations.partition import PartitionMode
from strategies.rules import AggregationRule, OptionValue, StrategySpec

__all__ = [
    "AttackSection",
    "DataSection",
    "DefenceSection",
    "DevicesSection",
    "FailuresSection",
    "ModelSection",
    "OutputSection",
    "PopulationSection",
    "PrivacySection",
    "Scenario",
    "ScenarioError",
    "ScenarioSection",
    "SecureAggregationSection",
    "StrategySection",
    "TrainingSection",
    "load_scenario",
    "parse_scenario",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioSection:
    """``[scenario]``: what the run is called and how long it runs."""

    name: str = field(
        metadata=_help("The scenario's name: lowercase letters, digits, '-', '_', '.'.")
    )
    description: str = field(default="", metadata=_help("One line on what the scenario shows."))
    rounds: int = field(default=5, metadata=_help("Training rounds, >= 1."))
    seed: int = field(
        default=0,
        metadata=_help(
            "Seeds the data partition, client sampling order, initial model and shuffling "
            "(never keys, masks or DP noise: those come from the OS CSPRNG)."
        ),
    )

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                "name: use lowercase letters, digits, '-', '_' or '.' (at most 64), "
                f"got {self.name!r}"
            )
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PopulationSection:
    """``[population]``: how many simulated devices, and how many train each round."""

    clients: int = field(default=10, metadata=_help("Simulated devices (Flower SuperNodes), >= 1."))
    per_round: int | None = field(
        default=None, metadata=_help("Devices sampled each round [default: all of them].")
    )
    parallelism: int | None = field(
        default=None,
        metadata=_help("Devices trained at once (Ray CPUs) [default: this machine's cores]."),
    )
    ray_address: str | None = field(
        default=None,
        metadata=_help(
            "Run the devices on an existing Ray cluster ('auto', 'HOST:6379' or "
            "'ray://HOST:10001') [default: RAY_ADDRESS, else Ray on this machine]."
        ),
    )

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"clients: must be >= 1, got {self.clients}")
        if self.per_round is not None and not 1 <= self.per_round <= self.clients:
            raise ConfigError(
                f"per_round: must be between 1 and clients ({self.clients}), got {self.per_round}"
            )
        if self.parallelism is not None and self.parallelism < 1:
            raise ConfigError(f"parallelism: must be >= 1, got {self.parallelism}")

    @property
    def fraction(self) -> float:
        """The sampled fraction that yields ``per_round`` devices."""
        if self.per_round is None:
            return 1.0
        # A hair above per_round / clients: int(clients * fraction) must give per_round back.
        return min(1.0, (self.per_round + 0.5) / self.clients)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSection:
    """``[data]``: the data set and how it is split across the devices."""

    dataset: str = field(
        default="fashion-mnist",
        metadata=_help(
            "A built-in data set ('fashion-mnist', 'shuttle') or a loader's import path "
            "'package.module:loader' (see docs/datasets.md)."
        ),
    )
    dir: Path | None = field(
        default=None,
        metadata=_help(
            "Where the data set's files lie (relative to the scenario file) [default: the "
            "data set's own default, e.g. /usr/share/datasets/fashion-mnist]."
        ),
    )
    partition: PartitionMode = field(
        default=PartitionMode.DIRICHLET, metadata=_help("How the training split is divided.")
    )
    alpha: float = field(
        default=0.5,
        metadata=_help("Dirichlet concentration (> 0; smaller: more label skew)."),
    )
    shards_per_client: int = field(
        default=2, metadata=_help("With partition = 'shards': label-sorted shards per device.")
    )
    train_examples: int | None = field(
        default=None, metadata=_help("Use only the first N training examples [default: all].")
    )
    test_examples: int | None = field(
        default=None, metadata=_help("Evaluate on the first N test examples [default: all].")
    )

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ConfigError("dataset: must name a data set")
        if not self.alpha > 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if self.shards_per_client < 1:
            raise ConfigError(f"shards_per_client: must be >= 1, got {self.shards_per_client}")
        for name in ("train_examples", "test_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")


_BUILTIN_MODELS = {model.value: model for model in ModelName}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSection:
    """``[model]``: the torch model every device trains."""

    name: str = field(
        default="cnn",
        metadata=_help(
            "A built-in model ('cnn', 'mlp': Fashion-MNIST images) or the import path "
            "'package.module:Factory' of a torch.nn.Module (or a function returning one)."
        ),
    )
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("Keyword arguments of the factory (numbers, strings, booleans)."),
    )
    encoding: InputEncoding | None = field(
        default=None,
        metadata=_help("How examples become the model's input [default: the data set's encoding]."),
    )

    def __post_init__(self) -> None:
        if self.name in _BUILTIN_MODELS:
            if self.args:
                raise ConfigError(f"args: the built-in model {self.name!r} takes no arguments")
            if self.encoding not in (None, InputEncoding.UINT8_IMAGES):
                raise ConfigError(f"encoding: the built-in model {self.name!r} takes uint8 images")
        elif ":" not in self.name:
            raise ConfigError(
                f"name: {self.name!r} is neither a built-in model ({', '.join(_BUILTIN_MODELS)}) "
                "nor an import path 'package.module:Factory'"
            )
        try:
            self.spec(InputEncoding.FLOAT32 if self.encoding is None else self.encoding)
        except ConfigError as exc:
            raise ConfigError(f"name: {exc}") from None

    def spec(self, data_encoding: InputEncoding) -> ModelSpec:
        """Return the model spec, with ``data_encoding`` unless the section sets one."""
        builtin = _BUILTIN_MODELS.get(self.name)
        if builtin is not None:
            return ModelSpec.of(builtin)
        kwargs: list[tuple[str, ModelKwarg]] = []
        for key, value in sorted(self.args.items()):
            kwargs.append((key, value))
        return ModelSpec(
            import_path=self.name,
            kwargs=tuple(kwargs),
            encoding=data_encoding if self.encoding is None else self.encoding,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSection:
    """``[training]``: each device's local training in a round."""

    local_epochs: int = field(default=1, metadata=_help("Passes over the local data per round."))
    batch_size: int = field(default=32, metadata=_help("Examples per local SGD step."))
    learning_rate: float = field(default=0.05, metadata=_help("Local SGD step size."))
    momentum: float = field(default=0.9, metadata=_help("Local SGD momentum, in [0, 1)."))

    def __post_init__(self) -> None:
        try:
            self.train_config()
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(" must", ": must", 1)) from None

    def train_config(self) -> TrainConfig:
        """Return the devices' training configuration."""
        return TrainConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategySection:
    """``[strategy]``: the server's aggregation rule (any flwr.serverapp strategy)."""

    name: AggregationRule = field(
        default=AggregationRule.FEDAVG, metadata=_help("The aggregation rule.")
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "The rule's options, e.g. { proximal_mu = 0.01 } (fedprox), { eta = 0.01 } "
            "(fedadam, fedyogi, fedadagrad), { server_momentum = 0.9 } (fedavgm), "
            "{ beta = 0.2 } (fedtrimmedavg), { num_malicious_nodes = 2 } (krum, multikrum, bulyan)."
        ),
    )

    def __post_init__(self) -> None:
        self.spec()

    def spec(self) -> StrategySpec:
        """Return the strategy spec."""
        options: list[tuple[str, OptionValue]] = []
        for key, value in self.options.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"options: {key} must be a number, got {value!r}")
            options.append((key, value))
        try:
            return StrategySpec(rule=self.name, options=tuple(options))
        except ConfigError as exc:
            raise ConfigError(f"options: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureAggregationSection:
    """``[secure_aggregation]``: fedge SecAgg+ (the server sees only the sum of the updates)."""

    enabled: bool = field(default=False, metadata=_help("Aggregate every round with SecAgg+."))
    threat_model: ThreatModel = field(
        default=ThreatModel.ACTIVE,
        metadata=_help(
            "'active': keys signed by enrolled device identities plus the consistency check; "
            "'semi-honest': the server follows the protocol."
        ),
    )
    dropout: float | None = field(
        default=None,
        metadata=_help(
            "Fraction of a round's devices whose dropout the round survives (chooses k and "
            "t) [default: the largest of 0.2, 0.1, 0 the devices per round allow]."
        ),
    )
    ring_bits: int = field(default=32, metadata=_help("Bits per uploaded value (8, 16, 32, 64)."))
    clip_range: float = field(
        default=0.5, metadata=_help("Each update coordinate is clipped to [-c, c].")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySection:
    """``[privacy]``: differential privacy and its budget."""

    mode: DpMode = field(
        default=DpMode.OFF,
        metadata=_help(
            "'central' (the server adds noise), 'distributed' (devices add their share "
            "under secure aggregation), 'local', 'sample' (DP-SGD on every device), "
            "'sample-distributed' (one DP-SGD step a round over every device's examples, "
            "each device adding its share of the noise under secure aggregation)."
        ),
    )
    epsilon: float | None = field(
        default=None,
        metadata=_help(
            "The run's budget; with mode = 'sample', each device's DP-SGD target over the "
            "run; with 'sample-distributed', the noise is the least that spends it in the rounds."
        ),
    )
    delta: float = field(default=1e-5, metadata=_help("The delta of every epsilon."))
    clip: float = field(
        default=1.0,
        metadata=_help(
            "L2 bound of an update (mode = 'sample' or 'sample-distributed': of each "
            "example's gradient)."
        ),
    )
    sample_rate: float = field(
        default=0.05,
        metadata=_help(
            "mode = 'sample-distributed': each example's chance to be in a round's step "
            "(each device samples its own); the step is [training] learning_rate."
        ),
    )
    noise_multiplier: float = field(
        default=1.0, metadata=_help("Noise standard deviation over the L2 bound.")
    )
    adaptive_clip: bool = field(
        default=False, metadata=_help("Central DP under secure aggregation: adaptive clipping.")
    )
    poisson_sampling: bool = field(
        default=False, metadata=_help("Sample devices by CSPRNG coin flips (amplification).")
    )
    client_epsilon: float | None = field(
        default=None, metadata=_help("Each device's own lifetime budget (its policy).")
    )
    client_lifetime_epsilon: float | None = field(
        default=None, metadata=_help("Each device's cap in the server's ledger, over all runs.")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicesSection:
    """``[devices]``: the fleet's hardware (see docs/fleet-behaviour.md); no table: all alike."""

    speed_sigma: float = field(
        default=0.5,
        metadata=_help("Spread (log standard deviation) of the devices' compute speed, >= 0."),
    )
    example_seconds: float = field(
        default=0.001,
        metadata=_help("Seconds one example takes per epoch on the median device, >= 0."),
    )
    bandwidth_mbps: float = field(
        default=10.0, metadata=_help("Median upload bandwidth in Mbit/s, > 0.")
    )
    bandwidth_sigma: float = field(
        default=0.5, metadata=_help("Spread (log standard deviation) of the bandwidth, >= 0.")
    )
    availability: float = field(
        default=1.0,
        metadata=_help("Probability that a device is online for a round, in (0, 1]."),
    )

    def __post_init__(self) -> None:
        try:
            self.profiles(seed=0)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(" must", ": must", 1)) from None

    def profiles(self, *, seed: int) -> DeviceProfiles:
        """Return the fleet's profiles, drawn from ``seed``."""
        return DeviceProfiles(
            seed=seed,
            speed_sigma=self.speed_sigma,
            example_seconds=self.example_seconds,
            bandwidth_mbps=self.bandwidth_mbps,
            bandwidth_sigma=self.bandwidth_sigma,
            availability=self.availability,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FailuresSection:
    """``[failures]``: devices that drop mid-round or straggle, and the round's deadline."""

    dropout_fraction: float = field(
        default=0.0,
        metadata=_help("Share of the fleet that drops mid-round each round, in [0, 1]."),
    )
    dropout_stage: DropoutStage = field(
        default=DropoutStage.TRAINING,
        metadata=_help(
            "Where a dropping device goes offline; 'training' is after it shared its keys "
            "(the server unmasks with the survivors' shares). Simulations key secure rounds "
            "in advance (advertisement and shares in one reply): there 'setup' also skips "
            "the pre-key request, and 'share-keys' answers it but not the round's first "
            "message."
        ),
    )
    straggler_fraction: float = field(
        default=0.0, metadata=_help("Share of the fleet that straggles each round, in [0, 1].")
    )
    straggler_delay_s: float = field(
        default=0.0, metadata=_help("Extra seconds a straggler spends training, >= 0.")
    )
    time_scale: float = field(
        default=1.0,
        metadata=_help("Multiplies every simulated delay (0: no sleeping at all), >= 0."),
    )
    round_deadline_s: float = field(
        default=600.0,
        metadata=_help(
            "Seconds a round waits for replies; a secure round splits it among its stages "
            "(training 60 %). Devices later than that count as dropped."
        ),
    )

    def __post_init__(self) -> None:
        try:
            self.failures()
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(" must", ": must", 1)) from None
        if not self.round_deadline_s > 0:
            raise ConfigError(f"round_deadline_s: must be > 0, got {self.round_deadline_s}")

    def failures(self) -> FailureConfig:
        """Return the failure model."""
        return FailureConfig(
            dropout_fraction=self.dropout_fraction,
            dropout_stage=self.dropout_stage,
            straggler_fraction=self.straggler_fraction,
            straggler_delay_s=self.straggler_delay_s,
            time_scale=self.time_scale,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackSection:
    """``[attack]``: Byzantine devices (see docs/attacks.md); no table: every device is honest."""

    kind: AttackKind | None = field(
        default=None,
        metadata=_help(
            "'scale' (boost the update), 'sign-flip', 'label-flip' (train on flipped labels) "
            "or 'backdoor' (a trigger stamped on images, relabelled to target_class)."
        ),
    )
    fraction: float = field(
        default=0.1, metadata=_help("Share of the devices that are Byzantine, in [0, 1].")
    )
    scale: float = field(
        default=1.0,
        metadata=_help(
            "Factor on the attacker's update (sign-flip: its negative; label-flip and "
            "backdoor: boosting, 1 = none)."
        ),
    )
    target_class: int = field(default=0, metadata=_help("The backdoor's target class."))
    poison_fraction: float = field(
        default=0.5,
        metadata=_help("Share of an attacker's examples the backdoor stamps, in (0, 1]."),
    )

    def __post_init__(self) -> None:
        if self.kind is not None:
            try:
                self.attack(num_classes=max(10, self.target_class + 1), seed=0)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace(" must", ": must", 1)) from None

    def attack(self, *, num_classes: int, seed: int) -> AttackConfig | None:
        """Return the attack for a data set of ``num_classes`` (``None``: no attack)."""
        if self.kind is None:
            return None
        return AttackConfig(
            kind=self.kind,
            fraction=self.fraction,
            scale=self.scale,
            target_class=self.target_class,
            poison_fraction=self.poison_fraction,
            num_classes=num_classes,
            seed=seed,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DefenceSection:
    """``[defence]``: update norm bounding (robust rules are a [strategy] name)."""

    norm_bound: float | None = field(
        default=None,
        metadata=_help("Bound every update's L2 norm to this (> 0) [default: no bound]."),
    )
    site: NormBoundSite = field(
        default=NormBoundSite.DEVICE,
        metadata=_help(
            "'device': in each device's fedge runtime (holds under secure aggregation); "
            "'server': on every reply (needs the individual updates)."
        ),
    )
    compare: bool = field(
        default=False,
        metadata=_help(
            "Also run the scenario without the defence (same seed, same attackers; the "
            "robust [strategy] replaced by fedavg) and compare them."
        ),
    )

    def __post_init__(self) -> None:
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise ConfigError(f"norm_bound: must be > 0, got {self.norm_bound}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSection:
    """``[output]``: what the run leaves besides its summary, audit trail and store versions."""

    model_name: str | None = field(
        default=None,
        metadata=_help("The store name the run's versions are published under [default: model]."),
    )
    variants: VariantRounds = field(
        default=VariantRounds.OFF,
        metadata=_help("Which rounds also get measured ONNX variants (built-in models only)."),
    )
    plots: bool = field(
        default=True, metadata=_help("Write PNG plots (accuracy, loss, epsilon, participation).")
    )
    mlflow: str | None = field(
        default=None,
        metadata=_help("Also log the run to this MLflow tracking URI (the 'mlflow' extra)."),
    )


_SECTIONS: dict[str, type] = {
    "scenario": ScenarioSection,
    "population": PopulationSection,
    "data": DataSection,
    "model": ModelSection,
    "training": TrainingSection,
    "strategy": StrategySection,
    "secure_aggregation": SecureAggregationSection,
    "privacy": PrivacySection,
    "devices": DevicesSection,
    "failures": FailuresSection,
    "attack": AttackSection,
    "defence": DefenceSection,
    "output": OutputSection,
}


_PRESENCE_MATTERS = frozenset({"devices", "failures"})
"""Tables whose absence means "none of it" (all devices alike, nobody fails)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """A whole scenario file, checked; see the module docstring."""

    scenario: ScenarioSection
    population: PopulationSection = field(default_factory=PopulationSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    devices: DevicesSection | None = None
    failures: FailuresSection | None = None
    attack: AttackSection = field(default_factory=AttackSection)
    defence: DefenceSection = field(default_factory=DefenceSection)
    output: OutputSection = field(default_factory=OutputSection)
    source: str = "<scenario>"

    @staticmethod
    def sections() -> dict[str, type]:
        """Return the tables a scenario file may have, by name, in file order."""
        return dict(_SECTIONS)

    @property
    def name(self) -> str:
        """The scenario's name."""
        return self.scenario.name

    def sim_config(self, data_encoding: InputEncoding, *, num_classes: int = 10) -> SimConfig:
        """Return the simulation this scenario describes.

        Parameters
        ----------
        data_encoding
            The encoding of the data set's examples (the model's default).
        num_classes
            The data set's number of classes (label flipping maps into it).

        Raises
        ------
        ScenarioError
            If the tables contradict each other (e.g. a robust rule under secure
            aggregation, or a built-in image model on tabular data).
        """
        spec = self.model.spec(data_encoding)
        if spec.encoding is not data_encoding:
            raise ScenarioError(
                f"{self.source}: [model] {self.model.name!r} takes {spec.encoding.value} inputs "
                f"but the data set {self.data.dataset!r} yields {data_encoding.value}; name a "
                "model for it (e.g. 'simulations.tabular:SensorMLP' for tabular data)"
            )
        privacy = self.privacy
        secure = self.secure_aggregation
        self._check_tables()
        try:
            return SimConfig(
                num_clients=self.population.clients,
                num_rounds=self.scenario.rounds,
                seed=self.scenario.seed,
                partition=self.data.partition,
                alpha=self.data.alpha,
                shards_per_client=self.data.shards_per_client,
                fraction_train=self.population.fraction,
                train=self.training.train_config(),
                model=spec.builtin or ModelName.CNN,
                model_spec=None if spec.builtin is not None else spec,
                model_name=self.output.model_name,
                dataset=self.data.dataset,
                data_dir=self.data.dir,
                train_examples=self.data.train_examples,
                test_examples=self.data.test_examples,
                parallelism=self.population.parallelism or default_parallelism(),
                ray_address=self.population.ray_address,
                strategy=self.strategy.spec(),
                secure_agg=secure.enabled or privacy.mode.needs_secure_aggregation,
                threat_model=secure.threat_model,
                clip_range=secure.clip_range,
                secagg_dropout=secure.dropout,
                ring_bits=secure.ring_bits,
                dp=privacy.mode,
                epsilon=privacy.epsilon,
                delta=privacy.delta,
                dp_clip=privacy.clip,
                noise_multiplier=privacy.noise_multiplier,
                dp_sample_rate=privacy.sample_rate,
                adaptive_clip=privacy.adaptive_clip,
                poisson_sampling=privacy.poisson_sampling,
                client_epsilon=privacy.client_epsilon,
                client_lifetime_epsilon=privacy.client_lifetime_epsilon,
                variants=self.output.variants,
                attack=self.attack.attack(num_classes=num_classes, seed=self.scenario.seed),
                norm_bound=self.defence.norm_bound,
                norm_bound_site=self.defence.site,
                devices=None
                if self.devices is None
                else self.devices.profiles(seed=self.scenario.seed),
                failures=None if self.failures is None else self.failures.failures(),
                round_timeout_s=600.0 if self.failures is None else self.failures.round_deadline_s,
            )
        except ScenarioError:
            raise
        except ConfigError as exc:
            raise ScenarioError(f"{self.source}: {exc}") from None

    def without_defence(self) -> Scenario:
        """Return this scenario with no norm bound and a robust rule replaced by FedAvg."""
        from dataclasses import replace

        strategy = self.strategy
        if strategy.name.robust:
            strategy = StrategySection()
        return replace(
            self,
            scenario=replace(self.scenario, name=f"{self.scenario.name}-undefended"),
            defence=DefenceSection(),
            strategy=strategy,
        )

    def _check_tables(self) -> None:
        """Refuse contradictions between tables, naming both."""
        where = self.source
        secure = self.secure_aggregation.enabled or self.privacy.mode.needs_secure_aggregation
        privacy = self.privacy
        if privacy.mode is DpMode.OFF:
            for key in ("epsilon", "client_epsilon", "client_lifetime_epsilon"):
                if getattr(privacy, key) is not None:
                    raise ScenarioError(
                        f"{where}: [privacy] {key}: set a mode too (it is 'off', nothing is spent)"
                    )
        try:
            self.strategy.spec().check_run(
                secure_aggregation=secure,
                central_dp=privacy.mode is DpMode.CENTRAL,
                sampled=self.population.per_round or self.population.clients,
            )
        except ConfigError as exc:
            raise ScenarioError(f"{where}: [strategy] name: {exc}") from None
        if self.defence.norm_bound is not None and self.defence.site is NormBoundSite.SERVER:
            if secure:
                raise ScenarioError(
                    f"{where}: [defence] site: 'server' needs every device's update, and with "
                    "[secure_aggregation] the server sees only their sum; use 'device'"
                )
            if privacy.mode is DpMode.CENTRAL:
                raise ScenarioError(
                    f"{where}: [defence] norm_bound: central DP ([privacy] mode) already clips "
                    "every update on the server to [privacy] clip"
                )
        if self.defence.compare and self.attack.kind is None:
            raise ScenarioError(f"{where}: [defence] compare: there is no [attack] to compare")
        if (
            self.defence.compare
            and self.defence.norm_bound is None
            and not self.strategy.name.robust
        ):
            raise ScenarioError(
                f"{where}: [defence] compare: there is no defence (set norm_bound, or a robust "
                "[strategy] name)"
            )

    def to_json(self) -> dict[str, Any]:
        """Return the scenario as JSON-ready tables (as a file would hold them)."""
        from dataclasses import asdict
        from enum import Enum

        def plain(value: Any) -> Any:
            if isinstance(value, Enum):
                return value.value
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        tables = {name: getattr(self, name) for name in _SECTIONS}
        return {name: plain(asdict(table)) for name, table in tables.items() if table is not None}


def parse_scenario(document: dict[str, Any], *, source: str, base: Path | None = None) -> Scenario:
    """Check a parsed TOML document and return its scenario.

    Raises
    ------
    ScenarioError
        If a table or key is unknown, a value is wrong, or the tables contradict
        each other; the message names the table and the key.
    """
    for key in document:
        if key not in _SECTIONS:
            known = ", ".join(f"[{name}]" for name in _SECTIONS)
            raise ScenarioError(f"{source}: unknown table [{key}]; a scenario has {known}")
    if "scenario" not in document:
        raise ScenarioError(f'{source}: [scenario] is required (with at least name = "...")')
    sections: dict[str, Any] = {
        name: read_section(document.get(name, {}), cls, section=name, source=source, base=base)
        for name, cls in _SECTIONS.items()
        if name in document or name not in _PRESENCE_MATTERS
    }
    return Scenario(source=source, **sections)


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file; relative paths in it are relative to its directory.

    Raises
    ------
    ScenarioError
        If the file cannot be read, is not TOML, or is not a valid scenario.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{source}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{source}: cannot read it: {exc}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    return parse_scenario(document, source=source, base=path.resolve().parent)
