"""Every shipped scenario runs, at a reduced size, through the real simulation engine.

Each file under ``scenarios/`` is loaded as a user would load it, then shrunk (fewer
devices and rounds, small generated data) without touching anything else: its
strategy, model, data set, privacy, attack and defence are the shipped ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fl_server.checkpoints import load_weights
from simulations.offline import ray_backend_config
from simulations.scenario import Scenario, load_scenario
from simulations.scenario_run import ScenarioResult, run_scenario
from tests.conftest import make_synthetic_fashion
from tests.unit.simulations.test_shuttle import shuttle_frame, write_shuttle

pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


@pytest.fixture(scope="module", autouse=True)
def one_ray_for_the_module() -> Iterator[None]:
    """Start Ray once for the module's simulations (each start and stop costs ~5 s)."""
    import ray

    ray.init(**ray_backend_config(2, verbose=False)["init_args"])
    shutdown = ray.shutdown
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
            yield
    finally:
        shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    fashion = make_synthetic_fashion(root / "fashion", train=480, test=120)
    # A learnable Shuttle look-alike: the class moves the first two sensor readings.
    frame = shuttle_frame(700, seed=1)
    codes = frame["Class"].cat.codes.to_numpy()
    frame["V1"] = frame["V1"] / 10 + 40.0 * codes
    frame["V2"] = frame["V2"] / 10 - 25.0 * codes
    shuttle = write_shuttle(root / "shuttle", frame)
    return {"fashion-mnist": fashion, "shuttle": shuttle}


def _shrunk(name: str, data: dict[str, Path], *, clients: int = 6, rounds: int = 1) -> Scenario:
    shipped = load_scenario(SCENARIOS / f"{name}.toml")
    population = shipped.population
    per_round = None
    if population.per_round is not None:
        # The shipped share of devices a round, at least 3 (what secure aggregation needs).
        share = population.per_round / population.clients
        per_round = min(clients, max(3, round(clients * share)))
    return replace(
        shipped,
        scenario=replace(shipped.scenario, rounds=rounds),
        population=replace(population, clients=clients, per_round=per_round, parallelism=2),
        data=replace(
            shipped.data,
            dir=data[shipped.data.dataset],
            train_examples=None,
            test_examples=None,
        ),
    )


def _run(scenario: Scenario, home: Path) -> ScenarioResult:
    return run_scenario(scenario, home=home)


def test_every_shipped_scenario_is_valid_and_named_after_its_file() -> None:
    names = sorted(path.stem for path in SCENARIOS.glob("*.toml"))

    assert {"quickstart", "cross-device", "cross-silo-hospitals", "predictive-maintenance"} <= set(
        names
    )
    assert {"adversarial", "adversarial-robust", "outage"} <= set(names)
    for name in names:
        assert load_scenario(SCENARIOS / f"{name}.toml").name == name


def test_quickstart(data: dict[str, Path], tmp_path: Path) -> None:
    result = _run(_shrunk("quickstart", data, rounds=2), tmp_path)

    summary = result.summary
    assert summary.status == "completed"
    assert [r["sampled"] for r in summary.rounds] == [3, 3]  # half, as shipped (5 of 10)
    assert summary.final_accuracy is not None and summary.final_accuracy > 0.2
    assert {p.name for p in result.plots} >= {"accuracy.png", "participation.png"}
    stored = json.loads((result.run_dir / "scenario.json").read_text())
    assert stored["strategy"]["name"] == "fedavg"


def test_cross_device_runs_secure_rounds_with_distributed_dp(
    data: dict[str, Path], tmp_path: Path
) -> None:
    result = _run(_shrunk("cross-device", data, clients=6), tmp_path)

    summary = result.summary
    assert summary.status == "completed"
    secure = summary.rounds[0]["secure_aggregation"]
    assert secure is not None and secure["survivors"] == 3
    assert summary.privacy is not None and summary.privacy["mechanism"] == "distributed-ddg"
    assert summary.rounds[0]["epsilon"] is not None and summary.rounds[0]["epsilon"] > 0


def test_cross_silo_takes_shared_noise_dp_sgd_steps_under_secure_aggregation(
    data: dict[str, Path], tmp_path: Path
) -> None:
    shipped = _shrunk("cross-silo-hospitals", data, clients=4, rounds=2)
    # More of each silo's 120 generated examples a step than the 6,000-example silos need.
    scenario = replace(shipped, privacy=replace(shipped.privacy, sample_rate=0.5))

    result = _run(scenario, tmp_path)

    summary = result.summary
    assert summary.status == "completed"
    assert [r["secure_aggregation"]["survivors"] for r in summary.rounds] == [4, 4]
    privacy = summary.privacy
    assert privacy is not None and privacy["level"] == "example"
    assert privacy["mechanism"] == "sample-ddg"
    # The noise is the least that spends the shipped budget in exactly the rounds run.
    assert 0.95 * 3.0 < privacy["epsilon"] <= 3.0
    assert summary.rounds[0]["epsilon"] < summary.rounds[1]["epsilon"] == privacy["epsilon"]
    assert summary.final_accuracy is not None
    assert summary.final_accuracy > summary.rounds[0]["accuracy"] - 0.05


