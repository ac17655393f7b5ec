"""Run a scenario: the Python API behind ``fedge sim run SCENARIO.toml``.

::

    from simulations import run_scenario

    result = run_scenario("scenarios/quickstart.toml")
    print(result.summary.final_accuracy, result.plots)

:func:`run_scenario` checks the scenario, loads and partitions its data set
(failing before anything is recorded when either is wrong), then runs it
through the same coordinator and client app as ``fedge sim run``: the device
mods are composed in their one valid order (:func:`fl_client.composition.device_mods`),
so a script never assembles them by hand. Every round is in the audit trail and
the model store; the run's directory holds ``summary.json``, ``scenario.json``
(the checked scenario) and ``plots/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedge.errors import StorageError
from fedge.home import FedgeHome, check_writable_directory, check_writable_file
from fl_server import RoundObserver
from fl_server.run_summary import RunSummary
from simulations.config import SimConfig
from simulations.datasets import cached_dataset
from simulations.run import RunPaths, check_paths, new_run_id, prepare_data, run_federation
from simulations.scenario import Scenario, load_scenario

__all__ = ["ScenarioResult", "ScenarioRun", "prepare_scenario", "run_scenario"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """What a scenario run produced."""

    scenario: Scenario
    summary: RunSummary
    run_dir: Path
    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class ScenarioRun:
    """A checked scenario, its simulation, its paths and its run id: ready to run."""

    scenario: Scenario
    config: SimConfig
    paths: RunPaths
    run_id: str
    run_dir: Path


def prepare_scenario(
    scenario: Scenario | Path | str,
    *,
    home: Path | None = None,
    out: Path | None = None,
    runs_dir: Path | None = None,
    db_url: str | None = None,
    store_dir: Path | None = None,
    devices_dir: Path | None = None,
) -> ScenarioRun:
    """Check a scenario and where its run goes, writing nothing.

    Parameters
    ----------
    scenario
        A checked :class:`~simulations.scenario.Scenario` or a scenario file's path.
    home
        The fedge home (default: ``FEDGE_HOME`` or ``~/.fedge``); the other paths
        default to its database, store, runs and devices.
    out
        The summary JSON (default: ``RUNS/RUN_ID/summary.json``).

    Raises
    ------
    ScenarioError
        If the file or the scenario is malformed.
    DataError
        If the data set is missing.
    ConfigError
        If a path is unusable.
    """
    checked = scenario if isinstance(scenario, Scenario) else load_scenario(Path(scenario))
    data_dir = None if checked.data.dir is None else str(checked.data.dir)
    encoding = cached_dataset(checked.data.dataset, data_dir).encoding
    config = checked.sim_config(encoding)
    state = FedgeHome.resolve(home)
    runs = runs_dir or state.runs_dir
    run_id = new_run_id()
    run_dir = runs / run_id
    paths = RunPaths(
        summary=out or run_dir / "summary.json",
        models=run_dir / "models",
        db_url=db_url or state.db_url,
        store=store_dir or state.store_dir,
        devices=devices_dir or state.devices_dir,
        audit=state.audit_dir,
    )
    check_writable_directory(runs, option="--runs-dir")
    check_writable_file(paths.summary, option="--out")
    check_writable_directory(paths.store_dir, option="--store-dir")
    check_writable_directory(paths.devices_dir, option="--devices-dir")
    check_paths(paths)
    return ScenarioRun(scenario=checked, config=config, paths=paths, run_id=run_id, run_dir=run_dir)


def run_scenario(
    scenario: Scenario | Path | str | ScenarioRun,
    *,
    home: Path | None = None,
    out: Path | None = None,
    observers: Sequence[RoundObserver] = (),
    verbose: bool = False,
) -> ScenarioResult:
    """Run a scenario to the end and return its summary, plots and MLflow run.

    Parameters
    ----------
    scenario
        A scenario file's path, a checked :class:`~simulations.scenario.Scenario`,
        or the output of :func:`prepare_scenario`.
    home, out
        As in :func:`prepare_scenario` (ignored for a prepared run).
    observers
        Told about every round (e.g. :class:`simulations.display.RoundDisplay`).
    verbose
        Show Flower's and Ray's own logs.

    Raises
    ------
    ScenarioError, DataError, ConfigError, StorageError
        As :func:`prepare_scenario` and :func:`simulations.run.run_federation`;
        nothing is recorded when the scenario or its data are wrong.
    """
    prepared_run = (
        scenario
        if isinstance(scenario, ScenarioRun)
        else prepare_scenario(scenario, home=home, out=out)
    )
    checked, config, paths = prepared_run.scenario, prepared_run.config, prepared_run.paths
    data = prepare_data(config)
    _write_json(prepared_run.run_dir / "scenario.json", checked.to_json())
    summary = run_federation(
        config,
        paths,
        run_id=prepared_run.run_id,
        prepared=data,
        observers=observers,
        verbose=verbose,
    )
    plots: list[Path] = []
    if checked.output.plots:
        from simulations.plots import write_plots

        plots = write_plots(summary, prepared_run.run_dir / "plots")
    mlflow_run_id = None
    if checked.output.mlflow is not None:
        from simulations.mlflow_export import export_to_mlflow

        mlflow_run_id = export_to_mlflow(
            summary, checked.output.mlflow, experiment=checked.name, plots=plots
        )
    return ScenarioResult(
        scenario=checked,
        summary=summary,
        run_dir=prepared_run.run_dir,
        summary_path=paths.summary,
        plots=plots,
        mlflow_run_id=mlflow_run_id,
    )


def _write_json(path: Path, document: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
