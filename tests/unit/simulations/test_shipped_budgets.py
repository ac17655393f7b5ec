"""Every shipped scenario's privacy budget lasts all its rounds (it runs as written)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.models import InputEncoding
from simulations.config import SimConfig
from simulations.modes import DpMode
from simulations.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"
# The encodings of the built-in data sets (what their loaders report).
ENCODINGS = {"fashion-mnist": InputEncoding.UINT8_IMAGES, "shuttle": InputEncoding.FLOAT32}


def _config(name: str) -> SimConfig:
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    num_classes = 7 if scenario.data.dataset == "shuttle" else 10
    return scenario.sim_config(ENCODINGS[scenario.data.dataset], num_classes=num_classes)


def _dimension(config: SimConfig) -> int:
    # What the server sends: every array of the state dict.
    return sum(v.numel() for v in config.architecture.build(seed=0).state_dict().values())


@pytest.mark.parametrize("name", sorted(path.stem for path in SCENARIOS.glob("*.toml")))
def test_the_budget_lasts_every_round(name: str) -> None:
    config = _config(name)

    assert config.distributed_budget_shortfall(_dimension(config)) is None


def test_a_short_budget_is_reported_with_the_multiplier_that_fits() -> None:
    shipped = _config("cross-device")
    assert shipped.dp is DpMode.DISTRIBUTED and shipped.epsilon is not None
    short = replace(shipped, noise_multiplier=0.8)
    dimension = _dimension(shipped)

    shortfall = short.distributed_budget_shortfall(dimension)

    assert shortfall is not None
    allowed, fits = shortfall
    assert allowed < short.num_rounds
    assert fits is not None and fits <= shipped.noise_multiplier
    assert replace(shipped, noise_multiplier=fits).distributed_budget_shortfall(dimension) is None
