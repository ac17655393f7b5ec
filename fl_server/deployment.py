"""A deployment directory: its layout, its one TOML configuration, and ``fedge server init``.

Layout of the deployment directory (the fedge home of the cloud side)::

    DIR/
        fedge-server.toml      the configuration (below); edit it, then `fedge server start DIR`
        tls/ca.pem             the private CA devices pin (public)
        tls/ca-key.pem         its key (0600; only `fedge server init` uses it)
        tls/server.pem         the gateway's and SuperLink's certificate (SANs from --san)
        tls/server-key.pem     its key (0600)
        authority/authority.key  the enrolment authority's Ed25519 seed (0600; read only by
                               the gateway process, never by the coordinator)
        authority/authority.pub  its public key (hex)
        state/superexec.secret the secret the coordinator proves to the SuperLink (0600)
        state/superlink.db     Flower's link state
        state/current-run.json the run in progress (restart resumes it)
        fedge.db               audit log, privacy ledger, model-store index, device registry
        store/                 the model store and its signing key (store-key.pem, 0600)
        runs/RUN_ID/           summary.json and every round's checkpoint
        logs/                  superlink.log, gateway.log

Secret files are created 0600 and refused when readable by others.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.models import ModelName
from fedge.errors import ConfigError
from fl_server.store.names import check_model_name
from secure_agg.params import ThreatModel
from strategies.dp_mode import DpMode
from strategies.train_config import TrainConfig

__all__ = [
    "CONFIG_NAME",
    "DeploymentConfig",
    "DeploymentLayout",
    "EvaluationSection",
    "FederationSection",
    "PrivacySection",
    "SecureSection",
    "ServerSection",
    "load_config",
    "render_config",
]

CONFIG_NAME = "fedge-server.toml"


@dataclass(frozen=True, slots=True)
class DeploymentLayout:
    """Where every file of a deployment directory lies."""

    root: Path

    @property
    def config(self) -> Path:
        """The TOML configuration."""
        return self.root / CONFIG_NAME

    @property
    def tls(self) -> Path:
        """The TLS directory."""
        return self.root / "tls"

    @property
    def ca_cert(self) -> Path:
        """The private CA's certificate (devices pin it)."""
        return self.tls / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The private CA's key."""
        return self.tls / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        """The server's TLS certificate."""
        return self.tls / "server.pem"

    @property
    def server_key(self) -> Path:
        """The server's TLS key."""
        return self.tls / "server-key.pem"

    @property
    def authority_key(self) -> Path:
        """The enrolment authority's seed."""
        return self.root / "authority" / "authority.key"

    @property
    def authority_public_key(self) -> Path:
        """The authority's public key (hex; the coordinator and devices use it)."""
        return self.root / "authority" / "authority.pub"

    @property
    def state(self) -> Path:
        """Process state (Flower's link state, the run in progress)."""
        return self.root / "state"

    @property
    def superexec_secret(self) -> Path:
        """The coordinator's secret for the SuperLink's runtime API."""
        return self.state / "superexec.secret"

    @property
    def superlink_db(self) -> Path:
        """Flower's link state."""
        return self.state / "superlink.db"

    @property
    def current_run(self) -> Path:
        """The run in progress (what a restart resumes)."""
        return self.state / "current-run.json"

    @property
    def database(self) -> Path:
        """The default SQLite database."""
        return self.root / "fedge.db"

    @property
    def store(self) -> Path:
        """The model store."""
        return self.root / "store"

    @property
    def runs(self) -> Path:
        """One directory per run."""
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        """Log files of the supervised processes."""
        return self.root / "logs"

    def database_url(self, config: DeploymentConfig) -> str:
        """Return the configured database URL, else SQLite in the directory."""
        return config.server.database_url or f"sqlite:///{self.database}"

    def require_initialised(self) -> None:
        """Fail with one line unless ``fedge server init`` made this directory."""
        if not self.config.is_file():
            raise ConfigError(
                f"no fedge deployment at {self.root} (no {CONFIG_NAME}); "
                f"run `fedge server init {self.root}` first"
            )


