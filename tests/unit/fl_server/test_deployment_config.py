"""fedge-server.toml: the round trip, every refusal of load_config, and each section's checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.models import ModelName
from fedge.errors import ConfigError
from fl_server.deployment import (
    CONFIG_NAME,
    DeploymentConfig,
    DeploymentLayout,
    EvaluationSection,
    FederationSection,
    PrivacySection,
    SecureSection,
    ServerSection,
    load_config,
    render_config,
    split_address,
)
from secure_agg.params import ThreatModel
from strategies.dp_mode import DpMode
from strategies.train_config import TrainConfig


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / CONFIG_NAME
    path.write_text(text, encoding="utf-8")
    return path


def test_the_rendered_default_configuration_loads_back_equal(tmp_path: Path) -> None:
    config = DeploymentConfig()

    loaded = load_config(_write(tmp_path, render_config(config)))

    assert loaded == config


def test_a_changed_configuration_round_trips_every_section(tmp_path: Path) -> None:
    config = DeploymentConfig(
        server=ServerSection(
            address="[::1]:8443",
            public_url="https://fedge.example:8443",
            superlink_port=19092,
            metrics_address="127.0.0.1:9500",
            sans=("fedge.example", "10.0.0.5"),
            database_url='postgresql+psycopg://u@db/"x"',
        ),
        federation=FederationSection(
            model=ModelName.MLP,
            rounds=7,
            min_clients=5,
            clients_per_round=4,
            round_timeout_s=30.5,
            seed=11,
        ),
        training=TrainConfig(local_epochs=2, batch_size=16, learning_rate=0.1, momentum=0.5),
        secure_aggregation=SecureSection(
            threat_model=ThreatModel.SEMI_HONEST, dropout=0.25, clip_range=2.0, ring_bits=24
        ),
        privacy=PrivacySection(
            mode=DpMode.CENTRAL,
            epsilon=None,
            delta=1e-6,
            clip=0.5,
            noise_multiplier=1.5,
            client_lifetime_epsilon=20.0,
        ),
        evaluation=EvaluationSection(data="held-out.npz", examples=100),
    )

    loaded = load_config(_write(tmp_path, render_config(config)))

    assert loaded == config
    assert loaded.privacy.epsilon is None
    assert loaded.server.sans == ("fedge.example", "10.0.0.5")


def test_missing_sections_take_their_defaults(tmp_path: Path) -> None:
    loaded = load_config(_write(tmp_path, "[federation]\nrounds = 9\n"))

    assert loaded == replace(DeploymentConfig(), federation=FederationSection(rounds=9))


def test_an_integer_where_a_float_is_expected_is_a_float(tmp_path: Path) -> None:
    loaded = load_config(_write(tmp_path, "[federation]\nround_timeout_s = 5\n"))

    assert loaded.federation.round_timeout_s == 5.0
    assert isinstance(loaded.federation.round_timeout_s, float)


def test_epsilon_none_is_no_budget(tmp_path: Path) -> None:
    loaded = load_config(_write(tmp_path, '[privacy]\nepsilon = "none"\n'))

    assert loaded.privacy.epsilon is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[extras]\nx = 1\n", r"unknown sections \['extras'\]"),
        ("[server]\nport = 1\n", r"\[server\] has unknown keys \['port'\]; allowed: "),
        ('[privacy]\nmode = "secret"\n', r"\[privacy\] mode must be one of \['off', 'central'"),
        ("[federation]\nmodel = 3\n", r"\[federation\] model must be one of \['cnn', 'mlp'\]"),
        (
            '[secure_aggregation]\nthreat_model = "malicious"\n',
            r"threat_model must be one of \['semi-honest', 'active'\], got 'malicious'",
        ),
        ("[federation]\nrounds = true\n", r"\[federation\] rounds must be a number or text, not"),
        ("[privacy]\nepsilon = false\n", r"\[privacy\] epsilon must be a number or text, not"),
        ("[server]\naddress = 9443\n", r"\[server\] address must be text, got 9443"),
        ("[evaluation]\ndata = 5\n", r"\[evaluation\] data must be text, got 5"),
        ("[federation]\nrounds = 2.5\n", r"\[federation\] rounds must be an integer, got 2.5"),
        ('[training]\nbatch_size = "32"\n', r"\[training\] batch_size must be an integer"),
        (
            '[secure_aggregation]\nenabled = "false"\n',
            r"\[secure_aggregation\] enabled must be true or false, got 'false'",
        ),
        ("[secure_aggregation]\nenabled = 0\n", r"enabled must be true or false, got 0"),
        ('[server]\nsans = "localhost"\n', r"\[server\] sans must be a list of host names"),
        ("[server]\nsans = [1]\n", r"\[server\] sans must be a list of host names"),
        ("server = 3\n", r"\[server\] must be a table"),
        ('[privacy]\nepsilon = "abc"\n', r"\[privacy\]: "),
        ("[federation]\nrounds = 0\n", r"federation.rounds must be >= 1, got 0"),
        ("[training]\nmomentum = 1.0\n", r"momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_load_config_refuses(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_a_section_check_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[federation]\nclients_per_round = 1\nmin_clients = 1\n")

    with pytest.raises(ConfigError, match=rf"^{path}: secure aggregation needs"):
        load_config(path)


def test_load_config_refuses_a_file_that_is_not_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server\naddress = \n")

    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(path)


def test_load_config_refuses_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_bytes(b"\xff\xfe\x00binary")

    with pytest.raises(ConfigError, match=r"^cannot read "):
        load_config(path)


def test_load_config_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError, match=rf"^no configuration at {path}$"):
        load_config(path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"address": "0.0.0.0"}, r"server.address must be host:port, got '0.0.0.0'"),
        ({"address": ":9443"}, r"server.address must be host:port"),
        ({"address": "host:"}, r"server.address must be host:port"),
        ({"address": "host:-1"}, r"server.address must be host:port"),
        ({"address": "host:\u00b2"}, r"server.address must be host:port"),
        ({"address": "host:0"}, r"server.address must be a port in \[1, 65535\], got 0"),
        ({"address": "host:65536"}, r"server.address must be a port in \[1, 65535\], got 65536"),
        ({"metrics_address": "metrics"}, r"server.metrics_address must be host:port"),
        ({"superlink_port": 0}, r"server.superlink_port must be a port in \[1, 65535\], got 0"),
        ({"superlink_port": 70000}, r"server.superlink_port must be a port"),
        ({"public_url": "http://x:9443"}, r"server.public_url must start with https://"),
        ({"sans": ()}, r"server.sans must name at least one host"),
    ],
)
def test_server_section_refuses(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerSection(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rounds": 0}, r"federation.rounds must be >= 1, got 0"),
        ({"clients_per_round": 0, "min_clients": 0}, r"clients_per_round must be >= 1, got 0"),
        (
            {"clients_per_round": 4, "min_clients": 3},
            r"federation.min_clients \(3\) must be >= clients_per_round \(4\)",
        ),
        ({"round_timeout_s": 0.0}, r"federation.round_timeout_s must be > 0"),
        ({"round_timeout_s": float("inf")}, r"federation.round_timeout_s must be > 0"),
        ({"round_timeout_s": float("nan")}, r"federation.round_timeout_s must be > 0"),
        ({"seed": -1}, r"federation.seed must be >= 0"),
    ],
)
def test_federation_section_refuses(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FederationSection(**changes)  # type: ignore[arg-type]


def test_federation_accepts_min_clients_equal_to_clients_per_round() -> None:
    section = FederationSection(min_clients=2, clients_per_round=2)

    assert (section.min_clients, section.clients_per_round) == (2, 2)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dropout": -0.1}, r"secure_aggregation.dropout must be in \[0, 1\), got -0.1"),
        ({"dropout": 1.0}, r"secure_aggregation.dropout must be in \[0, 1\), got 1.0"),
        ({"clip_range": 0.0}, r"secure_aggregation.clip_range must be > 0"),
        ({"clip_range": float("nan")}, r"secure_aggregation.clip_range must be > 0"),
    ],
)
def test_secure_section_refuses(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecureSection(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"delta": 0.0}, r"privacy.delta must be in \(0, 1\), got 0.0"),
        ({"delta": 1.0}, r"privacy.delta must be in \(0, 1\), got 1.0"),
        ({"epsilon": 0.0}, r"privacy.epsilon must be > 0, got 0.0"),
        ({"epsilon": float("inf")}, r"privacy.epsilon must be > 0, got inf"),
        ({"client_lifetime_epsilon": -1.0}, r"privacy.client_lifetime_epsilon must be > 0"),
        ({"clip": 0.0}, r"privacy.clip must be > 0, got 0.0"),
        ({"noise_multiplier": float("nan")}, r"privacy.noise_multiplier must be > 0, got nan"),
    ],
)
def test_privacy_section_refuses(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PrivacySection(**changes)  # type: ignore[arg-type]


def test_evaluation_section_refuses_no_examples() -> None:
    with pytest.raises(ConfigError, match=r"evaluation.examples must be >= 1"):
        EvaluationSection(examples=0)


def test_distributed_dp_needs_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match=r"'distributed' needs secure_aggregation.enabled"):
        DeploymentConfig(secure_aggregation=SecureSection(enabled=False))


def test_shared_noise_dp_sgd_is_refused_in_deployments_with_the_alternative_named() -> None:
    with pytest.raises(ConfigError, match=r"'sample-distributed' runs in simulations .* 'sample'"):
        DeploymentConfig(privacy=PrivacySection(mode=DpMode.SAMPLE_DISTRIBUTED))


def test_secure_aggregation_needs_two_clients_per_round() -> None:
    with pytest.raises(ConfigError, match=r"needs federation.clients_per_round >= 2"):
        DeploymentConfig(federation=FederationSection(min_clients=1, clients_per_round=1))


def test_one_client_per_round_is_fine_without_secure_aggregation() -> None:
    config = DeploymentConfig(
        federation=FederationSection(min_clients=1, clients_per_round=1),
        secure_aggregation=SecureSection(enabled=False),
        privacy=PrivacySection(mode=DpMode.CENTRAL),
    )

    assert config.federation.clients_per_round == 1


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:9443", ("0.0.0.0", 9443)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9443", ("::1", 9443)),
        ("[2001:db8::7]:65535", ("2001:db8::7", 65535)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address, "x") == expected


def test_split_address_names_what_it_checks() -> None:
    with pytest.raises(ConfigError, match=r"^gateway must be host:port, got 'nope'$"):
        split_address("nope", "gateway")


def test_require_initialised_says_how_to_make_the_deployment(tmp_path: Path) -> None:
    layout = DeploymentLayout(tmp_path / "dep")

    with pytest.raises(ConfigError, match=r"^no fedge deployment at .*dep \(no fedge-") as info:
        layout.require_initialised()

    assert str(info.value).endswith(f"run `fedge server init {tmp_path / 'dep'}` first")


def test_require_initialised_passes_once_the_config_exists(tmp_path: Path) -> None:
    layout = DeploymentLayout(tmp_path)
    layout.config.write_text(render_config(DeploymentConfig()), encoding="utf-8")

    layout.require_initialised()

    assert layout.database_url(DeploymentConfig()) == f"sqlite:///{tmp_path / 'fedge.db'}"


def test_database_url_prefers_the_configured_one(tmp_path: Path) -> None:
    config = DeploymentConfig(server=ServerSection(database_url="postgresql://db/fedge"))

    assert DeploymentLayout(tmp_path).database_url(config) == "postgresql://db/fedge"
