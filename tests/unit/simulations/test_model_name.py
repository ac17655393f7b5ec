"""``fedge sim run --model-name``: the store name a simulated run publishes under."""

from __future__ import annotations

import pytest

from fedge.cli import main
from fedge.errors import ConfigError
from simulations.config import DpMode, SimConfig


def test_by_default_a_run_publishes_under_the_architectures_name() -> None:
    config = SimConfig()

    assert config.store_model_name == "cnn"
    assert "model_name" not in config.to_json()  # the configuration's hash is unchanged


def test_a_named_run_publishes_under_its_name() -> None:
    config = SimConfig(model_name="cnn-dp", dp=DpMode.CENTRAL)

    assert config.store_model_name == "cnn-dp"
    assert config.to_json()["model_name"] == "cnn-dp"


@pytest.mark.parametrize("name", ["", "a/b", ".", "x" * 65, "cnn dp"])
def test_a_name_the_store_cannot_hold_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"--model-name must match \[A-Za-z0-9_.-\]\{1,64\}"):
        SimConfig(model_name=name)


class _StopError(Exception):
    pass


def test_the_option_reaches_the_runs_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    import simulations.run

    seen: list[SimConfig] = []

    def prepare_data(config: SimConfig) -> None:
        seen.append(config)
        raise _StopError

    monkeypatch.setattr(simulations.run, "prepare_data", prepare_data)

    with pytest.raises(_StopError):
        main(["sim", "run", "--model-name", "cnn-private", "--dp", "central", "--clients", "2"])

    assert [config.store_model_name for config in seen] == ["cnn-private"]


def test_a_bad_option_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "run", "--model-name", "../x"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("fedge: error: --model-name must match") and err.count("\n") == 1