def _port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{what} must be a port in [1, 65535], got {value}")
    return value


def split_address(address: str, what: str) -> tuple[str, int]:
    """Return (host, port) of ``host:port`` (``[v6]:port`` for IPv6), checked."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ConfigError(f"{what} must be host:port, got {address!r}")
    return host.strip("[]"), _port(int(port), what)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSection:
    """``[server]``: where the processes listen and what the certificate names."""

    address: str = "0.0.0.0:9443"
    public_url: str = "https://localhost:9443"
    superlink_port: int = 9092
    metrics_address: str = "127.0.0.1:9400"
    sans: tuple[str, ...] = ("localhost", "127.0.0.1")
    database_url: str = ""

    def __post_init__(self) -> None:
        split_address(self.address, "server.address")
        split_address(self.metrics_address, "server.metrics_address")
        _port(self.superlink_port, "server.superlink_port")
        if not self.public_url.startswith("https://"):
            raise ConfigError(f"server.public_url must start with https://, got {self.public_url}")
        if not self.sans:
            raise ConfigError("server.sans must name at least one host")


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSection:
    """``[federation]``: the model, the rounds and who takes part.

    ``model_name`` is the name the run's versions are published under in the model
    store (``[A-Za-z0-9_.-]{1,64}``); empty: the architecture's name (``cnn``). Give
    private and non-private run families different names, so that an alias of one
    never moves to a version of the other.
    """

    model: ModelName = ModelName.CNN
    model_name: str = ""
    rounds: int = 3
    min_clients: int = 3
    clients_per_round: int = 3
    round_timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_name:
            check_model_name(self.model_name, what="federation.model_name")
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1, got {self.rounds}")
        if self.clients_per_round < 1:
            raise ConfigError(
                f"federation.clients_per_round must be >= 1, got {self.clients_per_round}"
            )
        if self.min_clients < self.clients_per_round:
            raise ConfigError(
                f"federation.min_clients ({self.min_clients}) must be >= "
                f"clients_per_round ({self.clients_per_round})"
            )
        if not (math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise ConfigError("federation.round_timeout_s must be > 0")
        if self.seed < 0:
            raise ConfigError("federation.seed must be >= 0")

    @property
    def store_model_name(self) -> str:
        """The name the run publishes under: ``model_name``, else the architecture's."""
        return self.model_name or self.model.value


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureSection:
    """``[secure_aggregation]``: fedge SecAgg+ (the server sees only the sum)."""

    enabled: bool = True
    threat_model: ThreatModel = ThreatModel.ACTIVE
    dropout: float = 0.0
    clip_range: float = 0.5
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"secure_aggregation.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError("secure_aggregation.clip_range must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacySection:
    """``[privacy]``: the DP mode and the run's budget.

    ``min_honest_contributors`` (distributed DP): each device adds noise as if only
    this many of a round's devices were honest. It must not exceed the devices' own
    policy (2 unless their owners set more at enrolment), or they refuse every round:
    a device checks the noise it would add against its own worst case.
    """

    mode: DpMode = DpMode.DISTRIBUTED
    epsilon: float | None = 10.0
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float = 1.0
    client_lifetime_epsilon: float | None = None
    min_honest_contributors: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_honest_contributors <= 1 << 20:
            raise ConfigError(
                "privacy.min_honest_contributors must be in [1, 2^20], "
                f"got {self.min_honest_contributors}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        for name in ("epsilon", "client_lifetime_epsilon"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"privacy.{name} must be > 0, got {value}")
        for name in ("clip", "noise_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"privacy.{name} must be > 0, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationSection:
    """``[evaluation]``: the server's held-out set (the local data format: an .npz file)."""

    data: str = "eval.npz"
    examples: int = 2000

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise ConfigError("evaluation.examples must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentConfig:
    """A deployment's whole configuration (``fedge-server.toml``)."""

    server: ServerSection = field(default_factory=ServerSection)
    federation: FederationSection = field(default_factory=FederationSection)
    training: TrainConfig = field(default_factory=TrainConfig)
    secure_aggregation: SecureSection = field(default_factory=SecureSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def __post_init__(self) -> None:
        mode = self.privacy.mode
        if mode is DpMode.SAMPLE_DISTRIBUTED:
            # Its step size needs the fleet's expected examples a round, which a
            # deployment does not declare yet: simulations and scenarios only, for now.
            raise ConfigError(
                "privacy.mode 'sample-distributed' runs in simulations and scenarios only "
                "(fedge sim run); deployments offer 'sample' (DP-SGD on every device)"
            )
        if mode is DpMode.DISTRIBUTED and not self.secure_aggregation.enabled:
            raise ConfigError("privacy.mode 'distributed' needs secure_aggregation.enabled = true")
        if self.secure_aggregation.enabled and self.federation.clients_per_round < 2:
            raise ConfigError("secure aggregation needs federation.clients_per_round >= 2")


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSection,
    "federation": FederationSection,
    "training": TrainConfig,
    "secure_aggregation": SecureSection,
    "privacy": PrivacySection,
    "evaluation": EvaluationSection,
}
_ENUMS: dict[str, type[Any]] = {
    "model": ModelName,
    "threat_model": ThreatModel,
    "mode": DpMode,
}


def _field_value(name: str, kind: type[Any], key: str, raw: object) -> object:
    value = raw
    if key in _ENUMS:
        try:
            return _ENUMS[key](value)
        except ValueError:
            choices = [m.value for m in _ENUMS[key]]
            raise ConfigError(f"[{name}] {key} must be one of {choices}, got {raw!r}") from None
    if key == "sans":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("[server] sans must be a list of host names or addresses")
        return tuple(value)
    if key in ("epsilon", "client_lifetime_epsilon") and value == "none":
        return None
    expected = str(kind.__dataclass_fields__[key].type)
    if isinstance(value, bool) and "bool" not in expected:
        raise ConfigError(f"[{name}] {key} must be a number or text, not a boolean")
    if expected == "bool" and not isinstance(value, bool):
        raise ConfigError(f"[{name}] {key} must be true or false, got {raw!r}")
    if "float" in expected and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected == "str" and not isinstance(value, str):
        raise ConfigError(f"[{name}] {key} must be text, got {raw!r}")
    if "int" in expected and "float" not in expected and not isinstance(value, int):
        raise ConfigError(f"[{name}] {key} must be an integer, got {raw!r}")
    return value


def _section(name: str, raw: object) -> Any:
    kind = _SECTIONS[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    allowed = set(kind.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"[{name}] has unknown keys {unknown}; allowed: {sorted(allowed)}")
    values = {key: _field_value(name, kind, key, value) for key, value in raw.items()}
    try:
        return kind(**values)
    except TypeError as exc:
        raise ConfigError(f"[{name}]: {exc}") from None


def load_config(path: Path) -> DeploymentConfig:
    """Read and validate ``fedge-server.toml``.

    Raises
    ------
    ConfigError
        If the file is missing, is not TOML, or holds an unknown key or a bad value.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no configuration at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown sections {unknown}; allowed: {sorted(_SECTIONS)}")
    sections = {name: _section(name, raw[name]) for name in _SECTIONS if name in raw}
    try:
        return DeploymentConfig(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '"none"'
    if hasattr(value, "value"):
        return _toml_value(value.value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_config(config: DeploymentConfig) -> str:
    """Return ``config`` as the TOML ``fedge server init`` writes (every key, commented)."""
    lines = [
        "# fedge deployment configuration: edit, then `fedge server start DIR`.",
        "# Every key is listed with its value; see docs/deployment.md.",
    ]
    for name in _SECTIONS:
        section = getattr(config, name)
        lines.append("")
        lines.append(f"[{name}]")
        for key in type(section).__dataclass_fields__:
            lines.append(f"{key} = {_toml_value(getattr(section, key))}")
    return "\n".join(lines) + "\n"
