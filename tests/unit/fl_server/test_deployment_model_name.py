"""``[federation] model_name``: the store name a deployment's runs publish under."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.models import ModelName
from fedge.errors import ConfigError
from fl_server.deployment import (
    CONFIG_NAME,
    DeploymentConfig,
    EvaluationSection,
    FederationSection,
    PrivacySection,
    load_config,
    render_config,
)
from fl_server.deployment_init import init_deployment
from fl_server.deployment_plan import build_plan, config_json
from strategies.dp_mode import DpMode
from tests.helpers import stripes


def test_by_default_a_run_publishes_under_the_architectures_name() -> None:
    assert FederationSection().store_model_name == "cnn"
    assert FederationSection(model=ModelName.MLP).store_model_name == "mlp"


def test_a_model_name_round_trips_through_the_toml(tmp_path: Path) -> None:
    config = DeploymentConfig(federation=FederationSection(model_name="cnn-dp.v2"))
    path = tmp_path / CONFIG_NAME
    path.write_text(render_config(config), encoding="utf-8")

    loaded = load_config(path)

    assert loaded == config
    assert loaded.federation.store_model_name == "cnn-dp.v2"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ('"a/b"', r"federation.model_name must match \[A-Za-z0-9_.-\]\{1,64\}"),
        ('".."', r"federation.model_name must match .* not be '.' or '..', got '..'"),
        (f'"{"x" * 65}"', r"federation.model_name must match"),
        ("3", r"\[federation\] model_name must be text, got 3"),
    ],
)
def test_a_bad_model_name_is_one_error_naming_the_key(
    tmp_path: Path, value: str, match: str
) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text(f"[federation]\nmodel_name = {value}\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_the_default_name_leaves_the_recorded_configuration_as_it_was() -> None:
    assert "model_name" not in config_json(DeploymentConfig())["federation"]
    named = DeploymentConfig(federation=FederationSection(model_name="cnn-dp"))
    assert config_json(named)["federation"]["model_name"] == "cnn-dp"


def test_the_plan_publishes_under_the_configured_name(tmp_path: Path) -> None:
    layout = init_deployment(tmp_path / "dep", now=datetime(2026, 3, 1, tzinfo=UTC))
    images, labels = stripes(12, seed=3)
    np.savez(layout.root / "eval.npz", images=images, labels=labels)
    config = DeploymentConfig(
        federation=FederationSection(model_name="cnn-central-dp"),
        privacy=PrivacySection(mode=DpMode.CENTRAL),
        evaluation=EvaluationSection(examples=8),
    )

    plan = build_plan(config, layout, "run-1")

    assert plan.model_name == "cnn-central-dp"
    assert plan.dp_mode is DpMode.CENTRAL