def test_predictive_maintenance_trains_a_model_by_import_path_on_shuttle(
    data: dict[str, Path], tmp_path: Path
) -> None:
    result = _run(_shrunk("predictive-maintenance", data, rounds=2), tmp_path)

    summary = result.summary
    assert summary.status == "completed"
    assert summary.data["dataset"] == "shuttle" and summary.data["num_classes"] == 7
    assert summary.config["model_spec"]["name"] == "simulations.tabular:SensorMLP"
    assert summary.config["strategy"] == {"name": "fedprox", "options": {"proximal_mu": 0.01}}
    # A learnable toy frame of 7 balanced classes: clearly above chance (1/7) after 2 rounds.
    assert summary.initial_accuracy is not None and summary.final_accuracy is not None
    assert summary.final_accuracy > max(0.25, summary.initial_accuracy + 0.1)


def test_a_rerun_with_the_same_seed_samples_the_same_devices_and_learns_the_same(
    data: dict[str, Path], tmp_path: Path
) -> None:
    scenario = _shrunk("predictive-maintenance", data, rounds=2)

    runs = [_run(scenario, tmp_path / name).summary for name in ("a", "b")]

    # Same devices, data, initial model and shuffling: the same model up to the order in
    # which the server summed the replies (floating point).
    first, second = (
        load_weights(
            Path(run.rounds[-1]["model_path"]), expected_sha256=run.rounds[-1]["model_sha256"]
        )
        for run in runs
    )
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_allclose(
            np.asarray(first[name], dtype=np.float64),
            np.asarray(second[name], dtype=np.float64),
            rtol=1e-4,
            atol=1e-6,
        )
    assert [r["accuracy"] for r in runs[0].rounds] == [r["accuracy"] for r in runs[1].rounds]


def test_adversarial_backdoor_is_blunted_by_the_device_side_norm_bound(
    data: dict[str, Path], tmp_path: Path
) -> None:
    shrunk = _shrunk("adversarial", data, clients=6, rounds=3)
    scenario = replace(shrunk, population=replace(shrunk.population, per_round=None))

    result = _run(scenario, tmp_path)

    assert result.baseline is not None and result.attack is not None
    comparison = json.loads((result.run_dir / "comparison.json").read_text())
    without, with_ = comparison["without_defence"], comparison["with_defence"]
    assert with_["defence"] == {"norm_bound": 2.0, "site": "device"}
    assert without["defence"] is None
    assert result.baseline.attack is not None
    assert result.attack["byzantine_partitions"] == result.baseline.attack["byzantine_partitions"]
    # Both ran under SecAgg+: the server never saw an update, the devices bounded them.
    assert result.summary.rounds[-1]["secure_aggregation"]["survivors"] == 6
    assert with_["backdoor_success_rate"] < without["backdoor_success_rate"]
    assert with_["final_accuracy"] >= without["final_accuracy"]
    assert any(p.name == "compare-accuracy.png" for p in result.plots)


def test_adversarial_robust_trimmed_mean_resists_sign_flipping(
    data: dict[str, Path], tmp_path: Path
) -> None:
    shrunk = _shrunk("adversarial-robust", data, clients=10, rounds=3)
    scenario = replace(shrunk, population=replace(shrunk.population, per_round=None))

    result = _run(scenario, tmp_path)

    assert result.baseline is not None and result.attack is not None
    comparison = json.loads((result.run_dir / "comparison.json").read_text())
    without, with_ = comparison["without_defence"], comparison["with_defence"]
    assert result.baseline.summary.config.get("strategy") is None  # FedAvg, the default
    assert with_["defence"]["strategy"]["name"] == "fedtrimmedavg"
    assert with_["final_accuracy"] > without["final_accuracy"] + 0.2


def test_outage_rounds_complete_with_the_devices_that_stayed(
    data: dict[str, Path], tmp_path: Path
) -> None:
    shipped = _shrunk("outage", data, clients=10, rounds=2)
    assert shipped.failures is not None
    # The shipped failures, without their real-time sleeps.
    scenario = replace(shipped, failures=replace(shipped.failures, time_scale=0.0))

    result = _run(scenario, tmp_path)

    summary = result.summary
    assert summary.status == "completed"
    for entry in summary.rounds:
        # 3 of 10 went offline after sharing their keys: unmasked with the survivors' shares.
        assert (entry["sampled"], entry["completed"], entry["dropped"]) == (10, 7, 3)
        assert entry["secure_aggregation"]["survivors"] == 7
    assert summary.config["failures"]["dropout_stage"] == "training"
